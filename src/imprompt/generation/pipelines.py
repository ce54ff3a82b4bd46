"""Loading a Stable Diffusion / SDXL model as the diffusers pipeline a task needs.

A model is a local diffusers folder or a Hugging Face hub id. Hub ids are resolved through
huggingface_hub's cache first with ``local_files_only`` (so a cached model works offline), and only
then downloaded. SD1.5 vs SDXL is diffusers' AutoPipeline's business: it reads ``model_index.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import diffusers
import torch

from ..adapter.variants import CheckpointError

Task = Literal["text2img", "img2img", "inpaint"]
TASKS: tuple[str, ...] = ("text2img", "img2img", "inpaint")

# (model family, ControlNet or not) -> the diffusers pipeline class of each task. Named explicitly
# rather than through AutoPipeline, which imports every pipeline diffusers has (seconds, and
# transformers' warnings about image processors of models we never use).
_PIPELINES: dict[tuple[str, bool], dict[str, str]] = {
    ("sd", False): {"text2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                    "inpaint": "StableDiffusionInpaintPipeline"},
    ("sd", True): {"text2img": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline",
                   "inpaint": "StableDiffusionControlNetInpaintPipeline"},
    ("sdxl", False): {"text2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                      "inpaint": "StableDiffusionXLInpaintPipeline"},
    ("sdxl", True): {"text2img": "StableDiffusionXLControlNetPipeline",
                     "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
                     "inpaint": "StableDiffusionXLControlNetInpaintPipeline"},
}
# model_index.json's _class_name -> family; any of a family's pipelines saved the folder.
FAMILIES = {name: family for (family, _), tasks in _PIPELINES.items() for name in tasks.values()}


def pipeline_class(class_name: str, task: Task, controlnet: bool = False):
    """The diffusers class for ``task`` on a model saved by pipeline ``class_name``."""
    family = FAMILIES.get(class_name)
    if family is None:
        auto = {"text2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
                "inpaint": "AutoPipelineForInpainting"}[task]
        return getattr(diffusers, auto)  # another family: let diffusers map it
    return getattr(diffusers, _PIPELINES[(family, controlnet)][task])


class ModelNotFoundError(FileNotFoundError):
    pass


def _hub_id_candidate(text: str) -> bool:
    """Could ``text`` be a hub id ('org/name')? Only if it is also not plainly a local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        return False
    # 'models/image_encoder' where ./models exists is a local path that is missing, not a hub id.
    if Path(text.split("/")[0]).exists():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _missing_local(kind: str, text: str, what: str = "folder") -> str:
    return f"{kind} {text!r} does not exist (no {what} {str(Path(text).absolute())!r})"


def resolve_model(path_or_id: str | os.PathLike, kind: str = "model") -> Path:
    """A local folder, or a hub id resolved to its snapshot in the huggingface_hub cache.

    A missing local path is reported as such; only a name that could be a hub id ('org/name', its
    first part not a local folder) is looked up on the hub, and the message then names both.
    """
    path = Path(path_or_id)
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise ModelNotFoundError(f"{kind} {text!r} is a file, not a folder; give a model folder or a hub id such as 'org/name'")
    if not _hub_id_candidate(text):
        raise ModelNotFoundError(_missing_local(kind, text) + "; check the path")
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
            f"{_missing_local(kind, text)}, and as a Hugging Face hub id it is not in the cache and could not "
            f"be downloaded ({type(err).__name__}); check the path, or download the model once with network access"
        ) from err


def resolve_file(path_or_ref: str | os.PathLike, kind: str = "file") -> Path:
    """A local file, or 'org/repo/path/in/repo.safetensors' from the hub cache (then the hub)."""
    path = Path(path_or_ref)
    if path.is_file():
        return path
    text = str(path_or_ref)
    if path.is_dir():
        raise ModelNotFoundError(f"{kind} {text!r} is a folder; give the checkpoint file in it")
    if path.exists():
        raise ModelNotFoundError(f"{kind} {text!r} is not a regular file")
    parts = text.split("/")
    if len(parts) < 3 or not _hub_id_candidate("/".join(parts[:2])):
        raise ModelNotFoundError(_missing_local(kind, text, "file") + "; check the path")
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
                f"{_missing_local(kind, text, 'file')}, and as a Hugging Face hub file ({repo}: {filename}) it is "
                f"not in the cache and could not be downloaded ({type(err).__name__}); check the path"
            ) from err


def check_device(name: str | torch.device) -> torch.device:
    """The torch device ``name``, or ValueError saying why it cannot be used here (before any loading)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {str(name)!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}.get(device.type)
    if backend is None:
        raise ValueError(f"device {str(name)!r} is not supported; use cpu, cuda, cuda:N or mps")
    if not backend.is_available():
        build = f"torch {torch.__version__}"
        raise ValueError(f"device {str(name)!r} is not available here ({build} finds no {device.type.upper()} device); "
                         "use device 'cpu', or install a torch build for your accelerator")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {str(name)!r}: only {count} {device.type} device(s) here (0 to {count - 1})")
    return device


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: the first of CUDA, MPS and the CPU that is available; any other name is checked."""
    if str(name) != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: float16 on a GPU (what the checkpoints are published in, half the memory), float32 on
    the CPU (where float16 matmuls are slow or missing)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]


OFFLOAD_MODES: tuple[str, ...] = ("model", "sequential")


@dataclass(frozen=True)
class MemoryOptions:
    """diffusers' own switches for big models on small GPUs."""

    attention_slicing: bool = False  # attention in slices: less peak memory, a little slower
    vae_tiling: bool = False  # decode (and encode) large images tile by tile
    cpu_offload: str | None = None  # "model": one component on the GPU at a time; "sequential": one layer

    def check(self, device: torch.device) -> None:
        if self.cpu_offload is not None:
            if self.cpu_offload not in OFFLOAD_MODES:
                raise ValueError(f"cpu offload must be one of {', '.join(OFFLOAD_MODES)}, got {self.cpu_offload!r}")
            if device.type == "cpu":
                raise ValueError("--cpu-offload moves weights between the CPU and a GPU; it needs a GPU device "
                                 "(the models already run on the CPU here)")

    def apply(self, pipe, device: torch.device):
        if self.attention_slicing:
            pipe.enable_attention_slicing()
        if self.vae_tiling:
            pipe.vae.enable_tiling()
        if self.cpu_offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif self.cpu_offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        return pipe


def load_pipeline(model: str | os.PathLike, task: Task = "text2img", *,
                  controlnet: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  memory: MemoryOptions = MemoryOptions(), model_config: str | os.PathLike | None = None):
    """The diffusers pipeline for ``task`` (SD1.5 or SDXL, with a ControlNet if given; several, as a list,
    run as diffusers' MultiControlNetModel).

    ``model`` is a diffusers folder, a hub id, or a single-file checkpoint (``.safetensors``, or a
    ``.ckpt`` read weights-only) as A1111 and ComfyUI keep them (:mod:`imprompt.models.single_file`;
    ``model_config``: a diffusers folder whose configs to use instead of the shipped ones).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    device = pick_device(device)
    memory.check(device)
    if Path(model).is_file():
        from ..models.single_file import load_single_file_pipeline

        pipe = load_single_file_pipeline(model, task, controlnet=controlnet, dtype=dtype, model_config=model_config)
        pipe.set_progress_bar_config(disable=True)
        return memory.apply(pipe, device)
    folder = resolve_model(model)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(f"{str(folder)!r} has no model_index.json; it is not a diffusers pipeline folder")
    components = json.loads(index.read_text())
    kwargs = {}
    if "safety_checker" in components:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if controlnet:
        kwargs["controlnet"] = load_controlnets(controlnet, dtype, unet_config=folder / "unet" / "config.json")
    cls = pipeline_class(str(components.get("_class_name", "")), task, bool(controlnet))
    pipe = cls.from_pretrained(folder, dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return memory.apply(pipe, device)


def load_controlnets(controlnets: str | os.PathLike | Sequence[str | os.PathLike], dtype: torch.dtype,
                     unet_config: str | os.PathLike | None = None):
    """One ControlNet (a path) or several (a list of two or more, which the pipeline wraps in
    MultiControlNetModel); a list of one is that one ControlNet, so one --controlnet runs as before."""
    if isinstance(controlnets, (str, os.PathLike)):
        return load_controlnet(controlnets, dtype, unet_config)
    nets = [load_controlnet(c, dtype, unet_config) for c in controlnets]
    return nets[0] if len(nets) == 1 else nets


def load_controlnet(controlnet: str | os.PathLike, dtype: torch.dtype, unet_config: str | os.PathLike | None = None):
    """A ControlNet from a diffusers folder, a hub id, or a single file (original ``control_model.*``
    layout or diffusers keys; ``.pth`` read weights-only).

    ``unet_config``: the config.json of the UNet it will steer. A single file's config is made from it, and
    a ControlNet for another base (its cross-attention width differs) is refused here rather than failing
    with a shape error in the middle of the first step.
    """
    unet = json.loads(Path(unet_config).read_text()) if unet_config and Path(unet_config).is_file() else None
    if Path(controlnet).is_file():
        from ..models.single_file import load_single_file_controlnet

        return load_single_file_controlnet(controlnet, dtype, unet_config=unet)
    net = diffusers.ControlNetModel.from_pretrained(resolve_model(controlnet, "controlnet"), dtype=dtype)
    if unet is not None and net.config.cross_attention_dim != unet.get("cross_attention_dim"):
        raise CheckpointError(f"the ControlNet {str(controlnet)!r} has cross-attention width "
                              f"{net.config.cross_attention_dim}, but the model's UNet has "
                              f"{unet.get('cross_attention_dim')}; use a ControlNet made for the model's base")
    return net
