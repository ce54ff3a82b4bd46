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
    base = {768: "SD1.5", 1024: "SD2"}.get(width)
    return ModelInfo("embedding", base, {"format": fmt, "vectors": n, "width": width},
                     None if base else f"embedding width {width} fits no supported text encoder")
