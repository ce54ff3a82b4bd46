"""The toy build's work folder: a folder per stage, its ``done.json``, and readers of what stages wrote.

Layout (``work`` is ``BuildConfig.work``)::

    data/{train,val,test,heldout}/   name.png + name.txt + metadata.jsonl per split, and data/<split>.npy
    tokenizer/                       the CLIP tokenizer
    clip/model, vae/model, unet/model   trained models (clip/, vae/, unet/ also hold checkpoint.pt)
    latents/cache.pt                 VAE latents and text states of the train split
    robust_clip/model                the CLIP with its vision tower made robust (robust_clip/augmented.npy:
                                     the loosened train pictures it learned from)
    pipeline/                        the diffusers pipeline, and pipeline/image_encoder (robust_clip's vision tower)
    adapter/run, simple_adapter/run  imprompt.training output folders (ip_adapter.safetensors)
    controlnet/model                 the toy ControlNet (diffusers folder; controlnet/ also holds checkpoint.pt)
    controlnet_compose/model         the same fine-tuned with the adapter in the loop (what the package ships)
    <stage>/done.json                written when a stage finishes: what it did and scored
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..files import write_text
from . import shapes


def done_info(work: Path, stage: str) -> dict | None:
    """What a finished stage recorded, or ``None`` if it has not finished."""
    path = work / stage / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mark_done(work: Path, stage: str, info: dict) -> None:
    write_text(work / stage / "done.json", json.dumps(info, indent=2, default=str))


def image_encoder(work: Path) -> Path:
    return work / "pipeline" / "image_encoder"


def controlnet_folder(work: Path, stage: str) -> Path:
    """The ControlNet a ControlNet stage (``controlnet`` or ``controlnet_compose``) saved."""
    return work / stage / "model"


def adapter_file(work: Path, stage: str) -> Path:
    """The adapter trained by an adapter stage (``adapter`` or ``simple_adapter``)."""
    return work / stage / "run" / "ip_adapter.safetensors"


def load_images(work: Path, split: str) -> np.ndarray:
    """A split's images as one (N, 32, 32, 3) uint8 array."""
    return np.load(work / "data" / f"{split}.npy")


def load_metadata(work: Path, split: str) -> list[tuple[str, str, shapes.Attributes]]:
    return shapes.read_metadata(work / "data" / split)


def load_tokenizer(work: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(work / "tokenizer")


def frozen_text_encoder(work: Path):
    """The trained CLIP's text tower as the pipeline's ``CLIPTextModel``."""
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(work / "clip" / "model")
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPTextModel is the transformer itself
    return text.eval()
