"""The text and sampling settings of a generation, declared once for the library, CLI, and server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationSettings:
    """The text and sampling side of a generation (the image side is a list of ImagePrompt)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 30
    guidance: float = 7.5  # the paper's setting
    seed: int | None = None
    width: int | None = None  # None: the model's default size (or the init image's)
    height: int | None = None
    num_images: int = 1
    scheduler: str | None = None  # None: the scheduler saved with the model
    strength: float = 0.8  # img2img / inpainting: how much of the init image is re-noised
    controlnet_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # passed to the pipeline call as is

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
