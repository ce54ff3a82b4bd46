"""Which image encoder an adapter needs, and where to find it.

An adapter's projection says which encoder width it reads (``image_embeds`` 768 / 1024 / 1280 for
ViT-L / ViT-H / ViT-bigG; penultimate hidden states 1024 / 1280 / 1664), and that decides: the
official file names agree with it (``*_vit-h`` → ViT-H, ``ip-adapter_sdxl`` and ``ip-adapter_sd15_vit-G``
→ ViT-bigG, the other SD1.5 adapters → ViT-H), and a pairing that contradicts it is what users meet as
"size mismatch for proj.weight". Candidates, in order: the official layout beside the adapter
(``image_encoder/`` there, then ``models/image_encoder`` and ``sdxl_models/image_encoder`` one folder up,
since ``sdxl_models/ip-adapter_sdxl_vit-h`` needs the ViT-H in ``models/``), then the image encoders found
in the model folders (ComfyUI's ``models/clip_vision``, the ControlNet extension's ``clip_vision``). The
first of the needed family wins; none: a message naming the encoder and where the tools keep it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..adapter.variants import AdapterVariant, CheckpointError
from .catalog import Catalog

# (encoder output, width) -> family
FAMILIES = {("image_embeds", 768): "ViT-L", ("image_embeds", 1024): "ViT-H", ("image_embeds", 1280): "ViT-bigG",
            ("penultimate_hidden", 1024): "ViT-L", ("penultimate_hidden", 1280): "ViT-H",
            ("penultimate_hidden", 1664): "ViT-bigG"}
# The files the tools download, for the message when none is found.
WELL_KNOWN = {
    "ViT-H": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (ComfyUI models/clip_vision), the official "
             "h94/IP-Adapter models/image_encoder, or clip_h.pth (A1111 ControlNet extension)",
    "ViT-bigG": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors (ComfyUI models/clip_vision), the official "
                "h94/IP-Adapter sdxl_models/image_encoder, or clip_g.pth (A1111 ControlNet extension)",
    "ViT-L": "openai/clip-vit-large-patch14's vision tower (clip_vision/clip-vit-large-patch14.safetensors)",
}
_NAME_HINTS = ((re.compile(r"bigg|vit-g\b|clip_g\b|_g\.pth$", re.I), "ViT-bigG"),
               (re.compile(r"vit-h|clip_h\b|_h\.pth$", re.I), "ViT-H"), (re.compile(r"vit-l", re.I), "ViT-L"))


def encoder_widths(path: Path) -> tuple[int, int | None] | None:
    """(hidden width, projection width or None) of an encoder folder or safetensors file, from its
    config or header (no weights read); None if that cannot be told without loading it."""
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        vision = config.get("vision_config", config)
        hidden = vision.get("hidden_size")
        return (hidden, config.get("projection_dim", vision.get("projection_dim"))) if hidden else None
    if path.suffix.lower() != ".safetensors":
        return None
    from .inspect import read_header

    try:
        header, _ = read_header(path)
    except (ValueError, OSError):
        return None
    shapes = {k: tuple(shape) for k, (_, shape) in header.items()}
    if "vision_model.post_layernorm.weight" in shapes:
        projection = shapes.get("visual_projection.weight")
        return shapes["vision_model.post_layernorm.weight"][0], projection[0] if projection else None
    if "visual.ln_post.weight" in shapes:
        projection = shapes.get("visual.proj")
        return shapes["visual.ln_post.weight"][0], projection[1] if projection else None
    return None


def fits(path: Path, variant: AdapterVariant) -> bool | None:
    """Whether the encoder at ``path`` gives what ``variant`` reads; None if it cannot be told unopened."""
    widths = encoder_widths(path)
    if widths is not None:
        hidden, projection = widths
        return (projection if variant.encoder_output == "image_embeds" else hidden) == variant.image_embed_dim
    for pattern, family in _NAME_HINTS:  # a pickle is not opened to pair it: its name says
        if pattern.search(path.name):
            return family == FAMILIES.get((variant.encoder_output, variant.image_embed_dim))
    return None


def describe(path: Path) -> str:
    widths = encoder_widths(path)
    return f"hidden width {widths[0]}" if widths else "width unknown"


def official_candidates(adapter_file: Path) -> list[Path]:
    up = adapter_file.parent.parent
    return [adapter_file.parent / "image_encoder", up / "models" / "image_encoder", up / "sdxl_models" / "image_encoder"]


def find_encoder(adapter_file: Path, variant: AdapterVariant, catalog: Catalog | None = None) -> Path:
    """The image encoder ``variant`` needs, beside ``adapter_file`` or among the catalog's encoders."""
    candidates = [p for p in official_candidates(adapter_file) if p.is_dir()]
    if catalog is not None:
        candidates += [e.path for e in catalog.of_kind("image_encoder") if e.usable]
    seen = []
    for path in candidates:
        if fits(path, variant):
            return path
        seen.append(f"{path} ({describe(path)})")
    family = FAMILIES.get((variant.encoder_output, variant.image_embed_dim))
    wanted = f"a {family} image encoder" if family else f"an image encoder with {variant.encoder_output} width {variant.image_embed_dim}"
    where = "; found only " + ", ".join(seen) if seen else ""
    get = f" Get {WELL_KNOWN[family]}, put it" if family else " Put one"
    raise CheckpointError(f"adapter {adapter_file.name} needs {wanted} and none was found{where}.{get} beside the "
                          "adapter or in a --models-dir, or pass --image-encoder PATH")
