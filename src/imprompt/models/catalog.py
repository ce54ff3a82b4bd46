"""The models a user already has, found in their tools' folders and looked up by name.

A *root* is a folder given with ``--models-dir`` (or ``IMPROMPT_MODELS_DIR``, several separated by
``os.pathsep``). Each root is read in the layouts the tools use (facts from their sources; see
``FOLDERS``):

* AUTOMATIC1111 / Forge: ``models/Stable-diffusion``, ``models/Lora``, ``models/ControlNet``,
  ``models/VAE``, ``embeddings/``; the ControlNet extension's ``extensions/sd-webui-controlnet/models``
  (IP-Adapters live there too) and ``.../annotator/downloads/clip_vision`` (``clip_h.pth``, ``clip_g.pth``).
* ComfyUI: ``models/checkpoints``, ``models/loras``, ``models/embeddings``, ``models/controlnet``,
  ``models/ipadapter``, ``models/clip_vision``, ``models/vae``, and the folders its
  ``extra_model_paths.yaml`` names (``base_path`` plus one or several folders per kind).
* A plain (or InvokeAI-style) folder: every model file under it, up to a few levels deep.

A file's kind is read from its content (:func:`imprompt.models.inspect.inspect_file`: safetensors
headers only, no weights loaded); the folder a file sits in is only the fallback for pickles, which
are not opened while listing. Diffusers folders (``model_index.json``) count as checkpoints and
CLIP vision folders (``config.json``), such as the official ``models/image_encoder``, as encoders.

Names: a file's stem, case-insensitive (``v1-5-pruned-emaonly``), or its path relative to its kind's
folder without the extension (``sd15/v1-5-pruned-emaonly``); A1111's ``name [hash]`` form is accepted
and the hash, when given, checked against the file's short hash (:mod:`imprompt.models.hashes`). A
name is only ever looked up among the files found: it cannot reach any other file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .inspect import ModelInfo, inspect_file

KINDS: tuple[str, ...] = ("checkpoint", "adapter", "image_encoder", "lora", "embedding", "controlnet", "vae")
MODEL_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ENV_VAR = "IMPROMPT_MODELS_DIR"
MAX_DEPTH = 4  # below a kind's folder (A1111 users sort LoRAs into sub-folders, rarely deeper)

# (folder relative to a root, the kind that folder holds). Content decides where it can (an
# IP-Adapter in the ControlNet extension's folder is an adapter); the folder's kind is the fallback.
FOLDERS: tuple[tuple[str, str], ...] = (
    # AUTOMATIC1111 / Forge
    ("models/Stable-diffusion", "checkpoint"), ("models/Lora", "lora"), ("models/LyCORIS", "lora"),
    ("models/ControlNet", "controlnet"), ("models/VAE", "vae"), ("embeddings", "embedding"),
    ("extensions/sd-webui-controlnet/models", "controlnet"),
    ("extensions/sd-webui-controlnet/annotator/downloads/clip_vision", "image_encoder"),
    ("models/ipadapter", "adapter"), ("models/clip_vision", "image_encoder"),  # Forge and ComfyUI
    # ComfyUI
    ("models/checkpoints", "checkpoint"), ("models/loras", "lora"), ("models/embeddings", "embedding"),
    ("models/controlnet", "controlnet"), ("models/vae", "vae"),
    # the official IP-Adapter repository's layout (h94/IP-Adapter)
    ("models", "adapter"), ("sdxl_models", "adapter"),
)
# extra_model_paths.yaml keys (ComfyUI's folder names) -> our kinds; other keys (upscale_models, ...) are ignored.
COMFY_KEYS = {"checkpoints": "checkpoint", "loras": "lora", "embeddings": "embedding", "controlnet": "controlnet",
              "clip_vision": "image_encoder", "ipadapter": "adapter", "vae": "vae"}
_HASHED = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")


class ModelLookupError(FileNotFoundError):
    """A model name that names nothing found, or more than one thing (the CLI prints it as one line)."""


@dataclass(frozen=True)
class ModelEntry:
    """One model found: a file (or a diffusers / CLIP folder) and what it is."""

    kind: str  # one of KINDS, or "unknown"
    path: Path
    name: str  # relative to its kind's folder, without the extension ("sd15/v1-5-pruned-emaonly")
    info: ModelInfo
    root: Path

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def usable(self) -> bool:
        return self.info.problem is None and self.kind in KINDS

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "path": str(self.path), "base": self.info.base,
                "details": dict(self.info.details), "problem": self.info.problem}


def roots_from(models_dirs: Sequence[str | os.PathLike] | None, environ: dict | None = None) -> list[Path]:
    """The roots to search: the given folders, else those in ``IMPROMPT_MODELS_DIR``; each must exist."""
    environ = os.environ if environ is None else environ
    given = [str(d) for d in models_dirs or []]
    if not given and environ.get(ENV_VAR):
        given = [p for p in environ[ENV_VAR].split(os.pathsep) if p]
    roots = []
    for text in given:
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ModelLookupError(f"models folder {text!r} is not a folder (from --models-dir or {ENV_VAR}); "
                                   "give the root of an AUTOMATIC1111, Forge or ComfyUI install, or any folder of models")
        roots.append(path)
    return roots


def comfy_extra_folders(root: Path) -> list[tuple[Path, str]]:
    """The (folder, kind) pairs named in ``root/extra_model_paths.yaml`` (ComfyUI's format)."""
    file = root / "extra_model_paths.yaml"
    if not file.is_file():
        return []
    import yaml

    from ..files import UnsafeFileError, read_regular_file

    try:
        config = yaml.safe_load(read_regular_file(file, 1 << 20, what="extra_model_paths.yaml"))
    except (yaml.YAMLError, UnsafeFileError, UnicodeDecodeError) as err:
        raise ModelLookupError(f"cannot read {file}: {str(err).splitlines()[0]}") from None
    out = []
    for section in (config or {}).values():
        if not isinstance(section, dict):
            continue
        base = Path(os.path.expanduser(str(section.get("base_path", ""))))
        if not base.is_absolute():
            base = root / base  # ComfyUI reads a relative base_path from the yaml's folder
        for key, value in section.items():
            kind = COMFY_KEYS.get(key)
            if kind is None or value is None:
                continue
            for line in str(value).splitlines():
                if line.strip():
                    folder = Path(os.path.expanduser(line.strip()))
                    out.append((folder if folder.is_absolute() else base / folder, kind))
    return out


def _walk(folder: Path, depth: int = 0) -> Iterator[Path]:
    """Model files and model folders below ``folder`` (hidden entries skipped, bounded depth)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir():
            if (path / "model_index.json").is_file() or (path / "config.json").is_file():
                yield path
            elif depth < MAX_DEPTH:
                yield from _walk(path, depth + 1)
        elif entry.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
            yield path


def _folder_info(path: Path) -> ModelInfo:
    """A diffusers pipeline folder or a transformers CLIP vision folder."""
    if (path / "model_index.json").is_file():
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, ValueError) as err:
            return ModelInfo("checkpoint", None, {}, f"unreadable model_index.json ({err})")
        base = "SDXL" if "text_encoder_2" in index else None
        return ModelInfo("checkpoint", base, {"format": "diffusers", "pipeline": index.get("_class_name")}, None)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        return ModelInfo("unknown", None, {}, f"unreadable config.json ({err})")
    if config.get("model_type") in ("clip_vision_model", "clip"):
        vision = config.get("vision_config", config)
        width = vision.get("hidden_size")
        family = {1024: "ViT-L", 1280: "ViT-H", 1664: "ViT-bigG"}.get(width, f"width {width}")
        return ModelInfo("image_encoder", None, {"format": "transformers", "family": family, "width": width}, None)
    kind = {"ControlNetModel": "controlnet", "AutoencoderKL": "vae"}.get(config.get("_class_name"), "unknown")
    return ModelInfo(kind, None, {"format": "diffusers"}, None if kind != "unknown" else "not a model imprompt reads")


@dataclass
class Catalog:
    """Everything found under some roots, by kind. Build with :meth:`scan`; :meth:`find` looks names up."""

    roots: list[Path]
    entries: list[ModelEntry] = field(default_factory=list)

    @classmethod
    def scan(cls, roots: Iterable[str | os.PathLike], allow_pickle: bool = False) -> "Catalog":
        catalog = cls([Path(r) for r in roots])
        seen: set[Path] = set()
        for root in catalog.roots:
            folders = [(root / rel, kind) for rel, kind in FOLDERS if (root / rel).is_dir()]
            folders += comfy_extra_folders(root)
            if not folders:
                folders = [(root, None)]  # a plain folder of models
            for folder, folder_kind in folders:
                for path in _walk(folder):
                    key = path.resolve()
                    if key in seen:
                        continue
                    seen.add(key)
                    catalog.entries.append(_entry(path, folder, folder_kind, root, allow_pickle))
        return catalog

    def of_kind(self, kind: str) -> list[ModelEntry]:
        return [e for e in self.entries if e.kind == kind]

    def find(self, text: str, kind: str) -> ModelEntry:
        """The entry of ``kind`` named ``text`` (stem or relative name, case-insensitive; ``name [hash]``)."""
        name, wanted_hash = text.strip(), None
        if match := _HASHED.match(name):
            name, wanted_hash = match.group("name"), match.group("hash").lower()
        stem = name.lower()
        for suffix in MODEL_SUFFIXES:
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        candidates = self.of_kind(kind)
        found = [e for e in candidates if e.name.lower() == stem] or [e for e in candidates if e.stem.lower() == stem]
        label = kind.replace("_", " ")
        if not found:
            known = ", ".join(sorted(e.name for e in candidates)[:8]) or "none"
            raise ModelLookupError(
                f"no {label} named {text!r} among the models found in {', '.join(map(str, self.roots)) or 'no folder'} "
                f"(found: {known}); check the name, or give a path")
        if len(found) > 1:
            raise ModelLookupError(f"{label} name {text!r} is ambiguous: " + ", ".join(e.name for e in found)
                                   + "; give the longer name (with its sub-folder) or the path")
        entry = found[0]
        if entry.info.problem:
            raise ModelLookupError(f"{label} {entry.name} ({entry.path}) cannot be used: {entry.info.problem}")
        if wanted_hash is not None and entry.path.is_file():
            from .hashes import sha256_file

            actual = sha256_file(entry.path)
            if not actual.startswith(wanted_hash):
                raise ModelLookupError(f"{label} {entry.name}: the name asks for hash {wanted_hash} but the file's is "
                                       f"{actual[:len(wanted_hash)]}; it is another version of the model")
        return entry


def _entry(path: Path, folder: Path, folder_kind: str | None, root: Path, allow_pickle: bool) -> ModelEntry:
    if path.is_dir():
        info = _folder_info(path)
    else:
        info = inspect_file(path, allow_pickle=allow_pickle)
    kind = info.kind
    if kind == "unknown" and folder_kind is not None:
        # A pickle not opened while listing, or a broken file: the folder it is in says what it is
        # meant to be (so that a lookup by name can say why it cannot be used).
        kind = folder_kind
    rel = path.relative_to(folder) if path != folder else Path(path.name)
    name = rel.with_suffix("").as_posix() if path.is_file() else rel.as_posix()
    return ModelEntry(kind, path, name, info, root)


def resolve_name(text: str, kind: str, catalog: Catalog | None) -> str:
    """A path that exists, or a hub id, stays as it is; otherwise ``text`` is looked up by name."""
    if catalog is None or not catalog.roots or Path(text).expanduser().exists():
        return text
    try:
        return str(catalog.find(text, kind).path)
    except ModelLookupError:
        if re.fullmatch(r"[\w.-]+/[\w.-]+(/.+)?", text) and not _HASHED.match(text):
            return text  # may be a hub id: the loader says what it found
        raise
