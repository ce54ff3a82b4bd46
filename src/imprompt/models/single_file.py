"""Single-file checkpoints (A1111's ``models/Stable-diffusion``, ComfyUI's ``models/checkpoints``) and
single-file ControlNets, loaded through diffusers' ``from_single_file``, offline.

``from_single_file`` converts the original (LDM) key layout itself, but it would download the model's
configs and tokenizers from the hub. We ship them instead (``configs/``: the published SD1.5, SD2.x
768-v and SDXL base 1.0 pipeline configs and the SD1.5 / SDXL ControlNet configs, no weights; the
tokenizers are built from CLIP's BPE file, :mod:`imprompt.models.tokenizers`), and pick one by the base
read off the checkpoint's keys (:func:`imprompt.models.inspect.inspect_file`). A checkpoint whose sizes
differ from the published ones (a custom architecture) loads with ``model_config``: any diffusers
folder of the same architecture, whose configs and tokenizers are used instead.

Pickled ``.ckpt`` / ``.pth`` files are first read through :func:`imprompt.files.load_torch_weights`
(weights only), so that a file that would run code is refused with our message before diffusers
(which also loads weights-only) sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..adapter.variants import CheckpointError
from .inspect import inspect_file

CONFIGS = Path(__file__).parent / "configs"
BASE_CONFIGS = {"SD1.5": "sd15", "SD2": "sd2", "SDXL": "sdxl"}
CONTROLNET_CONFIGS = {"SD1.5": "controlnet-sd15", "SDXL": "controlnet-sdxl"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_KIND_WORDS = {"adapter": "an IP-Adapter (give it as --adapter)", "lora": "a LoRA (use it in the prompt as <lora:NAME:1>)",
               "embedding": "a textual-inversion embedding", "controlnet": "a ControlNet (give it as --controlnet)",
               "image_encoder": "a CLIP image encoder (give it as --image-encoder)", "vae": "a VAE alone",
               "checkpoint": "a Stable Diffusion checkpoint"}


def _check_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        from ..files import load_torch_weights

        load_torch_weights(path, what="checkpoint")  # refuses (by name) anything but tensors


def _inspect(path: Path, kind: str) -> "object":
    info = inspect_file(path, True)  # open pickles too (weights only, through files.load_torch_weights)
    if info.problem:
        raise CheckpointError(f"{path.name}: {info.problem}")
    if info.kind != kind:
        raise CheckpointError(f"{path.name} is {_KIND_WORDS.get(info.kind, 'not a model imprompt reads')}, not "
                              f"{_KIND_WORDS[kind].split(' (')[0]}")
    return info


@contextmanager
def _config_folder(base_folder: Path, unet_in_channels: int | None) -> Iterator[Path]:
    """The shipped config folder, or a temporary copy with the UNet's input channels changed
    (inpainting checkpoints take 9: latents, mask, masked-image latents)."""
    if unet_in_channels in (None, json.loads((base_folder / "unet" / "config.json").read_text())["in_channels"]):
        yield base_folder
        return
    with tempfile.TemporaryDirectory(prefix="imprompt-config-") as tmp:
        folder = Path(tmp) / base_folder.name
        shutil.copytree(base_folder, folder)
        config = json.loads((folder / "unet" / "config.json").read_text())
        config["in_channels"] = unet_in_channels
        (folder / "unet" / "config.json").write_text(json.dumps(config))
        yield folder


def load_single_file_pipeline(path: str | os.PathLike, task: str = "text2img", *, controlnet=None,
                              dtype: torch.dtype = torch.float32, model_config: str | os.PathLike | None = None):
    """A diffusers pipeline for ``task`` from one SD1.5 / SD2 / SDXL checkpoint file."""
    from ..generation.pipelines import load_controlnets, pipeline_class

    path = Path(path)
    info = _inspect(path, "checkpoint")
    kwargs: dict = {}
    if model_config is not None:
        config = Path(model_config)
        if not (config / "model_index.json").is_file():
            raise CheckpointError(f"--model-config {str(config)!r} is not a diffusers pipeline folder (no model_index.json)")
    else:
        if info.base not in BASE_CONFIGS:
            raise CheckpointError(f"{path.name}: cannot tell from its keys whether it is SD1.5, SD2 or SDXL; pass "
                                  "--model-config FOLDER, a diffusers folder of the same model family")
        config = CONFIGS / BASE_CONFIGS[info.base]
        from .tokenizers import clip_tokenizer

        # Tokenizers built here, not read from the folder (which ships no vocabulary files).
        for name in ("tokenizer", "tokenizer_2"):
            tokenizer_config = config / name / "tokenizer_config.json"
            if tokenizer_config.is_file():
                kwargs[name] = clip_tokenizer(json.loads(tokenizer_config.read_text())["pad_token"])
    _check_pickle(path)
    index = json.loads((config / "model_index.json").read_text())
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if controlnet:
        kwargs["controlnet"] = load_controlnets(controlnet, dtype, unet_config=config / "unet" / "config.json")
    cls = pipeline_class(str(index.get("_class_name", "")), task, bool(controlnet))
    in_channels = info.details.get("in_channels") if model_config is None else None
    with _config_folder(config, in_channels) as folder:
        try:
            return cls.from_single_file(str(path), config=str(folder), local_files_only=True, dtype=dtype, **kwargs)
        except (ValueError, RuntimeError, KeyError, OSError) as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot load {path.name} as a {info.base or 'Stable Diffusion'} checkpoint: {first}"
                                  + ("" if model_config else "; if it is a custom architecture, pass --model-config "
                                     "FOLDER (a diffusers folder of the same architecture)")) from None


# The config entries ControlNetModel.from_unet copies from its UNet (diffusers, controlnets/controlnet.py):
# a ControlNet is a trainable copy of its base UNet's encoder half, so the UNet's config describes it.
_FROM_UNET = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
              "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
              "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
              "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
              "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
              "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
              "projection_class_embeddings_input_dim", "mid_block_type")
# What only the ControlNet's own file tells: its hint encoder (read by inspect from the shapes).
_HINT_ENTRIES = ("conditioning_channels", "conditioning_embedding_out_channels", "in_channels")


def controlnet_config(unet_config: Mapping, details: Mapping) -> dict:
    """The ``ControlNetModel`` config of a ControlNet made for the UNet of ``unet_config``, with the hint
    encoder sizes ``details`` read off the ControlNet file (:func:`imprompt.models.inspect.inspect_file`)."""
    config = {"_class_name": "ControlNetModel", **{k: unet_config[k] for k in _FROM_UNET if k in unet_config}}
    config.update({k: details[k] for k in _HINT_ENTRIES if k in details})
    return config


def load_single_file_controlnet(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                                config: str | os.PathLike | None = None, unet_config: Mapping | None = None):
    """A ``ControlNetModel`` from one file (original ``control_model.*`` keys or diffusers keys).

    Its config is, in this order: the folder ``config`` (holding a ControlNet config.json); the one made
    from ``unet_config``, the config of the UNet it will steer (so ControlNets of any size load, tiny
    test models and custom architectures included); the shipped SD1.5 / SDXL one for its base.
    """
    from diffusers import ControlNetModel

    path = Path(path)
    info = inspect_file(path, True)
    if info.kind != "controlnet" or info.problem:
        _inspect(path, "controlnet")  # raises with the message for what the file is
    width = info.details.get("cross_attention_dim")
    if unet_config is not None and width is not None and width != unet_config.get("cross_attention_dim"):
        raise CheckpointError(f"the ControlNet {path.name} is for {info.base or 'another model'} (cross-attention width "
                              f"{width}), but the model's UNet has width {unet_config.get('cross_attention_dim')}; use a "
                              "ControlNet made for the model's base")
    _check_pickle(path)
    with tempfile.TemporaryDirectory(prefix="imprompt-controlnet-") as tmp:
        if config is None and unet_config is not None:
            Path(tmp, "config.json").write_text(json.dumps(controlnet_config(unet_config, info.details)))
            config = tmp
        elif config is None:
            if info.base not in CONTROLNET_CONFIGS:
                raise CheckpointError(f"{path.name}: a ControlNet for {info.base or 'an unknown base'}; imprompt ships "
                                      "ControlNet configs for SD1.5 and SDXL")
            config = CONFIGS / CONTROLNET_CONFIGS[info.base]
        try:
            return ControlNetModel.from_single_file(str(path), config=str(config), local_files_only=True, dtype=dtype)
        except (ValueError, RuntimeError, KeyError, OSError) as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot load the ControlNet {path.name}: {first}") from None
