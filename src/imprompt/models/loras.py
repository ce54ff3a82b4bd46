"""LoRA files as AUTOMATIC1111, ComfyUI, kohya-ss, LyCORIS, diffusers and PEFT write them: which format,
which algorithm, which rank, which base, read off the tensor names and shapes alone (no torch)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Mapping

from .info import ModelInfo, Shapes, base_of_width

# --- LoRA ---------------------------------------------------------------------------------------------
# (key suffix, format, role). "down" tensors are [rank, in_features] (LoHa's w*_b likewise).
_LORA_SUFFIXES = (
    (".lora_down.weight", "kohya", "down"), (".lora_up.weight", "kohya", "up"), (".lora_mid.weight", "lycoris", "mid"),
    (".hada_w1_b", "lycoris", "down"), (".hada_w2_b", "lycoris", "down"), (".hada_w1_a", "lycoris", "up"),
    (".hada_w2_a", "lycoris", "up"), (".hada_t1", "lycoris", "mid"), (".hada_t2", "lycoris", "mid"),
    (".lokr_w1", "lycoris", "kron"), (".lokr_w2", "lycoris", "kron"), (".lokr_w1_a", "lycoris", "kron"),
    (".lokr_w1_b", "lycoris", "kron"), (".lokr_w2_a", "lycoris", "kron"), (".lokr_w2_b", "lycoris", "kron"),
    (".lokr_t2", "lycoris", "kron"), (".on_input", "lycoris", "ia3"),
    (".lora.down.weight", "diffusers", "down"), (".lora.up.weight", "diffusers", "up"),
    ("_lora.down.weight", "diffusers", "down"), ("_lora.up.weight", "diffusers", "up"),
    (".lora_linear_layer.down.weight", "diffusers", "down"), (".lora_linear_layer.up.weight", "diffusers", "up"),
    (".lora_A.weight", "peft", "down"), (".lora_B.weight", "peft", "up"),
)
_ALGORITHM_OF = {"hada_": "loha", "lokr_": "lokr", ".on_input": "ia3", ".lora_mid.": "locon"}
_TO_K = re.compile(r"attn2[._](processor[._])?to_k(_lora)?$")
_TE_Q = re.compile(r"self_attn[._]q_proj$")
_METADATA_BASES = (("xl", "SDXL"), ("v2", "SD2"), ("v1", "SD1.5"))  # modelspec / ss_base_model_version


def lora_info(shapes: Shapes, metadata: Mapping[str, str]) -> ModelInfo | None:
    """kohya / A1111 (``lora_unet_*``, ``lora_te[12]_*``), LyCORIS (LoHa, LoKr, IA3, LoCon under the
    kohya names), diffusers (``.lora.down``, ``_lora.down``) and PEFT (``lora_A`` / ``lora_B``).
    Details: format, algorithm (LyCORIS only), rank (most common; ``ranks`` when they differ),
    text_encoder (has text-encoder parts), layers. Base from attn2.to_k's in-features (2048 SDXL,
    1024 SD2, 768 SD1.5), else from a second text encoder (SDXL) or the text encoder's width, else
    from the file's metadata."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    formats = Counter()
    for key, shape in shapes.items():
        for suffix, fmt, role in _LORA_SUFFIXES:
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[role] = shape
                formats[fmt] += 1
                break
    if not modules:
        return None
    keys = list(shapes)
    algorithm = next((alg for mark, alg in _ALGORITHM_OF.items() if any(mark in k for k in keys)), None)
    fmt = "lycoris" if algorithm else formats.most_common(1)[0][0]
    ranks = Counter(m["down"][0] for m in modules.values() if len(m.get("down", ())) >= 2)
    text_encoder = any(name.startswith(("lora_te", "text_encoder")) for name in modules)
    second_te = any(name.startswith(("lora_te2_", "text_encoder_2.")) for name in modules)

    def in_features(pattern: re.Pattern) -> int | None:
        for name in sorted(modules):
            down = modules[name].get("down", ())
            if pattern.search(name) and len(down) >= 2:
                return down[1]
        return None

    base = base_of_width(in_features(_TO_K))
    if base is None and second_te:
        base = "SDXL"
    if base is None and text_encoder:
        base = {768: "SD1.5", 1024: "SD2"}.get(in_features(_TE_Q))
    if base is None:
        stated = (metadata.get("modelspec.architecture", "") + " " + metadata.get("ss_base_model_version", "")).lower()
        base = next((b for mark, b in _METADATA_BASES if mark in stated), None)
    details = {"format": fmt, "algorithm": algorithm, "rank": ranks.most_common(1)[0][0] if ranks else None,
               "text_encoder": text_encoder, "layers": len(modules)}
    if len(ranks) > 1:
        details["ranks"] = sorted(ranks)
    return ModelInfo("lora", base, details, None)
