"""Text diffs: edit an image prompt with two texts, in CLIP's joint space (DALL-E 2's "text diffs").

Ramesh et al. 2022 (arXiv 2204.06125, "Hierarchical Text-Conditional Image Generation with CLIP Latents",
section 3.3) change an image by moving its CLIP image embedding z_i towards the *difference* of two text
embeddings: given a text z_t0 that describes the image as it is and a text z_t of the change,
z_d = norm(z_t - z_t0), and the decoder reads z_theta = slerp(z_i, z_d, theta), theta from 0 (the image)
to about 0.5. IP-Adapter's base adapters (and light, and the toy's linear adapter) read exactly such an
embedding: CLIPVisionModelWithProjection's ``image_embeds``, which lives in the space CLIP's text tower
projects into. So a text diff tells the image prompt itself what to change ("blue background" ->
"green background"), instead of leaving the text prompt to fight the reference for that attribute.
Measured on the toy world in docs/toy-results.md (section 3).

Only the conditional features move; the unconditional ("no image") side stays, as it is not an image.
The edited embedding keeps the original's length (the slerp runs on unit vectors): the adapter was
trained on CLIP's unnormalised embeddings. Adapters that read hidden states (plus, full-face, FaceID-Plus)
have no text counterpart, so a text diff is refused for them.

The text tower must be the image encoder's own CLIP (same training, same joint space): the ViT-H text
tower for SD1.5 IP-Adapters, ViT-bigG's for ``ip-adapter_sdxl`` (that one is SDXL's ``text_encoder_2``,
found in the pipeline), the toy CLIP for the toy world. Its projection width must equal the image
embedding's; a tower from another CLIP of the same width cannot be detected and gives meaningless edits.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..adapter.variants import CheckpointError

ARROW = "->"
DEFAULT_STRENGTH = 0.3  # DALL-E 2 shows 0.25-0.5; on the toy world 0.25-0.35 are alike, 0.3 best (docs/toy-results.md)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between the unit vectors of ``a`` (rows) and ``b`` (one vector or rows):
    the unit vector a fraction ``t`` of the way along the great circle from a to b. Nearly parallel
    vectors (angle below 1e-4 rad) fall back to a normalised linear interpolation."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = (b / b.norm(dim=-1, keepdim=True)).expand_as(a)
    cos = (a * b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = sin.abs() > 1e-4
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.where(
        safe, sin, torch.ones_like(sin))
    linear = (1 - t) * a + t * b
    out = torch.where(safe, spherical, linear)
    return out / out.norm(dim=-1, keepdim=True)


@dataclass(frozen=True)
class TextDiff:
    """One image prompt's edit: the unit ``direction`` norm(z_target - z_source) in CLIP's joint space and
    the slerp fraction ``strength`` (DALL-E 2's theta). ``source`` / ``target`` are the texts, for the
    PNG info; :func:`text_diff` makes one from them with a :class:`TextTower`."""

    direction: torch.Tensor
    strength: float = DEFAULT_STRENGTH
    source: str = ""
    target: str = ""

    def check(self, width: int | None = None) -> None:
        if not (math.isfinite(self.strength) and 0.0 <= self.strength <= 1.0):
            raise ValueError(f"a text diff's strength is a fraction 0 to 1 (DALL-E 2 uses 0.25-0.5), "
                             f"got {self.strength}")
        if self.direction.ndim != 1:
            raise ValueError(f"a text diff's direction is one vector, got shape {tuple(self.direction.shape)}")
        if width is not None and self.direction.shape[0] != width:
            raise ValueError(
                f"the text diff's text embeddings are {self.direction.shape[0]} wide but the image embeddings are "
                f"{width} wide: a text diff needs the text tower of the image encoder's own CLIP")

    def apply(self, embeds: torch.Tensor) -> torch.Tensor:
        """(units, width) image embeddings -> the same, each moved ``strength`` of the way to the direction,
        at its own length."""
        self.check(embeds.shape[-1])
        if self.strength == 0.0:
            return embeds
        direction = self.direction.to(device=embeds.device, dtype=torch.float32)
        moved = slerp(embeds.float(), direction, self.strength) * embeds.float().norm(dim=-1, keepdim=True)
        return moved.to(embeds.dtype)

    def describe(self) -> str:
        return f"{self.source} {ARROW} {self.target} ({self.strength:g})"


def check_takes_text_diff(variant, index: int) -> None:
    """Refuse an adapter whose projection reads something other than CLIP image embeddings."""
    if variant.encoder_output == "image_embeds":
        return
    reads = "face-ID embeddings" if variant.is_faceid else "the image encoder's hidden states"
    raise ValueError(f"a text diff edits CLIP image embeddings, but adapter {index} is a {variant.display_name} "
                     f"adapter, which reads {reads}: they have no text counterpart; use a base (or light) adapter")


def parse_text_diff(text: str) -> tuple[str, str]:
    """'a blue car -> a red car' -> ('a blue car', 'a red car'). The source may be empty (from CLIP's
    empty text: the target's direction alone); the target may not."""
    if text.count(ARROW) != 1:
        raise ValueError(f"expected 'FROM {ARROW} TO' (the text that describes the reference, then the text of "
                         f"the change), e.g. 'blue background {ARROW} green background'; got {text!r}")
    source, target = (part.strip() for part in text.split(ARROW))
    if not target:
        raise ValueError(f"the text diff {text!r} has no target text after {ARROW!r}")
    return source, target


class TextTower:
    """A CLIP text tower with its projection and tokenizer: texts -> (n, projection width) embeddings."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer

    @property
    def width(self) -> int:
        return int(self.model.config.projection_dim)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "TextTower":
        """A folder with a CLIP text model with projection (``clip_text_model`` with ``text_projection``
        weights, as SDXL's ``text_encoder_2``) or a whole CLIP model (``clip``: its text half is loaded),
        with its tokenizer in the folder or in ``tokenizer/``; or the toy package's shared-tower CLIP."""
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

        path = Path(path)
        expected = ("expected the CLIP text tower of the adapter's image encoder: a folder with a whole CLIP model "
                    "(config.json model_type 'clip', e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K for SD1.5 "
                    "IP-Adapters) or a CLIP text model with projection and its tokenizer")
        if (path / "towers.json").is_file():  # the toy package's scoring CLIP (imprompt.toy.models)
            from ..toy.models import load_shared_tower_clip

            clip = load_shared_tower_clip(path, dtype)
            return cls(_ProjectedText(clip), CLIPTokenizer.from_pretrained(path))
        if not (path / "config.json").is_file():
            raise CheckpointError(f"no CLIP text tower at {str(path)!r} (no config.json); {expected}")
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"text tower {str(path)!r}: cannot read config.json ({err}); {expected}") from None
        kind = config.get("model_type") if isinstance(config, dict) else None
        if kind == "clip":  # the text half of a whole CLIP; its projection width is the model's
            text = dict(config.get("text_config") or {})
            text["projection_dim"] = config.get("projection_dim", text.get("projection_dim", 512))
            text_config = CLIPTextConfig(**{k: v for k, v in text.items() if k != "model_type"})
        elif kind == "clip_text_model":
            if "CLIPTextModelWithProjection" not in (config.get("architectures") or []):
                raise CheckpointError(f"{str(path)!r} is a CLIP text model without projection (SD1.5's text encoder, "
                                      f"whose hidden states are not in the image embeddings' space); {expected}")
            text_config = None
        else:
            raise CheckpointError(f"{str(path)!r} holds {kind or 'an unknown model'!r}, not a CLIP text tower; "
                                  f"{expected}")
        try:
            model = CLIPTextModelWithProjection.from_pretrained(path, config=text_config, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot load the CLIP text tower at {str(path)!r}: {first[:300]}") from None
        tokenizer_dir = path if (path / "tokenizer_config.json").is_file() or (path / "vocab.json").is_file() \
            else path / "tokenizer"
        try:
            tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        except (OSError, ValueError, TypeError) as err:
            raise CheckpointError(f"no CLIP tokenizer for the text tower at {str(path)!r} ({str(err)[:200]}); give a "
                                  "folder with tokenizer files beside config.json or in tokenizer/") from None
        return cls(model, tokenizer)

    @classmethod
    def from_pipeline(cls, pipe, width: int) -> "TextTower | None":
        """The pipeline's own text tower with projection of this width (SDXL's ``text_encoder_2``, ViT-bigG:
        the tower of ``ip-adapter_sdxl``'s image encoder), or None."""
        for encoder, tokenizer in (("text_encoder_2", "tokenizer_2"), ("text_encoder", "tokenizer")):
            model, tok = getattr(pipe, encoder, None), getattr(pipe, tokenizer, None)
            if model is None or tok is None or type(model).__name__ != "CLIPTextModelWithProjection":
                continue
            if int(model.config.projection_dim) == width:
                return cls(model, tok)
        return None

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, width) projected text embeddings, float32 on the CPU."""
        param = next(self.model.parameters())
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        out = self.model(input_ids=tokens.input_ids.to(param.device),
                         attention_mask=tokens.attention_mask.to(param.device))
        return out.text_embeds.float().cpu()


class _ProjectedText(torch.nn.Module):
    """A whole CLIPModel seen as a text model with projection (its ``text_embeds``)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    def forward(self, input_ids, attention_mask=None):
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return CLIPTextModelOutput(text_embeds=self.clip.text_projection(pooled))


def text_diff(tower: TextTower, source: str, target: str, strength: float = DEFAULT_STRENGTH) -> TextDiff:
    """The :class:`TextDiff` from ``source`` (describes the reference as it is) to ``target`` (as it
    should be), DALL-E 2's z_d = norm(z_target - z_source) with CLIP's unit text embeddings."""
    embeds = tower.embed([source, target])
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    difference = embeds[1] - embeds[0]
    if difference.norm() < 1e-6:
        raise ValueError(f"the text diff {source!r} {ARROW} {target!r} has no direction: CLIP embeds both texts "
                         "alike; name what should change")
    diff = TextDiff(difference / difference.norm(), strength, source, target)
    diff.check()
    return diff
