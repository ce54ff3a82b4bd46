"""The text and sampling settings of a generation, declared once for the library, CLI, and server.

Each field's ``option`` metadata is its command-line help: ``imprompt generate`` builds its flags
from these fields (through :class:`imprompt.generation.request.GenerateRequest`, which adds only what
to load and where to write), so a setting is declared, defaulted and checked in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import option
from .schedulers import SCHEDULERS

# Sane bounds, so that a typo fails in a second with a message instead of after an hour or an
# out-of-memory error: 1000 is every scheduler's training schedule length; 8192 pixels is beyond
# what SD1.5 / SDXL generate coherently (generate smaller and upscale).
MAX_STEPS = 1000
MAX_SIDE = 8192
MAX_IMAGES = 1000
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


@dataclass
class GenerationSettings:
    """The text and sampling side of a generation (the image side is a list of ImagePrompt)."""

    prompt: str = field(default="", metadata=option("text prompt"))
    negative_prompt: str = field(default="", metadata=option("negative text prompt"))
    steps: int = field(default=30, metadata=option("denoising steps"))
    guidance: float = field(default=7.5, metadata=option("classifier-free guidance scale"))  # the paper's setting
    image_guidance: float | None = field(default=None, metadata=option(
        "a guidance scale of its own for the image prompts (InstructPix2Pix's two-conditioning guidance; the "
        "text then gets --guidance from the image-prompted prediction); default: one scale for both"))
    seed: int | None = field(default=None, metadata=option(
        "random seed, 0 to 2**64-1 (image i of a run uses SEED+i, as AUTOMATIC1111 does; SEED alone gives what "
        "diffusers gives with torch.Generator('cpu').manual_seed(SEED)); random if not given"))
    width: int | None = field(default=None, metadata=option("image width, a multiple of 8 (default: the model's)"))
    height: int | None = field(default=None, metadata=option("image height, a multiple of 8 (default: the model's)"))
    num_images: int = field(default=1, metadata=option(f"images to generate (at most {MAX_IMAGES})"))
    scheduler: str | None = field(default=None, metadata=option(
        "scheduler (default: the model's own)", choices=list(SCHEDULERS)))
    strength: float = field(default=0.8, metadata=option(
        "img2img / inpainting strength: how much of the init image is re-noised, in (0, 1]"))
    # Library only: per ControlNet (a list for several), as diffusers' controlnet_conditioning_scale /
    # control_guidance_start / control_guidance_end. The command line's per-ControlNet flags are
    # GenerateRequest's (imprompt.generation.controls).
    controlnet_scale: float | list[float] = 1.0
    control_guidance_start: float | list[float] = 0.0
    control_guidance_end: float | list[float] = 1.0
    # Library only (no option metadata, so no command-line flag): passed to the pipeline call as is.
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ValueError naming the setting, the value and what is allowed."""
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be 1 to {MAX_STEPS}, got {self.steps}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise ValueError(f"num_images must be 1 to {MAX_IMAGES}, got {self.num_images}; "
                             "run several times for more")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= MAX_SIDE and value % 8 == 0):
                raise ValueError(f"{name} must be a positive multiple of 8 up to {MAX_SIDE}, got {value}")
        for name in ("guidance", "image_guidance", "strength", "controlnet_scale", "control_guidance_start",
                     "control_guidance_end"):
            value = getattr(self, name)
            for item in value if isinstance(value, (list, tuple)) else [] if value is None else [value]:
                if not math.isfinite(item):
                    raise ValueError(f"{name} must be a finite number, got {item}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be 0 to 2**64-1 ({MAX_SEED}), got {self.seed}; "
                             "leave it out for a random seed")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
