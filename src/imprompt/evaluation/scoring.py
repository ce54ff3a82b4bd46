"""Scoring: CLIP embeddings for CLIP-I / CLIP-T, and the toy world's attribute checks.

The CLIP metrics themselves are the pure functions of :mod:`imprompt.evaluation.metrics`; this module
only turns images and texts into embeddings (cached for texts, so each caption is embedded once) and
generated toy images into attribute hits with :func:`imprompt.toy.reader.read_many`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..toy.shapes import Attributes

# The attributes that make up a toy image's content; size and position are placement (the image + text
# check compares content, as imprompt.toy.quality does).
CONTENT: tuple[str, ...] = ("shape", "color", "background", "style")


class ClipScorer:
    """A transformers CLIPModel with its image processor and tokenizer; embeddings on the CPU in float32."""

    def __init__(self, model, processor, tokenizer, batch_size: int = 64):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._texts: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "ClipScorer":
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from ..toy.models import TOWERS_FILE, load_shared_tower_clip

        folder = Path(path)
        missing = [name for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json")
                   if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"scoring CLIP {str(folder)!r} lacks {', '.join(missing)}; it must hold a transformers "
                             "CLIPModel saved with its CLIPImageProcessor and tokenizer (save_pretrained of all three)")
        if (folder / TOWERS_FILE).is_file():  # the toy package's CLIP, sharing the pipeline's towers
            model = load_shared_tower_clip(folder, dtype).to(device)
        else:
            model = CLIPModel.from_pretrained(folder, torch_dtype=dtype).to(device)
        return cls(model, CLIPImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))

    @property
    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, d) projected image embeddings (what CLIPModel.get_image_features returns)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt").pixel_values.to(self._param)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) projected text embeddings; each distinct text is embedded once and cached."""
        new = sorted({t for t in texts if t not in self._texts})
        for start in range(0, len(new), self.batch_size):
            chunk = new[start:start + self.batch_size]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt").to(self._param.device)
            pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
            embeds = self.model.text_projection(pooled).float().cpu()
            self._texts.update(zip(chunk, embeds))
        return torch.stack([self._texts[t] for t in texts])


def attribute_hits(read: Attributes, truth: Attributes) -> dict[str, bool]:
    """Per attribute, whether the generation shows the reference's value; ``all``: every one does."""
    hits = {name: getattr(read, name) == getattr(truth, name) for name in Attributes.__dataclass_fields__}
    hits["all"] = all(hits.values())
    return hits


def edit_hits(read: Attributes, reference: Attributes, changed: str, expected: Attributes) -> dict[str, bool]:
    """Image + text: the changed attribute follows the text; the other content attributes the reference.

    ``expected`` is the reference with the text's change; ``<name>_as_asked`` says, per content
    attribute, whether the generation shows the expected value (the same keys whichever one changed).
    """
    follows = getattr(read, changed) == getattr(expected, changed)
    keeps = all(getattr(read, name) == getattr(reference, name) for name in CONTENT if name != changed)
    return {"follows_text": follows, "keeps_reference": keeps, "both": follows and keeps,
            **{f"{name}_as_asked": getattr(read, name) == getattr(expected, name) for name in CONTENT}}
