"""Draws docs/weight-types.png: every weight type's per-block weight for the SD1.5 and SDXL UNets.

    PYTHONPATH=src python docs/make_weight_types_plot.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from imprompt.adapter.weight_types import COMFY_BLOCKS, layer_weights
from imprompt.evaluation.plot import Panel, Point, line_plot

KINDS = ("ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output", "weak middle",
         "strong middle", "style transfer", "composition", "strong style transfer", "style and composition",
         "style transfer precise", "composition precise")


def panel(kind: str) -> Panel:
    """One weight type, both layouts. A swapped ("precise") block is drawn below zero: there the
    reference acts as the negative."""
    series = {}
    for layout, blocks in COMFY_BLOCKS.items():
        layers = [f"{b}.transformer_blocks.0.attn2" for b in blocks]
        weights = layer_weights(kind, layers, layout, 1.0, composition_weight=0.5)
        series[layout] = [Point(t, -weights[name].weight if weights[name].swap else weights[name].weight)
                          for t, name in enumerate(layers)]
    return Panel(kind, series)


def main() -> None:
    title = "Weight types at weight 1 (composition weight 0.5); below 0 = swapped (precise)"
    rows = [line_plot([panel(k) for k in KINDS[i:i + 4]], "block index", panel_size=(200, 130),
                      title=title if i == 0 else "")
            for i in range(0, len(KINDS), 4)]
    image = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        image.paste(row, (0, y))
        y += row.height
    image.save(Path(__file__).parent / "weight-types.png", optimize=True)


if __name__ == "__main__":
    main()
