"""A LoRA extracted from the difference of two models (kohya-ss sd-scripts' ``extract_lora_from_models``).

For each Linear and convolution of the UNet (and, optionally, the text encoder) the fine-tuned weight
minus the base weight is factored by a truncated SVD, ``dW ~ U_r S_r V_r^T``, and written in kohya's
naming (``lora_unet_<module path with _>.lora_up.weight`` = U_r S_r, ``.lora_down.weight`` = V_r^T,
``.alpha`` = r, so the multiplier is the only scale), which A1111, ComfyUI, diffusers and imprompt read.
A rank-r factorisation keeps the r directions of largest change; :class:`Extracted` reports how much
of the difference (relative Frobenius norm) each part keeps, so a user can pick the rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import option


@dataclass
class ExtractConfig:
    # BASE and TUNED are the command's positional arguments (imprompt extract-lora BASE TUNED)
    base: str = ""
    tuned: str = ""
    rank: int = field(default=8, metadata=option("rank of the Linear layers' factors"))
    conv_rank: int = field(default=0, metadata=option(
        "rank of the 3x3 convolutions' factors (LoCon); 0: Linear and 1x1 layers only, as a plain LoRA"))
    text_encoder: bool = field(default=False, metadata=option("also extract the text encoder's difference"))
    min_change: float = field(default=1e-6, metadata=option(
        "skip layers whose weights changed less than this (relative norm): they stay as in the base"))
    output: str = field(default="", metadata=option("the LoRA .safetensors to write"))

    def check(self) -> None:
        if not self.base or not self.tuned or not self.output:
            raise ValueError("imprompt extract-lora needs BASE, TUNED and --output")
        if self.rank < 1 or self.conv_rank < 0:
            raise ValueError(f"rank must be at least 1 and conv_rank at least 0, got {self.rank} / {self.conv_rank}")
        if not Path(self.output).name.endswith(".safetensors"):
            raise ValueError(f"--output must be a .safetensors file, got {self.output!r}")


@dataclass
class Extracted:
    tensors: dict[str, torch.Tensor]
    kept: dict[str, float]  # part -> share of the difference's squared norm the factors keep
    layers: int


def factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [out, r(, 1, 1)], down [r, in(, k, k)], kept share of ||delta||^2) of a Linear or conv delta."""
    out_features = delta.shape[0]
    matrix = delta.reshape(out_features, -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.shape[0])
    up, down = u[:, :r] * s[:r], vh[:r]
    kept = float((s[:r] ** 2).sum() / (s ** 2).sum().clamp_min(1e-300))
    if delta.ndim == 4:
        up, down = up.reshape(out_features, r, 1, 1), down.reshape(r, *delta.shape[1:])
    return up.float(), down.float(), kept


def extract(base: torch.nn.Module, tuned: torch.nn.Module, prefix: str, rank: int, conv_rank: int,
            min_change: float = 1e-6) -> tuple[dict[str, torch.Tensor], float, int]:
    """kohya tensors for every layer of ``tuned`` that differs from ``base``; (tensors, kept share, layers)."""
    tuned_modules = dict(tuned.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    total = kept_norm = 0.0
    layers = 0
    for name, module in base.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        other = tuned_modules.get(name)
        if other is None or other.weight.shape != module.weight.shape:
            raise ValueError(f"the tuned model's {name} is {None if other is None else tuple(other.weight.shape)}, the "
                             f"base's {tuple(module.weight.shape)}: the models do not share an architecture")
        wide = isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)
        r = conv_rank if wide else rank
        delta = other.weight.detach().float() - module.weight.detach().float()
        change = float(delta.norm() / module.weight.detach().float().norm().clamp_min(1e-12))
        if r == 0 or change < min_change:
            continue
        up, down, kept = factor(delta, r)
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(up.shape[1]))
        norm = float(delta.double().norm() ** 2)
        total += norm
        kept_norm += kept * norm
        layers += 1
    return tensors, (kept_norm / total if total else 1.0), layers


def extract_lora(config: ExtractConfig, log=print) -> Extracted:
    """Load both models (diffusers folders or single files), extract, write atomically (float16)."""
    from safetensors.torch import save

    from ..files import write_bytes
    from ..generation.pipelines import load_pipeline

    config.check()
    base, tuned = (load_pipeline(m, "text2img", dtype=torch.float32) for m in (config.base, config.tuned))
    tensors, kept_unet, layers = extract(base.unet, tuned.unet, "lora_unet_", config.rank, config.conv_rank,
                                         config.min_change)
    kept = {"unet": kept_unet}
    if config.text_encoder:
        te, kept["text_encoder"], te_layers = extract(base.text_encoder, tuned.text_encoder, "lora_te_", config.rank,
                                                      0, config.min_change)
        tensors.update(te)
        layers += te_layers
    if not tensors:
        raise ValueError(f"{config.tuned} does not differ from {config.base} in any layer; nothing to extract")
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
                "ss_network_alpha": str(config.rank), "ss_conv_dim": str(config.conv_rank),
                "ss_conv_alpha": str(config.conv_rank), "imprompt_extracted_from": f"{Path(config.base).name} -> "
                f"{Path(config.tuned).name}", "imprompt_kept": ", ".join(f"{k} {v:.3f}" for k, v in kept.items())}
    half = {k: v.half() for k, v in tensors.items()}
    write_bytes(config.output, save(half, metadata=metadata))
    log(f"wrote {config.output}: {layers} layers, rank {config.rank}"
        + (f" (3x3 convs {config.conv_rank})" if config.conv_rank else "") + "; share of the difference kept: "
        + ", ".join(f"{k} {v:.1%}" for k, v in kept.items()))
    return Extracted(half, kept, layers)
