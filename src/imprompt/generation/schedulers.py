"""Scheduler choice by name, with the names AUTOMATIC1111 writes in its PNG info."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import diffusers


@dataclass(frozen=True)
class SchedulerChoice:
    cls: str  # diffusers class name
    a1111: str  # "Sampler" as A1111 writes it
    options: Mapping[str, Any] = field(default_factory=dict)


SCHEDULERS: Mapping[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler", "DDIM"),
    # A1111's PLMS is PNDM without its Runge-Kutta warm-up steps (SD1.5's own scheduler config sets
    # this too); with them, fewer than 4 steps crash and other models' configs lack the flag.
    "pndm": SchedulerChoice("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    "euler": SchedulerChoice("EulerDiscreteScheduler", "Euler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SchedulerChoice("HeunDiscreteScheduler", "Heun"),
    "lms": SchedulerChoice("LMSDiscreteScheduler", "LMS"),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "dpmpp_sde": SchedulerChoice("DPMSolverSinglestepScheduler", "DPM++ SDE"),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", "UniPC"),
}


def make_scheduler(name: str, config):
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    choice = SCHEDULERS[name]
    return getattr(diffusers, choice.cls).from_config(config, **choice.options)


def sampler_name(scheduler) -> str:
    """The A1111 sampler name of a scheduler instance (its class name if it has none)."""
    cls = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for choice in SCHEDULERS.values():
        if choice.cls == cls and bool(choice.options.get("use_karras_sigmas", False)) == karras:
            return choice.a1111
    return cls
