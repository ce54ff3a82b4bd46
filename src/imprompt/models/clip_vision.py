"""CLIP vision encoders from single files, as users keep them: ComfyUI's ``models/clip_vision/*.safetensors``
(``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``), the A1111 ControlNet extension's
``annotator/downloads/clip_vision/clip_h.pth`` / ``clip_g.pth``, the official h94/IP-Adapter
``models/image_encoder/model.safetensors``.

Two key layouts exist for the same network (a pre-norm ViT: patch convolution, class token, learned
positions, a LayerNorm before the blocks, residual attention + MLP blocks, a LayerNorm on the class
token, a bias-free linear projection):

- **transformers** (``modeling_clip.py``: ``CLIPVisionEmbeddings``, ``CLIPEncoderLayer``,
  ``CLIPVisionModelWithProjection``)::

      vision_model.embeddings.{patch_embedding.weight, class_embedding, position_embedding.weight}
      vision_model.pre_layrnorm.{weight,bias}                     (spelled so in transformers)
      vision_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}
      vision_model.encoder.layers.N.{layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.{weight,bias}
      vision_model.post_layernorm.{weight,bias}
      visual_projection.weight                                    [projection_dim, width]

  Files written by transformers before 4.31 also hold the constant buffer
  ``vision_model.embeddings.position_ids`` (``arange``), which is dropped.

- **OpenCLIP** (and OpenAI's original ``clip`` package; ``open_clip/transformer.py``
  ``VisionTransformer``)::

      visual.{conv1.weight, class_embedding, positional_embedding, ln_pre.*, ln_post.*}
      visual.transformer.resblocks.N.{ln_1, ln_2, attn.out_proj, mlp.c_fc, mlp.c_proj}.{weight,bias}
      visual.transformer.resblocks.N.attn.in_proj_{weight,bias}   (torch.nn.MultiheadAttention: q, k, v
                                                                   stacked along dim 0)
      visual.proj                                                 [width, projection_dim]: used as x @ proj,
                                                                  the transpose of visual_projection.weight

Either may come with the text tower of the same CLIP model (transformers: ``text_model.*``,
``text_projection.weight``, ``logit_scale``; OpenCLIP: unprefixed ``token_embedding``, ``transformer.*``,
``ln_final``, ``text_projection``, ``logit_scale``), which is ignored. The correspondence between the two
layouts is the one transformers' ``convert_clip_original_pytorch_to_hf.py`` applies.

Sizes are read off tensor shapes; the attention head count and the activation are not in the weights
and come from :data:`ARCHITECTURE_BY_WIDTH`.
"""

from __future__ import annotations

import os
import re
from math import isqrt
from pathlib import Path
from typing import Iterable, Literal, Mapping

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ..adapter.variants import CheckpointError
from ..files import check_regular_file, load_torch_weights
from .inspect import HeaderError, classify_shapes, read_header

Layout = Literal["transformers", "openclip"]
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
MAX_FILE_BYTES = 64 * 2**30  # a whole ViT-bigG CLIP in float32 is about 10 GiB

# Tower width -> (attention heads, MLP activation): what the shapes cannot tell. Sources: the published
# configs of openai/clip-vit-base-patch16 (768: 12 heads, quick_gelu) and openai/clip-vit-large-patch14
# (1024: 16 heads, quick_gelu; OpenAI trained with QuickGELU, x * sigmoid(1.702 x)); OpenCLIP's
# model_configs ViT-H-14.json (width 1280, head_width 80 -> 16 heads) and ViT-bigG-14.json (width 1664,
# head_width 104 -> 16 heads), trained with nn.GELU; h94/IP-Adapter's models/image_encoder (ViT-H) and
# sdxl_models/image_encoder (ViT-bigG) config.json both say hidden_act "gelu".
# OpenCLIP's own ViT-L/14 and ViT-B/16 trainings (laion2B) used GELU too; their files look the same as
# OpenAI's, so pass hidden_act="gelu" for them.
ARCHITECTURE_BY_WIDTH: dict[int, tuple[int, str]] = {
    768: (12, "quick_gelu"),   # ViT-B/16, ViT-B/32
    1024: (16, "quick_gelu"),  # ViT-L/14
    1280: (16, "gelu"),        # ViT-H/14
    1664: (16, "gelu"),        # ViT-bigG/14
}
# Both transformers' CLIPVisionConfig default and torch.nn.LayerNorm's (OpenCLIP) default.
LAYER_NORM_EPS = 1e-5
HIDDEN_ACTS = ("quick_gelu", "gelu")

_TRANSFORMERS_PREFIXES = ("vision_model.", "visual_projection.")
_OPENCLIP_PREFIX = "visual."
_LEGACY_BUFFER = "vision_model.embeddings.position_ids"
_PATCH = "vision_model.embeddings.patch_embedding.weight"
_CLASS = "vision_model.embeddings.class_embedding"
_POSITIONS = "vision_model.embeddings.position_embedding.weight"
_PROJECTION = "visual_projection.weight"
_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")

# OpenCLIP name -> transformers name, outside the blocks.
_OPENCLIP_NAMES = {
    "visual.conv1.weight": _PATCH,
    "visual.class_embedding": _CLASS,
    "visual.positional_embedding": _POSITIONS,
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# OpenCLIP block part -> transformers block part (the in_proj split is handled apart).
_OPENCLIP_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                         "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPENCLIP_BLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OPENCLIP_IN_PROJ = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")

_KIND_WORDS = {"checkpoint": "a Stable Diffusion checkpoint", "unet": "a UNet", "adapter": "an IP-Adapter",
               "lora": "a LoRA", "embedding": "a textual-inversion embedding", "controlnet": "a ControlNet",
               "vae": "a VAE"}
_EXPECTED = ("expected a CLIP vision encoder (vision_model.* keys as transformers writes them, or visual.* "
             "as OpenCLIP does), such as ComfyUI's CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")


def _is_transformers_vision(key: str) -> bool:
    return key.startswith(_TRANSFORMERS_PREFIXES)


def vision_layout(keys: Iterable[str]) -> Layout | None:
    """``"transformers"`` (``vision_model.*``), ``"openclip"`` (``visual.*``), or None when the keys hold
    no CLIP vision tower. A text tower beside it does not matter; both vision layouts at once is refused."""
    keys = list(keys)
    hf = any(k.startswith("vision_model.") for k in keys)
    oc = any(k.startswith(_OPENCLIP_PREFIX) for k in keys)
    if hf and oc:
        raise CheckpointError("the state holds two vision towers, one in the transformers layout (vision_model.*) "
                              "and one in the OpenCLIP layout (visual.*); keep one of them")
    return "transformers" if hf else "openclip" if oc else None


def _openclip_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(_OPENCLIP_PREFIX):
            continue  # text tower, logit_scale
        layer = "vision_model.encoder.layers.{}."
        if key in _OPENCLIP_NAMES:
            out[_OPENCLIP_NAMES[key]] = value
        elif key == "visual.proj":
            if value.ndim != 2:
                raise CheckpointError(f"visual.proj has shape {list(value.shape)}; expected [width, projection_dim]")
            # OpenCLIP computes x @ proj; nn.Linear computes x @ weight.T, so weight = proj.T.
            out[_PROJECTION] = value.T.contiguous()
        elif m := _OPENCLIP_IN_PROJ.match(key):
            if value.shape[0] % 3:
                raise CheckpointError(f"{key} has shape {list(value.shape)}; expected a first dimension of "
                                      "3 x width (q, k, v stacked)")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[layer.format(m.group(1)) + f"self_attn.{name}.{m.group(2)}"] = part.contiguous()
        elif (m := _OPENCLIP_BLOCK.match(key)) and m.group(2) in _OPENCLIP_BLOCK_PARTS:
            out[layer.format(m.group(1)) + f"{_OPENCLIP_BLOCK_PARTS[m.group(2)]}.{m.group(3)}"] = value
        else:
            # Not part of the network transformers builds (layer scale ls_1, attnpool of a ResNet tower,
            # a timm trunk): kept under its own name, so the strict check names it as left over.
            out[key] = value
    return out


def to_transformers_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower of ``state`` (either layout) in the transformers layout, ready for
    ``CLIPVisionModelWithProjection.load_state_dict``; everything else (a text tower) is left out.

    OpenCLIP: ``in_proj_weight`` / ``in_proj_bias`` are split into q, k, v (in that order, as
    ``torch.nn.MultiheadAttention`` stacks them), ``visual.proj`` is transposed, the rest renamed. An
    OpenCLIP vision key with no transformers counterpart is kept under its own name, so that a strict
    load names it. The legacy ``position_ids`` buffer is dropped (transformers rebuilds it).
    """
    layout = vision_layout(state)
    if layout is None:
        raise CheckpointError(f"no CLIP vision tower in the state (keys such as {', '.join(sorted(state)[:3])}); "
                              f"{_EXPECTED}")
    if layout == "openclip":
        return _openclip_to_transformers(state)
    return {k: v for k, v in state.items() if _is_transformers_vision(k) and k != _LEGACY_BUFFER}


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int, meaning: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"the vision tower has no {key}; a truncated or incomplete file?")
    shape = tuple(int(d) for d in state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{key} has shape {list(shape)}; expected {ndim} dimensions ({meaning})")
    return shape


def _layer_count(state: Mapping[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    if not indices:
        raise CheckpointError("the vision tower has no encoder layers (vision_model.encoder.layers.N / "
                              "visual.transformer.resblocks.N); a truncated or incomplete file?")
    gaps = sorted(set(range(max(indices) + 1)) - indices)
    if gaps:
        raise CheckpointError(f"the vision tower has layers up to {max(indices)} but none numbered "
                              f"{', '.join(map(str, gaps[:5]))}{' ...' if len(gaps) > 5 else ''}; expected 0 to "
                              f"{max(indices)} (a truncated or incomplete file?)")
    return max(indices) + 1


def infer_vision_config(state: Mapping[str, torch.Tensor], *, num_heads: int | None = None,
                        hidden_act: str | None = None) -> CLIPVisionConfig:
    """The ``CLIPVisionConfig`` of the vision tower in ``state`` (either layout).

    From shapes: hidden_size and num_channels (patch convolution [width, channels, patch, patch]),
    patch_size, image_size (position embeddings [(image_size / patch_size)^2 + 1, width]),
    num_hidden_layers (layer indices), intermediate_size (fc1 [intermediate, width]), projection_dim
    (visual_projection [projection_dim, width]). From :data:`ARCHITECTURE_BY_WIDTH`, unless given:
    ``num_heads`` and ``hidden_act``; a width the table does not know needs both. layer_norm_eps 1e-5.
    """
    if vision_layout(state) == "openclip":
        state = _openclip_to_transformers(state)
    width, channels, patch, patch_w = _shape(state, _PATCH, 4, "[width, channels, patch, patch]")
    if patch != patch_w:
        raise CheckpointError(f"{_PATCH} has shape {[width, channels, patch, patch_w]}: patches of "
                              f"{patch} x {patch_w}; expected square patches")
    (class_width,) = _shape(state, _CLASS, 1, "[width]")
    positions, position_width = _shape(state, _POSITIONS, 2, "[positions, width]")
    grid = isqrt(max(positions - 1, 0))
    if class_width != width or position_width != width:
        raise CheckpointError(f"the vision tower's widths disagree: patch embedding {width}, class embedding "
                              f"{class_width}, position embedding {position_width}")
    if positions < 2 or grid * grid != positions - 1:
        raise CheckpointError(f"{_POSITIONS} has {positions} positions; expected a square grid of patches plus "
                              "the class token (e.g. 257 = 16 x 16 + 1 for 224-pixel images in patches of 14)")
    layers = _layer_count(state)
    intermediate, fc1_width = _shape(state, "vision_model.encoder.layers.0.mlp.fc1.weight", 2,
                                     "[intermediate, width]")
    if _PROJECTION not in state:
        raise CheckpointError(
            "the vision tower has no projection (visual_projection.weight; OpenCLIP: visual.proj), so it gives "
            "no image_embeds: IP-Adapter's linear adapters (base, light, SDXL) read image_embeds through "
            "visual_projection. Use a file that includes it, such as the official models/image_encoder or "
            "ComfyUI's CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    projection_dim, projection_width = _shape(state, _PROJECTION, 2, "[projection_dim, width]")
    if fc1_width != width or projection_width != width:
        raise CheckpointError(f"the vision tower's widths disagree: patch embedding {width}, mlp.fc1 input "
                              f"{fc1_width}, projection input {projection_width}")
    known_heads, known_act = ARCHITECTURE_BY_WIDTH.get(width, (None, None))
    if known_heads is None and (num_heads is None or hidden_act is None):
        known = ", ".join(f"{w} ({h} heads, {a})" for w, (h, a) in ARCHITECTURE_BY_WIDTH.items())
        raise CheckpointError(f"a CLIP vision tower of width {width} is not one imprompt knows (known widths: "
                              f"{known}); its attention head count and activation are not in the weights, so "
                              "give them (num_heads=..., hidden_act='gelu' or 'quick_gelu')")
    heads = num_heads if num_heads is not None else known_heads
    act = hidden_act if hidden_act is not None else known_act
    if not isinstance(heads, int) or heads < 1 or width % heads:
        raise CheckpointError(f"num_heads {heads!r} does not divide the width {width}; expected a divisor such "
                              "as the width / 64")
    if act not in HIDDEN_ACTS:
        raise CheckpointError(f"hidden_act {act!r} is not a CLIP activation; expected one of {HIDDEN_ACTS}")
    return CLIPVisionConfig(hidden_size=width, intermediate_size=intermediate, projection_dim=projection_dim,
                            num_hidden_layers=layers, num_attention_heads=heads, num_channels=channels,
                            image_size=grid * patch, patch_size=patch, hidden_act=act, layer_norm_eps=LAYER_NORM_EPS)


def _check_keys(state: Mapping[str, torch.Tensor], config: CLIPVisionConfig) -> None:
    """Raise unless ``state`` has exactly the keys and shapes of the model ``config`` describes."""
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        expected = {k: tuple(v.shape) for k, v in CLIPVisionModelWithProjection(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{k} {list(state[k].shape)} (expected {list(expected[k])})"
             for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]

    def some(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

    problems = [f"{len(missing)} of its {len(expected)} tensors missing ({some(missing)})" if missing else "",
                f"{len(extra)} tensors that a CLIP vision model does not have ({some(extra)})" if extra else "",
                f"{len(wrong)} tensors of the wrong shape: {some(wrong)}" if wrong else ""]
    if any(problems):
        raise CheckpointError("the vision tower does not match a CLIP vision model of width "
                              f"{config.hidden_size} with {config.num_hidden_layers} layers: "
                              + "; ".join(filter(None, problems)))


def _what_it_holds(shapes: Mapping[str, tuple[int, ...]], file_name: str) -> str:
    keys = list(shapes)
    if any(k.startswith("text_model.") for k in keys) or "token_embedding.weight" in shapes:
        return "a CLIP text encoder (text_model.* / token_embedding), with no vision tower"
    info = classify_shapes(shapes, file_name)
    if info.kind == "image_encoder":  # e.g. only visual_projection.weight
        return "part of a CLIP image encoder without its vision tower (vision_model.* / visual.*)"
    if info.kind in _KIND_WORDS:
        return _KIND_WORDS[info.kind]
    return f"no model imprompt knows (keys such as {', '.join(sorted(keys)[:3]) or 'none: it is empty'})"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The vision tensors of a safetensors file (only those are read), or all tensors of a pickle."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            header, _ = read_header(path)
        except HeaderError as err:
            raise CheckpointError(f"image encoder {path.name}: not a usable safetensors file: {err}") from None
        shapes = {k: shape for k, (_, shape) in header.items()}
        layout = vision_layout(shapes)
        if layout is None:
            raise CheckpointError(f"image encoder {path.name} holds {_what_it_holds(shapes, path.name)}; {_EXPECTED}")
        wanted = [k for k in shapes if (k.startswith(_OPENCLIP_PREFIX) if layout == "openclip"
                                        else _is_transformers_vision(k))]
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in wanted}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read image encoder {path.name}: {err}; download it again") from None
    loaded = load_torch_weights(path, what="image encoder")
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"image encoder {path.name} holds a {type(loaded).__name__}, not a dict of tensors; "
                              f"{_EXPECTED}")
    return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def load_clip_vision_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *,
                          num_heads: int | None = None, hidden_act: str | None = None) -> CLIPVisionModelWithProjection:
    """A ``CLIPVisionModelWithProjection`` (in eval mode, on the CPU, in ``dtype``) from one file.

    ``.safetensors`` is read with safetensors; ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` with
    :func:`imprompt.files.load_torch_weights` (tensors only; a ``state_dict`` entry is unwrapped). Either
    key layout (see the module docstring); the config comes from :func:`infer_vision_config`
    (``num_heads`` / ``hidden_act`` override its table). The load is strict: every tensor of the vision
    tower present with its shape, none left over; a text tower beside it is ignored.
    """
    path = Path(path)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(f"image encoder {path.name}: unknown file type {suffix or '(no suffix)'!r}; expected "
                              f"one of {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}, or a transformers folder")
    check_regular_file(path, MAX_FILE_BYTES, what="image encoder")
    state = _read_state(path)
    try:
        layout = vision_layout(state)
        if layout is None:
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            raise CheckpointError(f"holds {_what_it_holds(shapes, path.name)}; {_EXPECTED}")
        vision = to_transformers_layout(state)
        config = infer_vision_config(vision, num_heads=num_heads, hidden_act=hidden_act)
        _check_keys(vision, config)
    except CheckpointError as err:
        raise CheckpointError(f"image encoder {path.name} ({layout or 'no vision'} layout): {err}") from None
    del state
    vision = {k: v.to(dtype) for k, v in vision.items()}
    # from_pretrained with a state_dict builds the model on the meta device and assigns the tensors:
    # no random initialisation of weights about to be replaced (12 s for ViT-H), and the non-persistent
    # position_ids buffer is still built as transformers builds it. The keys were checked above.
    model = CLIPVisionModelWithProjection.from_pretrained(None, config=config, state_dict=vision, dtype=dtype)
    return model.eval()
