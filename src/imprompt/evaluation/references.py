"""Evaluation sets: reference images with captions, from a folder or from the toy world.

* A folder of ``name.png`` (or .jpg / .jpeg / .webp) + ``name.txt`` (the caption), read in name order.
* ``toy:SPLIT``: :func:`imprompt.toy.judge.reference_set`, seed 0, the first N images of the toy build's
  own split folder, with their ground-truth attributes (so generations can be read and scored).

In the toy world each reference also gets an *edit*: a short text that changes one attribute
(``"<colour> background"`` or ``"a <colour> <shape>"``), the plan of :func:`imprompt.toy.judge.edit_plan`,
used by the image + text evaluation.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ..encoding import load_image
from ..toy.judge import SPLITS, Attributes, Edit, reference_set

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Reference:
    name: str
    image: Image.Image
    caption: str
    attributes: Attributes | None = None  # toy world only
    edit: Edit | None = None  # toy world only

    @property
    def multimodal_text(self) -> str:
        """The text that goes with the image in the image + text evaluation."""
        return self.edit.text if self.edit is not None else self.caption

    def to_dict(self) -> dict:
        out = {"name": self.name, "caption": self.caption, "multimodal_text": self.multimodal_text,
               "attributes": asdict(self.attributes) if self.attributes else None}
        if self.edit is not None:
            out["edit"] = {"changed": self.edit.changed, "text": self.edit.text, "expected": asdict(self.edit.expected)}
        return out


def load_references(data: str, n: int) -> list[Reference]:
    """The first ``n`` references of an evaluation set (see the module docstring for the formats)."""
    if data.startswith("toy:"):
        return toy_references(data[len("toy:"):], n)
    return folder_references(data, n)


def toy_references(split: str, n: int) -> list[Reference]:
    if split not in SPLITS:
        raise ValueError(f"toy evaluation set 'toy:{split}': the split must be one of {', '.join(SPLITS)}")
    # Seed 0: the same images as the toy build's split folder.
    return [Reference(f"{split}-{i:04d}", s.image, s.caption, s.attributes, edit)
            for i, (s, edit) in enumerate(reference_set(split, n))]


def folder_references(folder: str | os.PathLike, n: int) -> list[Reference]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"evaluation set {str(folder)!r} is neither toy:test / toy:heldout nor a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise ValueError(f"evaluation set {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(images) < n:
        raise ValueError(f"evaluation set {str(folder)!r} has {len(images)} images, fewer than references={n}; "
                         f"set --references {len(images)} or fewer")
    references = []
    for path in images[:n]:
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            raise ValueError(f"{path.name} has no caption: {caption_file.name} is missing from {folder}")
        caption = caption_file.read_text(encoding="utf-8").strip()
        references.append(Reference(path.stem, load_image(path), caption))
    return references
