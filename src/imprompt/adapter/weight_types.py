"""Weight types: per-layer weight curves of an image prompt, as ComfyUI_IPAdapter_plus names them.

Each curve is a pure function of where a cross-attention layer sits in the UNet. The facts come from
ComfyUI_IPAdapter_plus (``ipadapter_execute`` builds the per-block weight tables, its
``CrossAttentionPatch`` applies the ease / weak / strong curves and the "precise" swaps):

* ComfyUI numbers the UNet's attention blocks (one ``SpatialTransformer`` each, with all its transformer
  layers) in forward order: input (down) blocks, the middle block, output (up) blocks. That is
  ``t_idx``; ``n`` is their count, 16 for SD1.5 and 11 for SDXL. :data:`COMFY_BLOCKS` is that numbering
  in diffusers' block names, so a layer's position is looked up by its name.
* ease in: ``0.05 + 0.95 * (1 - t/n)``; ease out: ``0.05 + 0.95 * t/n``; ease in-out:
  ``0.05 + 0.95 * (1 - |t - n/2| / (n/2))``; reverse in-out: ``0.05 + 0.95 * |t - n/2| / (n/2)``.
* weak input / weak middle / weak output: that block group (down / mid / up) times 0.2; strong middle:
  down and up times 0.2.
* style transfer, composition, strong style transfer, style and composition and the two "precise" types
  are tables ``t_idx -> weight``; blocks missing from a table get weight 0.
* "precise" types also swap the image tokens in some blocks: there the unconditional batch rows get
  the reference's tokens and the conditional rows get zero tokens (``uncond = cond; cond = cond * 0``),
  so classifier-free guidance pushes *away* from the reference in those blocks. style transfer precise
  does it in the composition blocks, composition precise everywhere else.

``composition_weight`` is ComfyUI's ``weight_composition`` (the style weight is the prompt's scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

WEIGHT_TYPES: tuple[str, ...] = (
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output", "weak middle",
    "strong middle", "style transfer", "composition", "strong style transfer", "style and composition",
    "style transfer precise", "composition precise",
)

# ComfyUI's transformer_index -> diffusers attention block, for the real SD1.5 and SDXL UNets.
COMFY_BLOCKS: Mapping[str, tuple[str, ...]] = {
    "SD1.5": (
        "down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.1.attentions.0",
        "down_blocks.1.attentions.1", "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
        "mid_block.attentions.0",
        *(f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in (0, 1, 2)),
    ),
    "SDXL": (
        "down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.2.attentions.0",
        "down_blocks.2.attentions.1", "mid_block.attentions.0",
        *(f"up_blocks.{b}.attentions.{a}" for b in (0, 1) for a in (0, 1, 2)),
    ),
}

# The composition blocks (InstantStyle's layout block and, for SD1.5, the block before it at 1/4 weight).
_COMPOSITION = {"SD1.5": (4, 5), "SDXL": (3,)}
_STYLE_SD15 = (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)


@dataclass(frozen=True)
class LayerWeight:
    """An image prompt's weight at one layer; ``swap`` = unconditional rows get the reference's
    tokens and conditional rows zero tokens (the "precise" weight types)."""

    weight: float
    swap: bool = False


def attention_block(layer: str) -> str:
    """'up_blocks.1.attentions.2.transformer_blocks.0.attn2' -> 'up_blocks.1.attentions.2'."""
    return layer.split(".transformer_blocks")[0]


def block_index(layer: str, layout: str) -> int:
    """ComfyUI's ``t_idx`` of a layer: its attention block's place in :data:`COMFY_BLOCKS`."""
    if layout not in COMFY_BLOCKS:
        raise ValueError(f"weight types are defined for {sorted(COMFY_BLOCKS)} UNets, not for {layout!r}")
    block = attention_block(layer)
    if block not in COMFY_BLOCKS[layout]:
        raise ValueError(f"{layer} is not in the {layout} block layout that weight types are defined on "
                         f"({', '.join(COMFY_BLOCKS[layout])}); use weight type 'linear' or --layers for this UNet")
    return COMFY_BLOCKS[layout].index(block)


def _table(weight_type: str, layout: str, w: float, wc: float) -> dict[int, float]:
    """The per-block tables of ipadapter_execute (w: the weight, wc: the composition weight)."""
    sdxl = layout == "SDXL"
    n = len(COMFY_BLOCKS[layout])
    if weight_type == "style transfer":
        return {6: w} if sdxl else {i: w for i in _STYLE_SD15}
    if weight_type == "composition":
        return {3: w} if sdxl else {4: w * 0.25, 5: w}
    if weight_type == "strong style transfer":
        keep = (0, 1, 2, 4, 5, 6, 7, 8, 9, 10) if sdxl else (0, 1, 2, 3, *range(6, 16))
        return {i: w for i in keep}
    if weight_type in ("style and composition", "style transfer precise"):
        return {3: wc, 6: w} if sdxl else {**{i: w for i in _STYLE_SD15}, 4: wc * 0.25, 5: wc}
    if weight_type == "composition precise":
        if sdxl:
            return {**{i: w * 0.1 for i in range(n)}, 3: wc, 6: w}
        return {**{i: w for i in range(n)}, 4: wc * 0.25, 5: wc, 6: w * 0.1, 7: w * 0.1, 8: w * 0.1}
    raise ValueError(f"unknown weight type {weight_type!r}")


def _swapped(weight_type: str, layout: str, t: int) -> bool:
    if weight_type == "style transfer precise":
        return t in _COMPOSITION[layout]
    if weight_type == "composition precise":
        return t not in _COMPOSITION[layout]
    return False


def check_weight_type(name: str) -> str:
    """The canonical name ('style_transfer' -> 'style transfer'), or a ValueError listing them."""
    canonical = name.strip().lower().replace("_", " ")
    if canonical not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {name!r}; choose one of: {', '.join(WEIGHT_TYPES)}")
    return canonical


def layer_weights(weight_type: str, layers: Sequence[str], layout: str, weight: float,
                  composition_weight: float | None = None) -> dict[str, LayerWeight]:
    """Each layer's weight (and swap) under ``weight_type``; ``layers`` are attention layer names.

    ``linear`` gives ``weight`` to every layer unchanged (so it equals no weight type at all); the
    others need the SD1.5 or SDXL block layout (``layout``, from :func:`imprompt.adapter.attach.unet_layout`).
    """
    weight_type = check_weight_type(weight_type)
    if weight_type == "linear":
        return {name: LayerWeight(weight) for name in layers}
    wc = weight if composition_weight is None else composition_weight
    n = len(COMFY_BLOCKS.get(layout, ()))
    out = {}
    for name in layers:
        t = block_index(name, layout)
        group = name.split("_")[0]  # 'down', 'mid' or 'up' (down_blocks / mid_block / up_blocks)
        w = weight
        if weight_type == "ease in":
            w = weight * (0.05 + 0.95 * (1 - t / n))
        elif weight_type == "ease out":
            w = weight * (0.05 + 0.95 * (t / n))
        elif weight_type == "ease in-out":
            w = weight * (0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2)))
        elif weight_type == "reverse in-out":
            w = weight * (0.05 + 0.95 * (abs(t - n / 2) / (n / 2)))
        elif weight_type.startswith(("weak ", "strong middle")):
            weak = {"weak input": ("down",), "weak middle": ("mid",), "weak output": ("up",),
                    "strong middle": ("down", "up")}[weight_type]
            w = weight * 0.2 if group in weak else weight
        else:
            w = _table(weight_type, layout, weight, wc).get(t, 0.0)
        out[name] = LayerWeight(w, swap=w != 0 and _swapped(weight_type, layout, t))
    return out
