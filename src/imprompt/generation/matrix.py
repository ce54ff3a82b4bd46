"""AUTOMATIC1111's prompt matrix (``scripts/prompt_matrix.py``): ``a cat|in the snow|at night`` keeps the
first part and draws every combination of the others (2^(n-1) prompts), all with the same seed, then lays
them out in one labelled grid. Combination ``i`` holds part ``k + 1`` when bit ``k`` of ``i`` is set; the
grid has 2^(m // 2) rows (m the number of optional parts), so columns switch the first parts and rows the
last ones, as in A1111.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from ..sheets import contact_sheet

MAX_PARTS = 8  # 2^8 = 256 prompts already


def matrix_prompts(prompt: str, delimiter: str = ", ") -> list[str]:
    """Every prompt of the matrix, in A1111's order (combination 0: the first part alone)."""
    parts = prompt.split("|")
    optional = [p.strip().strip(",").strip() for p in parts[1:]]
    if not optional:
        raise ValueError("--prompt-matrix needs a prompt with parts separated by '|', e.g. 'a cat|in the snow|at night'")
    if len(optional) > MAX_PARTS:
        raise ValueError(f"--prompt-matrix: {len(optional)} optional parts make {2 ** len(optional)} prompts; "
                         f"use at most {MAX_PARTS}")
    first = parts[0].strip()
    prompts = []
    for combination in range(2 ** len(optional)):
        chosen = [text for k, text in enumerate(optional) if combination & (1 << k)]
        prompts.append(delimiter.join(filter(None, [first, *chosen])))
    return prompts


def grid_shape(optional_parts: int) -> tuple[int, int]:
    """(rows, columns) of the grid, as A1111 lays it out."""
    rows = 1 << (optional_parts // 2)
    return rows, (2 ** optional_parts) // rows


def _label(parts: Sequence[str], bits: int) -> str:
    on = [f"+{p}" for k, p in enumerate(parts) if bits & (1 << k)]
    return " ".join(on) or "(none)"


def matrix_grid(prompt: str, images: Sequence[Image.Image], cell: int = 128) -> Image.Image:
    """The labelled grid of the matrix's images (one per combination, in :func:`matrix_prompts` order)."""
    optional = [p.strip().strip(",").strip() for p in prompt.split("|")[1:]]
    rows, columns = grid_shape(len(optional))
    if len(images) != rows * columns:
        raise ValueError(f"a matrix of {len(optional)} parts has {rows * columns} images, got {len(images)}")
    column_bits = columns.bit_length() - 1
    column_parts, row_parts = optional[:column_bits], optional[column_bits:]
    grid_rows = [list(images[r * columns:(r + 1) * columns]) for r in range(rows)]
    return contact_sheet(grid_rows, [_label(row_parts, r) for r in range(rows)] if row_parts else None,
                         [_label(column_parts, c) for c in range(columns)], cell=cell)
