"""Evaluation sets: reference images with captions, from a folder or from the toy world.

* A folder of ``name.png`` (or .jpg / .jpeg / .webp) + ``name.txt`` (the caption), read in name order.
* ``toy:SPLIT``: :func:`imprompt.toy.judge.reference_set`, seed 0, the first N images of the toy build's
  own split folder, with their ground-truth attributes (so generations can be read and scored).
* ``toy:drawn-SPLIT``: the same attributes drawn by :mod:`imprompt.toy.drawn` at strength 1 (references
  drawn by other means), with the same edits.

In the toy world each reference also gets an *edit*: a short text that changes one attribute
(``"<colour> background"`` or ``"a <colour> <shape>"``), the plan of :func:`imprompt.toy.judge.edit_plan`,
used by the image + text evaluation.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ..files import UnsafeFileError, read_regular_file
from ..images import ImageInputError, load_image
from ..toy.judge import SPLITS, Attributes, Edit, reference_set

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
MAX_CAPTION_BYTES = 1 << 20  # a caption is a line of text


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    if split.startswith("drawn-"):  # the same attributes, drawn by another rasteriser (imprompt.toy.drawn)
        from ..toy.drawn import drawn_samples
        from ..toy.judge import edit_plan

        base = split[len("drawn-"):]
        if base not in SPLITS:
            raise ValueError(f"toy evaluation set 'toy:{split}': the split must be drawn-<one of {', '.join(SPLITS)}>")
        samples = drawn_samples(base, n)
        return [Reference(f"{split}-{i:04d}", s.image, s.caption, s.attributes, edit)
                for i, (s, edit) in enumerate(zip(samples, edit_plan([s.attributes for s in samples])))]
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
    references: list[Reference] = []
    skipped: list[str] = []
    for path in images:
        if len(references) == n:
            break
        caption_file = path.with_suffix(".txt")
        if not caption_file.exists():
            raise ValueError(f"{path.name} has no caption: {caption_file.name} is missing from {folder}")
        try:
            # As in training data: only regular, size-capped files; an unreadable image or a bomb is
            # skipped and counted, and the next one takes its place.
            caption = read_regular_file(caption_file, MAX_CAPTION_BYTES, what="caption").decode("utf-8").strip()
            image = load_image(path)
        except (ImageInputError, UnsafeFileError, UnicodeDecodeError) as err:
            skipped.append(f"{path.name}: {err}")
            continue
        references.append(Reference(path.stem, image, caption))
    if skipped:
        log(f"skipped {len(skipped)} unusable reference(s) in {folder}; first: {skipped[0]}")
    if len(references) < n:
        raise ValueError(f"evaluation set {str(folder)!r} has {len(references)} usable images ({len(skipped)} skipped), "
                         f"fewer than references={n}; set --references {len(references)} or fewer")
    return references
