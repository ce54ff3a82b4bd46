"""``imprompt models``: what the model folders hold, by kind, and what cannot be used and why.

No torch is imported for safetensors files (their headers say enough), so the listing starts fast;
A1111's short hashes are computed once and cached beside the files (:mod:`imprompt.models.hashes`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import TextIO

from ..config import option
from .catalog import KINDS, Catalog, ModelEntry, roots_from

LABELS = {"checkpoint": "Checkpoints", "adapter": "IP-Adapters", "image_encoder": "Image encoders", "lora": "LoRAs",
          "embedding": "Embeddings", "controlnet": "ControlNets", "vae": "VAEs"}


@dataclass
class ModelsConfig:
    models_dir: list[str] = field(default_factory=list, metadata=option(
        "root of an AUTOMATIC1111 / Forge / ComfyUI install, or any folder of models; repeat for several "
        "(default: $IMPROMPT_MODELS_DIR)", metavar="DIR"))
    kind: str | None = field(default=None, metadata=option("list only this kind", choices=list(KINDS)))
    json: bool = field(default=False, metadata=option("print as JSON"))
    hashes: bool = field(default=True, metadata=option(
        "show A1111's short hash (sha256 of the file; computed once, then cached beside it)"))
    pickles: bool = field(default=False, metadata=option(
        "also open .ckpt/.pt/.bin files (weights only, never running code) to tell what they are; slow"))


def _describe(entry: ModelEntry) -> str:
    details = ", ".join(f"{k}: {v}" for k, v in entry.info.details.items() if v is not None and k != "format")
    base = f"[{entry.info.base}] " if entry.info.base else ""
    return f"{base}{details}".strip()


def list_models(config: ModelsConfig, out: TextIO | None = None) -> Catalog:
    out = out or sys.stdout  # looked up per call (tests and the server replace it)
    roots = roots_from(config.models_dir)
    if not roots:
        raise ValueError("no model folders: give --models-dir DIR (an A1111, Forge or ComfyUI root, or any folder "
                         "of models), or set IMPROMPT_MODELS_DIR")
    catalog = Catalog.scan(roots, allow_pickle=config.pickles)
    entries = [e for e in catalog.entries if config.kind is None or e.kind == config.kind]
    hashes = {}
    if config.hashes:
        from .hashes import short_hash

        hashes = {e.path: short_hash(e.path) for e in entries if e.path.is_file() and e.usable}
    if config.json:
        rows = [{**e.to_dict(), "hash": hashes.get(e.path)} for e in entries]
        json.dump({"roots": [str(r) for r in roots], "models": rows}, out, indent=2)
        out.write("\n")
        return catalog
    for kind in KINDS:
        found = [e for e in entries if e.kind == kind and e.usable]
        if found:
            out.write(f"{LABELS[kind]} ({len(found)}):\n")
            for e in found:
                tag = f" [{hashes[e.path]}]" if e.path in hashes else ""
                out.write(f"  {e.name}{tag}  {_describe(e)}\n")
    unusable = [e for e in entries if not e.usable]
    if unusable:
        out.write(f"Not usable ({len(unusable)}):\n")
        for e in unusable:
            out.write(f"  {e.path}: {e.info.problem or 'not a model imprompt reads'}\n")
    if not entries:
        out.write(f"no models found in {', '.join(map(str, roots))}\n")
    return catalog
