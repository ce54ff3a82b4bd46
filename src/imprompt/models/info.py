"""What imprompt knows about one model file, as the readers of :mod:`imprompt.models` report it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

Shapes = Mapping[str, tuple[int, ...]]

KINDS = ("checkpoint", "unet", "adapter", "image_encoder", "lora", "embedding", "controlnet", "vae", "unknown")

# Cross-attention width (the text encoder's output) -> the Stable Diffusion generation it belongs to.
BASE_BY_CROSS_WIDTH = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}


def base_of_width(width: int | None) -> str | None:
    """The Stable Diffusion generation whose text encoder is ``width`` wide, or None."""
    return BASE_BY_CROSS_WIDTH.get(width) if width else None


@dataclass(frozen=True)
class ModelInfo:
    """What a model file is.

    ``kind``: one of :data:`KINDS`. ``base``: "SD1.5", "SD2", "SDXL", or None when the file does not
    say (a VAE) or is for none of them. ``details``: a few facts for display, by kind (see the
    detectors; ``format`` is the key layout). ``problem``: None, or why the file cannot be used.
    A pickle not opened is kind "unknown" with no problem (``details["format"] == "pickle"``).
    """

    kind: str
    base: str | None = None
    details: dict[str, Any] = field(default_factory=dict, hash=False)
    problem: str | None = None

    def describe(self) -> str:
        """One line: ``adapter SD1.5 (variant plus, num_tokens 16, ...)``, or the problem."""
        if self.kind == "unknown" and self.problem is None and self.details.get("format") == "pickle":
            return "unknown (pickle, inspected on use)"
        shown = ", ".join(f"{k} {v}" for k, v in self.details.items()
                          if v is not None and v is not False and k not in ("format", "encoder_needed"))
        text = " ".join(filter(None, [self.kind, self.base, f"({shown})" if shown else ""]))
        return f"{text}: {self.problem}" if self.problem else text
