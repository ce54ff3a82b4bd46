"""Scoring: CLIP embeddings for CLIP-I / CLIP-T, and the toy world's attribute checks.

The CLIP metrics themselves are the pure functions of :mod:`imprompt.evaluation.metrics`; this module
only turns images and texts into embeddings (cached for texts, so each caption is embedded once). The
toy world's attribute checks are :mod:`imprompt.toy.judge`'s (the one definition of a hit), named
here for the rest of the evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..toy.judge import CONTENT, attribute_hits, edit_hits, is_shared_tower_clip, load_scoring_clip

__all__ = ["CONTENT", "ClipScorer", "attribute_hits", "edit_hits"]


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
        from transformers import AutoTokenizer, CLIPImageProcessorPil as CLIPImageProcessor, CLIPModel

        folder = Path(path)
        missing = [name for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json")
                   if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"scoring CLIP {str(folder)!r} lacks {', '.join(missing)}; it must hold a transformers "
                             "CLIPModel saved with its CLIPImageProcessor and tokenizer (save_pretrained of all three)")
        if is_shared_tower_clip(folder):  # the toy package's CLIP, sharing the pipeline's towers
            model = load_scoring_clip(folder, dtype).to(device)
        else:
            model = CLIPModel.from_pretrained(folder, dtype=dtype).to(device)
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
