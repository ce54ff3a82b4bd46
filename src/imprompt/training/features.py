"""The frozen encoders of training, and the on-disk cache of what they compute.

A training step of IP-Adapter only needs the UNet: the VAE latents, the text-encoder states and the
image-encoder features of an image never change, since those models are frozen. So they are
computed once and stored as safetensors shards; each step reads them back. The VAE's latent
*distribution* (mean, std) is stored, not a sample, so every step still draws a fresh latent sample
exactly as ``latent_dist.sample()`` would. The cache key hashes the frozen models' configs and
weights fingerprints, the resolution, the crop (and the seed of random crops) and the data
(:func:`imprompt.training.data.data_fingerprint`): changing any of them makes a new cache, so a
changed data folder never trains on the previous folder's features.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..encoding import ImageEncoder
from ..files import atomic_path, remove_debris, write_text
from .data import Prepared, Record, SkipCounter, prepare_pixels, try_decode

SHARD_SIZE = 256


@dataclass
class FrozenModels:
    """The frozen parts of a Stable Diffusion pipeline plus the image encoder."""

    pipe: object  # a diffusers StableDiffusion(XL)Pipeline: vae, text encoder(s), unet, scheduler
    encoder: ImageEncoder
    encoder_output: str  # "image_embeds" or "penultimate_hidden"

    @property
    def is_sdxl(self) -> bool:
        return hasattr(self.pipe, "text_encoder_2")

    def fingerprint(self, resolution: int, center_crop: bool, data: str = "", crop_seed: int | None = None) -> str:
        """Hash of everything the cached features depend on: the frozen models, the resolution, the
        crop, ``data`` (the data's fingerprint) and ``crop_seed`` (random crops are drawn from it)."""
        digest = hashlib.sha256()
        modules = [self.pipe.vae, self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None), self.encoder.model]
        for module in filter(None, modules):
            digest.update(json.dumps(dict(module.config.to_dict() if hasattr(module.config, "to_dict") else module.config),
                                     sort_keys=True, default=str).encode())
            params = list(module.parameters())
            for p in (params[0], params[len(params) // 2], params[-1]):
                digest.update(p.detach().float().cpu().numpy().tobytes())
        digest.update(json.dumps([resolution, center_crop, self.encoder_output, self.encoder.processor.to_dict()],
                                 sort_keys=True, default=str).encode())
        digest.update(json.dumps([data, None if center_crop else crop_seed]).encode())
        return digest.hexdigest()[:16]

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        device = self.pipe.unet.device
        if self.is_sdxl:
            states, _, pooled, _ = self.pipe.encode_prompt(list(captions), device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
            return {"text": states.float().cpu(), "pooled": pooled.float().cpu()}
        states, _ = self.pipe.encode_prompt(list(captions), device, 1, False)
        return {"text": states.float().cpu()}

    @torch.no_grad()
    def encode_images(self, images, prepared: Sequence[Prepared]) -> dict[str, torch.Tensor]:
        vae = self.pipe.vae
        pixels = torch.stack([p.pixels for p in prepared]).to(vae.device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        out = {"latent_mean": dist.mean.float().cpu(), "latent_std": dist.std.float().cpu()}
        out["image"] = self.encoder.features(self.encoder.pixels(images), self.encoder_output).float().cpu()
        if self.is_sdxl:
            res = prepared[0].pixels.shape[-1]
            out["time_ids"] = torch.tensor([[*p.original_size, *p.crop_top_left, res, res] for p in prepared], dtype=torch.float32)
        return out

    @torch.no_grad()
    def unconditional(self) -> dict[str, torch.Tensor]:
        """Dropped-text and dropped-image features (empty caption; official 'no image')."""
        text = self.encode_text([""])
        size = self.encoder.model.config.image_size
        param = next(self.encoder.model.parameters())
        zeros = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
        image = self.encoder.unconditional(zeros, self.encoder_output).float().cpu()
        return {**{f"empty_{k}": v[0] for k, v in text.items()}, "uncond_image": image[0]}

    def encode(self, records: Sequence[Record], resolution: int, center_crop: bool, seed: int,
               counter: SkipCounter) -> dict[str, torch.Tensor] | None:
        """Features of a batch of records; unreadable images are skipped (and counted)."""
        images, prepared, captions, keys = [], [], [], []
        for record in records:
            image = try_decode(record, counter)
            if image is None:
                continue
            prompt = image if record.read_reference is None else try_decode(record, counter, reference=True)
            if prompt is None:
                continue
            # A random crop is drawn from a per-image generator, so it is the same on every run.
            rng = np.random.default_rng([seed, int(hashlib.md5(record.key.encode()).hexdigest()[:8], 16)])
            prepared.append(prepare_pixels(image, resolution, center_crop, rng))
            images.append(prompt)  # what the image encoder sees; the VAE gets ``prepared``
            captions.append(record.caption)
            keys.append(record.key)
        if not keys:
            return None
        return {**self.encode_images(images, prepared), **self.encode_text(captions), "_keys": keys}


class FeatureCache:
    """Cached features in ``root/<fingerprint>/``: shards plus an index written last (atomic)."""

    def __init__(self, root: Path, fingerprint: str):
        self.folder = Path(root) / fingerprint
        self.index_file = self.folder / "index.json"

    @property
    def complete(self) -> bool:
        return self.index_file.is_file()

    def remember(self, source: str | None) -> None:
        """Note that this cache holds the features of ``source`` (:func:`imprompt.training.frozen.source_key`),
        so that a later run finds it without loading the frozen models to hash their weights."""
        if source is not None and not (self.folder / f"source-{source}.json").is_file():
            write_text(self.folder / f"source-{source}.json", json.dumps({"source": source}))

    @classmethod
    def recall(cls, root: Path, source: str | None) -> "FeatureCache | None":
        """The complete cache built from ``source``, if one was (None: the frozen models must be loaded)."""
        if source is None or not Path(root).is_dir():
            return None
        for marker in sorted(Path(root).glob(f"*/source-{source}.json")):
            cache = cls(root, marker.parent.name)
            if cache.complete:
                return cache
        return None

    def build(self, models: FrozenModels, records: Iterable[Record], resolution: int, center_crop: bool,
              seed: int, counter: SkipCounter, batch_size: int = 16, progress: bool = True) -> None:
        """Encode every record once. Resumable: finished shards are kept, the index comes last."""
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_debris(self.folder)  # temporary files of a build killed mid-write
        shard_keys: list[list[str]] = []
        pending: list[Record] = []
        bar = tqdm(desc="caching features", unit="img", disable=not progress)

        def flush(batch: list[Record]) -> None:
            number = len(shard_keys)
            path = self.folder / f"shard-{number:05d}.safetensors"
            keys_path = path.with_suffix(".keys.json")
            if path.is_file() and keys_path.is_file():  # done by an earlier, interrupted run
                shard_keys.append(json.loads(keys_path.read_text()))
                bar.update(len(batch))
                return
            parts = [models.encode(batch[i:i + batch_size], resolution, center_crop, seed, counter)
                     for i in range(0, len(batch), batch_size)]
            parts = [p for p in parts if p is not None]
            keys = [k for p in parts for k in p["_keys"]]
            tensors = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0] if name != "_keys"} if parts else {}
            _save_tensors(tensors, path)
            write_text(keys_path, json.dumps(keys))
            shard_keys.append(keys)
            bar.update(len(batch))

        for record in records:
            pending.append(record)
            if len(pending) == SHARD_SIZE:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
        bar.close()
        _save_tensors(models.unconditional(), self.folder / "unconditional.safetensors")
        index = {"shards": [len(k) for k in shard_keys], "keys": [k for keys in shard_keys for k in keys],
                 "skipped": sorted(set(counter.skipped))}
        write_text(self.index_file, json.dumps(index))

    def open(self) -> "CachedFeatures":
        return CachedFeatures(self.folder, json.loads(self.index_file.read_text()))


class CachedFeatures:
    """Random access to cached items; shards are memory-mapped, not loaded whole."""

    def __init__(self, folder: Path, index: dict):
        self.keys: list[str] = index["keys"]
        self.skipped: list[str] = index["skipped"]
        self._where = [(s, i) for s, n in enumerate(index["shards"]) for i in range(n)]
        self._shards = {s: _map_tensors(folder / f"shard-{s:05d}.safetensors") for s, n in enumerate(index["shards"]) if n}
        with safe_open(folder / "unconditional.safetensors", "pt") as f:
            self.unconditional = {k: f.get_tensor(k) for k in f.keys()}

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The rows ``indices``, stacked: one copy out of the mapped shards, nothing else."""
        rows = [self._where[i] for i in indices]
        shards = {s for s, _ in rows}
        names = next(iter(self._shards.values())).keys()
        if len(shards) == 1:  # the usual case: one fancy index per tensor
            shard, where = self._shards[shards.pop()], np.array([i for _, i in rows])
            return {name: torch.from_numpy(shard[name][where]) for name in names}
        return {name: torch.from_numpy(np.stack([self._shards[s][name][i] for s, i in rows])) for name in names}


_NUMPY_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def _map_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only numpy views of one memory map.

    A step reads a few rows of each: indexing a mapped array costs a fraction of a microsecond per row,
    where a ``safe_open(...).get_slice(name)[i]`` costs tens (a batch of 32 rows of five tensors took
    ~20 ms). The layout is the format's: 8 bytes of header length, the JSON header, then the data."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    with open(path, "rb") as f:  # the map outlives the file object; a plain ndarray (np.memmap's slices are slow)
        raw = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _NUMPY_TYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; the feature cache holds "
                             f"{sorted(_NUMPY_TYPES)}: delete the cache folder to rebuild it")
        start, end = info["data_offsets"]
        out[name] = raw[8 + length + start:8 + length + end].view(_NUMPY_TYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
