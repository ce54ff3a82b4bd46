"""Textual-inversion embeddings (EasyNegative, badhandv4, ...) as A1111, ComfyUI and diffusers keep them:
their format, how many vectors a name stands for, which text encoder they fit, read off the shapes."""

from __future__ import annotations

from .info import ModelInfo, Shapes

def embedding_info(shapes: Shapes) -> ModelInfo | None:
    """A1111 ``.pt`` (``string_to_param.*``: [n, width]), safetensors ``emb_params`` [n, width], SDXL
    ``clip_l`` [n, 768] + ``clip_g`` [n, 1280], or a diffusers ``learned_embeds`` file ({token: [width]}).
    Details: format, vectors (tokens the name stands for), width, encoders (SDXL)."""
    def vectors(shape: tuple[int, ...]) -> tuple[int, int]:
        return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[-1])

    keys = list(shapes)
    if "clip_l" in shapes or "clip_g" in shapes:
        if not ("clip_l" in shapes and "clip_g" in shapes):
            return ModelInfo("embedding", "SDXL", {"format": "sdxl"}, "an SDXL embedding needs both clip_l and clip_g")
        (n_l, w_l), (n_g, w_g) = vectors(shapes["clip_l"]), vectors(shapes["clip_g"])
        problem = None if (w_l, w_g) == (768, 1280) and n_l == n_g else (
            f"clip_l {shapes['clip_l']} / clip_g {shapes['clip_g']} are not [n, 768] / [n, 1280]")
        details = {"format": "sdxl", "vectors": n_l, "encoders": "clip_l + clip_g"}
        return ModelInfo("embedding", "SDXL", details, problem)
    params = [k for k in keys if k == "emb_params" or k.startswith("string_to_param.")]
    fmt = "a1111"
    if not params and len(keys) == 1 and 1 <= len(shapes[keys[0]]) <= 2 and shapes[keys[0]][-1] in (768, 1024):
        params, fmt = keys, "diffusers"
    if not params or not 1 <= len(shapes[params[0]]) <= 2:
        return None
    n, width = vectors(shapes[params[0]])
    # Another width (the toy world's 128, a test model's) has no known base; it is offered to models
    # of that width only (the text encoder checks the width when the name is used).
    base = {768: "SD1.5", 1024: "SD2"}.get(width)
    return ModelInfo("embedding", base, {"format": fmt, "vectors": n, "width": width}, None)


def read_embedding(path) -> dict[str, "torch.Tensor"]:
    """The vectors of a textual-inversion file: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` for SDXL,
    ``{"": [n, width]}`` for one text encoder. safetensors is read without code; ``.pt`` / ``.bin`` with
    ``weights_only=True`` (A1111's ``string_to_param`` dict, diffusers' ``{token: vector}``)."""
    from pathlib import Path

    import torch

    from ..files import load_torch_weights

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = load_torch_weights(path, what="embedding")
        if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
            data = {"emb_params": next(iter(data["string_to_param"].values()))}
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: not an embedding file (expected a dict of tensors, found {type(data).__name__})")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if "clip_l" in tensors or "clip_g" in tensors:
        if not ("clip_l" in tensors and "clip_g" in tensors):
            raise ValueError(f"{path.name}: an SDXL embedding needs both clip_l and clip_g vectors")
        out = {"clip_l": tensors["clip_l"], "clip_g": tensors["clip_g"]}
    elif "emb_params" in tensors:
        out = {"": tensors["emb_params"]}
    elif len(tensors) == 1:
        out = {"": next(iter(tensors.values()))}
    else:
        raise ValueError(f"{path.name}: no embedding vectors found (keys: {', '.join(list(data)[:6])}); expected "
                         "A1111 string_to_param / emb_params, diffusers {token: vector} or SDXL clip_l + clip_g")
    out = {k: (v.unsqueeze(0) if v.ndim == 1 else v).float() for k, v in out.items()}
    for key, v in out.items():
        if v.ndim != 2 or not 1 <= v.shape[0] <= 75:
            raise ValueError(f"{path.name}: embedding {key or 'vectors'} have shape {tuple(v.shape)}; expected "
                             "[vectors (1-75), width]")
    return out
