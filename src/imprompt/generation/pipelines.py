"""Loading a Stable Diffusion / SDXL model as the diffusers pipeline a task needs.

A model is a local diffusers folder or a Hugging Face hub id. Hub ids are resolved through
huggingface_hub's cache first with ``local_files_only`` (so a cached model works offline), and only
then downloaded. SD1.5 vs SDXL is diffusers' AutoPipeline's business: it reads ``model_index.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    ControlNetModel,
)

Task = Literal["text2img", "img2img", "inpaint"]
TASKS: tuple[str, ...] = ("text2img", "img2img", "inpaint")
_AUTO = {"text2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model(path_or_id: str | os.PathLike, kind: str = "model") -> Path:
    """A local folder, or a hub id resolved to its snapshot in the huggingface_hub cache."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        raise ModelNotFoundError(f"{kind} {text!r} is not a folder; give a diffusers folder or a hub id such as 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(text))
    except Exception as err:  # network errors come in many types; the message says what to do
        raise ModelNotFoundError(
            f"{kind} {text!r} is not in the Hugging Face cache and could not be downloaded ({type(err).__name__}); "
            "download it once with network access, or pass a local diffusers folder"
        ) from err


def resolve_file(path_or_ref: str | os.PathLike) -> Path:
    """A local file, or 'org/repo/path/in/repo.safetensors' from the hub cache (then the hub)."""
    path = Path(path_or_ref)
    if path.is_file():
        return path
    parts = str(path_or_ref).split("/")
    if path.exists() or len(parts) < 3 or str(path_or_ref).startswith((".", "/")):
        raise ModelNotFoundError(f"file {str(path_or_ref)!r} does not exist")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as err:
            raise ModelNotFoundError(
                f"{str(path_or_ref)!r} is neither a local file nor cached from the hub, and could not be downloaded "
                f"({type(err).__name__})"
            ) from err


def load_pipeline(model: str | os.PathLike, task: Task = "text2img", *, controlnet: str | os.PathLike | None = None,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The diffusers pipeline for ``task`` (SD1.5 or SDXL, with a ControlNet if given)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    folder = resolve_model(model)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(f"{str(folder)!r} has no model_index.json; it is not a diffusers pipeline folder")
    components = json.loads(index.read_text())
    kwargs = {}
    if "safety_checker" in components:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if controlnet is not None:
        kwargs["controlnet"] = ControlNetModel.from_pretrained(resolve_model(controlnet, "controlnet"), torch_dtype=dtype)
    pipe = _AUTO[task].from_pretrained(folder, torch_dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
