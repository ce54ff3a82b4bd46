"""Per-layer weights of an adapter: which cross-attention layers the image prompt acts in.

InstantStyle (Wang et al., 2024, arXiv 2404.02733) found that in SDXL one transformer block carries
style (``up_blocks.0.attentions.1``) and another the spatial layout (``down_blocks.2.attentions.1``);
injecting the image prompt only there transfers style without content, or composition without style.
Here that is data: a ``LayerScales`` maps block-name prefixes to weights, and presets are values.

SD1.5 choice, since InstantStyle's blocks are SDXL names: we pick the blocks at the same place in the
network. Both SDXL blocks run at 1/4 of the latent resolution; in SD1.5 that resolution is
``up_blocks.1`` (style) and ``down_blocks.2`` (composition). SD1.5 has a single transformer layer per
attention, so the whole block is used rather than its middle attention: one layer is too weak a
signal on its own. This is also what InstantStyle's own SD1.5 example targets for style (``up_blocks.1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class LayerScales:
    """Weight per block prefix; the longest matching prefix wins, other layers get ``default``."""

    blocks: Mapping[str, float] = field(default_factory=dict)
    default: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", MappingProxyType(dict(self.blocks)))

    def weight(self, layer: str) -> float:
        matches = [p for p in self.blocks if layer == p or layer.startswith(p + ".")]
        return self.blocks[max(matches, key=len)] if matches else self.default

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in self.blocks.items()]
        return ";".join(parts + [f"default={self.default:g}"])


_STYLE = {"SD1.5": "up_blocks.1", "SDXL": "up_blocks.0.attentions.1"}
_COMPOSITION = {"SD1.5": "down_blocks.2", "SDXL": "down_blocks.2.attentions.1"}

PRESETS: Mapping[str, Mapping[str, LayerScales]] = {
    "all": {f: LayerScales() for f in _STYLE},
    "style": {f: LayerScales({b: 1.0}, default=0.0) for f, b in _STYLE.items()},
    "composition": {f: LayerScales({b: 1.0}, default=0.0) for f, b in _COMPOSITION.items()},
    "style_and_composition": {
        f: LayerScales({_STYLE[f]: 1.0, _COMPOSITION[f]: 1.0}, default=0.0) for f in _STYLE
    },
}


def preset(name: str, layout: str) -> LayerScales:
    if name not in PRESETS:
        raise ValueError(f"unknown layer preset {name!r}; choose one of {sorted(PRESETS)} or give 'block=weight,...'")
    if layout not in PRESETS[name]:
        raise ValueError(f"layer preset {name!r} is defined for {sorted(PRESETS[name])}, not for a {layout} UNet")
    return PRESETS[name][layout]


def parse_layer_scales(text: str, layout: str) -> LayerScales:
    """``style`` / ``composition`` / ``all``, or ``up_blocks.0.attentions.1=1,default=0``."""
    if "=" not in text:
        return preset(text, layout)
    blocks: dict[str, float] = {}
    default = 1.0
    for item in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"layer weight {item!r}: expected 'block=number', e.g. 'up_blocks.1=0.5'") from None
        if name == "default":
            default = number
        else:
            blocks[name] = number
    return LayerScales(blocks, default)
