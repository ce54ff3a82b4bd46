"""Line plots drawn with PIL (no plotting dependency): metric against a setting, one line per method.

Each panel has its own y range (CLIP-I and CLIP-T live on different scales), points with their
confidence intervals as error bars, and one shared legend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194))


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    low: float | None = None
    high: float | None = None


@dataclass
class Panel:
    title: str
    series: dict[str, Sequence[Point]] = field(default_factory=dict)


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _range(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    pad = (high - low) * 0.05 or 0.05
    return low - pad, high + pad


def line_plot(panels: Sequence[Panel], x_label: str, title: str = "", panel_size: tuple[int, int] = (360, 260)) -> Image.Image:
    """Panels side by side; the same series label gets the same colour in every panel."""
    font = ImageFont.load_default()
    labels = list(dict.fromkeys(label for panel in panels for label in panel.series))
    colour = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)}
    left, right, top, bottom = 52, 16, 40 if title else 24, 40
    width, height = panel_size
    legend_h = 16 * len(labels) + 8
    image = Image.new("RGB", (len(panels) * (width + left + right) + 8, top + height + bottom + legend_h), "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((8, 6), title, fill="black", font=font)

    for p, panel in enumerate(panels):
        x0 = 8 + p * (width + left + right) + left
        y0 = top
        points = [pt for series in panel.series.values() for pt in series]
        xs = _nice_ticks(min(pt.x for pt in points), max(pt.x for pt in points))
        ys = _nice_ticks(*_range([v for pt in points for v in (pt.y, pt.low, pt.high) if v is not None]))
        x_min, x_max, y_min, y_max = xs[0], xs[-1], ys[0], ys[-1]

        inset = 12  # keep points at the ends of the x range off the frame

        def px(x: float) -> float:
            return x0 + inset + (x - x_min) / (x_max - x_min) * (width - 2 * inset)

        def py(y: float) -> float:
            return y0 + height - (y - y_min) / (y_max - y_min) * height

        draw.text((x0, y0 - 16), panel.title, fill="black", font=font)
        for y in ys:
            draw.line([(x0, py(y)), (x0 + width, py(y))], fill=(225, 225, 225))
            draw.text((x0 - left + 4, py(y) - 6), f"{y:.3g}", fill="black", font=font)
        for x in xs:
            draw.line([(px(x), y0 + height), (px(x), y0 + height + 4)], fill="black")
            draw.text((px(x) - 8, y0 + height + 6), f"{x:g}", fill="black", font=font)
        draw.rectangle([x0, y0, x0 + width, y0 + height], outline="black")
        draw.text((x0 + width // 2 - 3 * len(x_label), y0 + height + 22), x_label, fill="black", font=font)
        for label, series in panel.series.items():
            pts = sorted(series, key=lambda pt: pt.x)
            c = colour[label]
            if len(pts) > 1:
                draw.line([(px(pt.x), py(pt.y)) for pt in pts], fill=c, width=2)
            for pt in pts:
                if pt.low is not None and pt.high is not None and math.isfinite(pt.low) and math.isfinite(pt.high):
                    draw.line([(px(pt.x), py(pt.low)), (px(pt.x), py(pt.high))], fill=c, width=1)
                    for y in (pt.low, pt.high):
                        draw.line([(px(pt.x) - 3, py(y)), (px(pt.x) + 3, py(y))], fill=c, width=1)
                draw.ellipse([px(pt.x) - 3, py(pt.y) - 3, px(pt.x) + 3, py(pt.y) + 3], fill=c)

    legend_y = top + height + bottom
    for i, label in enumerate(labels):
        y = legend_y + 16 * i
        draw.line([(8 + left, y + 6), (8 + left + 24, y + 6)], fill=colour[label], width=3)
        draw.text((8 + left + 32, y), label, fill="black", font=font)
    return image
