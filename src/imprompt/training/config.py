"""The training configuration: one typed dataclass, read from YAML, every field also a CLI flag."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter.variants import TRAINING_VARIANTS as VARIANTS
from ..config import load_config as _load_config, option as _m


@dataclass
class TrainConfig:
    model: str = field(default="", metadata=_m("base model (frozen): a diffusers folder, hub id, single-file checkpoint, "
                                                "or a name in --models-dir"))
    image_encoder: str = field(default="", metadata=_m("CLIP vision encoder (frozen): a transformers folder, a single file "
                                                        "(ComfyUI clip_vision, clip_h.pth), or a name in --models-dir"))
    models_dir: list[str] = field(default_factory=list, metadata=_m(
        "an AUTOMATIC1111 / Forge / ComfyUI root or a folder of models, where --model and --image-encoder names "
        "are looked up; repeat for several (default: $IMPROMPT_MODELS_DIR)", metavar="DIR"))
    model_config: str | None = field(default=None, metadata=_m(
        "for a single-file --model of a custom architecture: a diffusers folder whose configs to use", metavar="FOLDER"))
    data: str = field(default="", metadata=_m("training data: a folder of name.jpg + name.txt, a JSON/JSONL list "
                                              "({'image_file', 'text'}, optionally 'reference_file': the image "
                                              "prompt if not the image), or webdataset tar shards (path or URL, "
                                              "{000..099} braces)"))
    data_root: str | None = field(default=None, metadata=_m("folder the JSON list's image_file paths are relative to"))
    output_dir: str = field(default="runs/adapter", metadata=_m("where checkpoints, logs and the exported adapter go"))
    variant: str = field(default="linear", metadata=_m("linear (4 tokens, pooled embedding), plus (Resampler), full (MLP), "
                                                       "shared (image tokens appended to the text tokens; paper 4.4.1)",
                                                       choices=list(VARIANTS)))
    init_adapter: str | None = field(default=None, metadata=_m(
        "an IP-Adapter checkpoint to start from instead of random weights (the official script's "
        "--pretrained_ip_adapter_path): fine-tune a released or earlier adapter on this data; it must be of the "
        "variant this run builds (same UNet, encoder, tokens)", metavar="FILE"))
    num_tokens: int | None = field(default=None, metadata=_m("image tokens (default: 4 linear/shared, 16 plus)"))
    resampler_depth: int = field(default=4, metadata=_m("Resampler layers (plus)"))
    resampler_width: int | None = field(default=None, metadata=_m("Resampler width, a multiple of 64 (default: the UNet's cross-attention width, at most 1280, as the official plus models)"))
    lr_warmup_steps: int = field(default=0, metadata=_m("linear learning-rate warm-up steps (then constant, as the official scripts)"))
    cpu: bool = field(default=False, metadata=_m("train on the CPU even if an accelerator is present"))
    record_data: bool = field(default=False, metadata=_m("write the keys each process trained on to OUTPUT_DIR (audit / tests)"))
    resolution: int = field(default=512, metadata=_m("training resolution (square)"))
    center_crop: bool = field(default=True, metadata=_m("centre crop (else a random crop, chosen once per image when caching)"))
    batch_size: int = field(default=8, metadata=_m("batch size per process"))
    gradient_accumulation: int = field(default=1, metadata=_m("micro-batches per optimizer step"))
    max_steps: int = field(default=1000, metadata=_m("optimizer steps"))
    learning_rate: float = field(default=1e-4, metadata=_m("AdamW learning rate (paper: 1e-4)"))
    weight_decay: float = field(default=0.01, metadata=_m("AdamW weight decay (paper: 0.01)"))
    drop_image: float = field(default=0.05, metadata=_m("probability of dropping the image alone"))
    drop_text: float = field(default=0.05, metadata=_m("probability of dropping the text alone"))
    drop_both: float = field(default=0.05, metadata=_m("probability of dropping both"))
    mixed_precision: str = field(default="no", metadata=_m("accelerate mixed precision", choices=["no", "fp16", "bf16"]))
    seed: int = field(default=42, metadata=_m("seed for data order, noise, timesteps and dropout"))
    cache: bool = field(default=True, metadata=_m("cache VAE latents, text states and image features once"))
    cache_dir: str | None = field(default=None, metadata=_m("feature cache folder (default: OUTPUT_DIR/cache)"))
    checkpoint_every: int = field(default=500, metadata=_m("write a checkpoint every N steps"))
    keep_checkpoints: int = field(default=3, metadata=_m("how many checkpoints to keep"))
    resume: str | None = field(default=None, metadata=_m("'latest' or a checkpoint folder to resume from"))
    log_every: int = field(default=10, metadata=_m("log every N steps"))
    tensorboard: bool = field(default=False, metadata=_m("write TensorBoard logs to OUTPUT_DIR/logs"))
    sample_every: int = field(default=0, metadata=_m("every M steps, generate from the sample images into a contact sheet (0: never)"))
    sample_images: list[str] = field(default_factory=list, metadata=_m("reference images for the sample sheets", metavar="PATH"))
    sample_steps: int = field(default=20, metadata=_m("denoising steps of the sample generations"))
    progress: bool = field(default=True, metadata=_m("show a progress bar"))

    def check(self) -> None:
        for name in ("model", "image_encoder", "data"):
            if not getattr(self, name):
                raise ValueError(f"training needs --{name.replace('_', '-')} (or '{name}:' in the config file)")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.init_adapter is not None:
            if self.variant == "shared":
                raise ValueError("--init-adapter starts a decoupled adapter from a checkpoint; the shared variant "
                                 "(paper 4.4.1) has no such checkpoints")
            if not Path(self.init_adapter).is_file():
                raise ValueError(f"--init-adapter {self.init_adapter!r}: no such file (give an IP-Adapter .safetensors "
                                 "or .bin)")
        probabilities = (self.drop_image, self.drop_text, self.drop_both)
        if any(p < 0 for p in probabilities) or sum(probabilities) > 1:
            raise ValueError(f"dropout probabilities must be >= 0 and sum to at most 1, got {probabilities}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        for name in ("batch_size", "gradient_accumulation", "max_steps", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def tokens(self) -> int:
        return self.num_tokens or (16 if self.variant == "plus" else 4)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A config from a YAML file (optional), with command-line values taking precedence (every value
    coerced to its field's type: :func:`imprompt.config.load_config`)."""
    return _load_config(TrainConfig, path, overrides)
