"""Contact sheets: a grid of images with labels, for samples, demos and evaluation reports."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def contact_sheet(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None = None,
                  column_labels: Sequence[str] | None = None, cell: int = 128, pad: int = 4) -> Image.Image:
    """Images in rows (each resized to ``cell`` px, nearest-neighbour so small images stay crisp)."""
    font = ImageFont.load_default()
    columns = max(len(r) for r in rows)
    label_w = 0 if not row_labels else 8 + max(int(font.getlength(t)) for t in row_labels)
    head_h = 16 if column_labels else 0
    sheet = Image.new("RGB", (label_w + columns * (cell + pad) + pad, head_h + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(column_labels or []):
        draw.text((label_w + pad + c * (cell + pad), 2), text, fill="black", font=font)
    for r, row in enumerate(rows):
        y = head_h + pad + r * (cell + pad)
        if row_labels:
            draw.text((4, y + cell // 2 - 6), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + pad + c * (cell + pad), y))
    return sheet
