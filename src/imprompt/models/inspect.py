"""What a model file is, read off its tensor names and shapes: the kinds of file that AUTOMATIC1111 and
ComfyUI model folders hold (checkpoints, IP-Adapters, image encoders, LoRAs, embeddings, ControlNets,
VAEs).

Listing a folder must be fast (``imprompt models`` starts in well under 2 s), so a safetensors file is
read here without torch and without the safetensors library. The format is small enough to read by
hand: 8 bytes of little-endian header length, then that many bytes of JSON, ``{name: {"dtype",
"shape", "data_offsets": [begin, end]}}`` plus an optional ``"__metadata__": {str: str}``, then the
tensor data. Only the header is read, and it is checked against the file's size, so a truncated
download is named as one.

A pickle file (.ckpt / .pt / .pth / .bin) can only be read by unpickling all of it, which needs torch
and seconds per file, so it is opened only when the caller allows it (``allow_pickle=True``), and then
with :func:`imprompt.files.load_torch_weights` (tensors only, never code). Otherwise it is reported as
kind "unknown" with no problem: inspected when it is used.

Every detector below is a function of ``{name: shape}`` (:func:`classify_shapes`), so the same rules
serve safetensors headers and loaded pickles.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..adapter.variants import CheckpointError, detect_variant
from ..files import PickleRefusedError, UnsafeFileError, check_regular_file
from .embeddings import embedding_info
from .info import BASE_BY_CROSS_WIDTH, ModelInfo, Shapes, base_of_width
from .loras import lora_info

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The safetensors library refuses headers over 100 MB; an SDXL checkpoint's is about 200 KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_NO_SIZE_LIMIT = 1 << 50
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}

# CLIP vision tower hidden width -> family (ViT-B/16 and /32 share 768).
ENCODER_BY_HIDDEN_WIDTH = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H", 1664: "ViT-bigG"}
# (the encoder output an IP-Adapter projection reads, its width) -> the encoder that produces it.
# image_embeds: the pooled, projected embedding; penultimate_hidden: hidden_states[-2] (hidden width).
_ENCODER_BY_OUTPUT = {("image_embeds", 768): "ViT-L", ("image_embeds", 1024): "ViT-H",
                      ("image_embeds", 1280): "ViT-bigG", ("penultimate_hidden", 1024): "ViT-L",
                      ("penultimate_hidden", 1280): "ViT-H", ("penultimate_hidden", 1664): "ViT-bigG"}
_OUTPUT_OF_PROJECTION = {"linear": "image_embeds", "plus": "penultimate_hidden", "full": "penultimate_hidden",
                         "image_embeds": "image_embeds", "penultimate_hidden": "penultimate_hidden"}
ENCODER_WORDS = {
    "ViT-L": "CLIP ViT-L/14 (openai/clip-vit-large-patch14)",
    "ViT-H": "CLIP ViT-H/14 laion2B (the official models/image_encoder; ComfyUI's "
             "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
    "ViT-bigG": "OpenCLIP ViT-bigG/14 laion2B (the official sdxl_models/image_encoder; ComfyUI's "
                "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors)",
}


class HeaderError(ValueError):
    """A file that is not a whole, well-formed safetensors file; the message says what is wrong."""


# --- safetensors header ---------------------------------------------------------------------------

def read_header(path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``({name: (dtype, shape)}, metadata)`` of a safetensors file, reading only its header.

    Raises :class:`HeaderError` (a ValueError) for a file that is too short, has an absurd header
    length, a header that is not the format's JSON, or less tensor data than the header promises.
    """
    path = Path(path)
    size = check_regular_file(path, _NO_SIZE_LIMIT, what="model file")
    with open(path, "rb") as f:
        return _parse_header(f, size)


def _parse_header(f, size: int) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    if size < 8:
        raise HeaderError(f"only {size} bytes, too short for a safetensors file (empty or truncated)")
    (length,) = struct.unpack("<Q", f.read(8))
    if length < 2 or length > MAX_HEADER_BYTES:
        raise HeaderError(f"its first 8 bytes give a header length of {length}, which no safetensors file has")
    if 8 + length > size:
        raise HeaderError(f"truncated: the header is {length} bytes but only {size - 8} follow the length")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError("the header is not JSON (corrupt, or not a safetensors file)") from None
    if not isinstance(header, dict):
        raise HeaderError("the header is JSON but not an object of tensors")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("'__metadata__' is not a mapping of strings")
    tensors, data_end = {}, 0
    for name, entry in header.items():
        dtype, shape, begin, end = _tensor_entry(name, entry)
        tensors[name] = (dtype, shape)
        data_end = max(data_end, end)
    available = size - 8 - length
    if data_end > available:
        raise HeaderError(f"truncated: the header promises {data_end:,} bytes of tensor data but the file holds "
                          f"{available:,} ({100 * available / data_end:.0f}%); an interrupted download? "
                          "Download it again")
    return tensors, metadata


def _tensor_entry(name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    def whole(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(entry, dict):
        raise HeaderError(f"tensor {name!r}: its header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(map(whole, shape)):
        raise HeaderError(f"tensor {name!r}: no valid dtype and shape in the header")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(whole, offsets)) and offsets[0] <= offsets[1]):
        raise HeaderError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    count = 1
    for d in shape:
        count *= d
    if dtype in _DTYPE_BYTES and count * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise HeaderError(f"tensor {name!r}: {dtype} {shape} needs {count * _DTYPE_BYTES[dtype]} bytes, "
                          f"its offsets span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _sniff(head: bytes) -> str:
    """What the first bytes of a file say it is: safetensors, pickle, or something else by name."""
    if len(head) >= 9 and 2 <= struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "pickle"  # torch's zip format, or the legacy format (a pickle, protocol 2+)
    if not head:
        return "empty"
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "lfs"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "html"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "text"
    return "other"


_NOT_A_MODEL = {
    "empty": "empty file (0 bytes); download it again",
    "lfs": "a Git LFS pointer, not the model: fetch the real file (git lfs pull, or download it from the hub)",
    "html": "a web page, not a model: the download saved a login or error page; download the file itself",
    "text": "a text file, not a model",
}


# --- dispatch ---------------------------------------------------------------------------------------

def inspect_file(path, allow_pickle: bool = False) -> ModelInfo:
    """What the model file at ``path`` is. Never raises for a bad file: that is reported in ``problem``."""
    path = Path(path)
    try:
        size = check_regular_file(path, _NO_SIZE_LIMIT, what="model file")
        with open(path, "rb") as f:
            found = _sniff(f.read(64))
            if found == "safetensors":
                f.seek(0)
                tensors, metadata = _parse_header(f, size)
    except UnsafeFileError as err:
        return ModelInfo("unknown", problem=str(err))
    except HeaderError as err:
        return ModelInfo("unknown", problem=f"not a usable safetensors file: {err}")
    except OSError as err:
        return ModelInfo("unknown", problem=f"cannot read {path.name}: {err.strerror or err}")
    suffix = path.suffix.lower()
    if found == "safetensors":
        return classify_shapes({k: shape for k, (_, shape) in tensors.items()}, path.name, metadata)
    if found == "pickle":
        if suffix == ".safetensors":
            return ModelInfo("unknown", problem="named .safetensors but holds a torch pickle; rename it to .ckpt "
                                                "(or convert it to safetensors)")
        return _inspect_pickle(path, allow_pickle)
    if found in _NOT_A_MODEL:
        return ModelInfo("unknown", problem=_NOT_A_MODEL[found])
    if suffix == ".safetensors":
        return ModelInfo("unknown", problem="not a usable safetensors file: its header is unreadable (corrupt "
                                            "or truncated); download it again")
    return ModelInfo("unknown", problem="neither a safetensors file nor a torch pickle")


def _inspect_pickle(path: Path, allow_pickle: bool) -> ModelInfo:
    if not allow_pickle:
        return ModelInfo("unknown", None, {"format": "pickle"})
    from ..files import load_torch_weights  # imports torch

    try:
        loaded = load_torch_weights(path, what="model file")
    except (PickleRefusedError, UnsafeFileError, OSError) as err:
        return ModelInfo("unknown", problem=str(err))
    return classify_shapes(_shapes_of_loaded(loaded), path.name)


def _shapes_of_loaded(loaded: Any) -> dict[str, tuple[int, ...]]:
    """``{dotted.name: shape}`` of the tensors in a loaded pickle (nested dicts joined with dots; an
    LDM ``.ckpt`` keeps its weights under ``state_dict``)."""
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    shapes: dict[str, tuple[int, ...]] = {}

    def walk(prefix: str, value: Any) -> None:
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            shapes[prefix] = tuple(int(d) for d in value.shape)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", loaded)
    return shapes


def classify_shapes(shapes: Shapes, file_name: str = "", metadata: Mapping[str, str] | None = None) -> ModelInfo:
    """The kind, base and details of a state given as ``{name: shape}``; ``file_name`` only matters for
    the IP-Adapter encoder rule, ``metadata`` (kohya's ``ss_*`` / ``modelspec.*``) only when the shapes
    leave a LoRA's base open."""
    if not shapes:
        return ModelInfo("unknown", problem="the file holds no tensors")
    keys = list(shapes)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("image_proj.") or has("ip_adapter."):
        return _adapter(shapes, file_name)
    if has("control_model.") or (has("input_hint_block.") and has("zero_convs.")):
        return _controlnet_original(shapes)
    if has("controlnet_cond_embedding.") or has("controlnet_down_blocks."):
        return _controlnet_diffusers(shapes)
    if has("model.diffusion_model."):
        return _checkpoint(shapes)
    if lora := lora_info(shapes, metadata or {}):
        return lora
    if embedding := embedding_info(shapes):
        return embedding
    if has("vision_model.") or has("visual."):
        return _image_encoder(shapes)
    if "conv_in.weight" in shapes and has("down_blocks.") and has("up_blocks.") and has("time_embedding."):
        return _unet(shapes)
    if vae := _vae(shapes):
        return vae
    return ModelInfo("unknown", problem=f"no known model layout (keys such as {', '.join(sorted(keys)[:3])})")


# --- shared readings --------------------------------------------------------------------------------

def _cross_width(shapes: Shapes, prefix: str = "") -> int | None:
    """The cross-attention width (text encoder output), read off the first attn2.to_k weight [out, width]."""
    for name in sorted(shapes):
        if name.startswith(prefix) and name.endswith("attn2.to_k.weight") and len(shapes[name]) == 2:
            return shapes[name][1]
    return None


# --- checkpoint, bare UNet ----------------------------------------------------------------------------

_OTHER_ARCHITECTURES = {"model.diffusion_model.joint_blocks.": "SD3", "model.diffusion_model.double_blocks.": "Flux"}


def _checkpoint(shapes: Shapes) -> ModelInfo:
    """A single-file LDM checkpoint (A1111's models/Stable-diffusion): the UNet under
    ``model.diffusion_model.``, usually with the VAE (``first_stage_model.``) and text encoder(s).
    Whether it predicts v or epsilon is not in the weights, so nothing is said about it."""
    keys = list(shapes)
    for prefix, name in _OTHER_ARCHITECTURES.items():
        if any(k.startswith(prefix) for k in keys):
            return ModelInfo("checkpoint", None, {"format": "ldm", "architecture": name},
                             f"{name} checkpoints are not supported (SD1.5, SD2 and SDXL are)")
    width = _cross_width(shapes, "model.diffusion_model.")
    base = base_of_width(width)
    if width is None:  # no cross-attention weight found: fall back on the text encoders present
        if any(k.startswith("conditioner.embedders.1.model.") for k in keys) or any("label_emb" in k for k in keys):
            base = "SDXL"
        elif any(k.startswith("cond_stage_model.model.") for k in keys):
            base = "SD2"
        elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
            base = "SD1.5"
    in_shape = shapes.get("model.diffusion_model.input_blocks.0.0.weight", ())
    in_channels = in_shape[1] if len(in_shape) == 4 else None
    details = {"format": "ldm", "cross_attention_dim": width, "in_channels": in_channels,
               "inpainting": in_channels == 9, "includes_vae": any(k.startswith("first_stage_model.") for k in keys)}
    if width == 1280:  # the SDXL refiner conditions on OpenCLIP bigG alone
        details["architecture"] = "SDXL refiner"
        return ModelInfo("checkpoint", None, details, "the SDXL refiner is not supported (use an SDXL base model)")
    if base is None:
        # Usable with --model-config (a diffusers folder of its architecture), so not a problem.
        details["base"] = f"unknown (cross-attention width {width})"
    return ModelInfo("checkpoint", base, details, None)


def _unet(shapes: Shapes) -> ModelInfo:
    """A diffusers UNet2DConditionModel saved alone (``down_blocks.*``, no text encoder)."""
    width = _cross_width(shapes)
    base = "SDXL" if any(k.startswith("add_embedding.") for k in shapes) else base_of_width(width)
    in_shape = shapes.get("conv_in.weight", ())
    details = {"format": "diffusers", "cross_attention_dim": width,
               "in_channels": in_shape[1] if len(in_shape) == 4 else None}
    if base is None:
        details["base"] = "unknown cross-attention width"
    return ModelInfo("unet", base, details, None)


# --- IP-Adapter ---------------------------------------------------------------------------------------
# The rules are imprompt.adapter.variants' own (detect_variant reads only shapes, and imports no torch).

_IP_LAYER = re.compile(r"^ip_adapter\.(\d+)\.to_k_ip\.weight$")


@dataclass(frozen=True)
class _Shaped:
    """A header entry standing in for a tensor: detect_variant reads only ``.shape``."""

    shape: tuple[int, ...]


def _adapter(shapes: Shapes, file_name: str) -> ModelInfo:
    """An official IP-Adapter (``image_proj.*`` + ``ip_adapter.N.to_k_ip / to_v_ip``). Details:
    variant (linear / plus / full), num_tokens (None for full: one per encoder token), encoder_output
    and encoder_width (what the projection reads), cross_attention_dim, layers, encoder (ViT-L / ViT-H /
    ViT-bigG) and encoder_needed (in words)."""
    keys = list(shapes)
    layers = [shapes[k] for k in keys if _IP_LAYER.match(k)]
    ip_width = layers[0][1] if layers and len(layers[0]) == 2 else None
    halves: dict[str, dict[str, _Shaped]] = {"image_proj": {}, "ip_adapter": {}}
    for key, shape in shapes.items():
        half, _, rest = key.partition(".")
        if half in halves:
            halves[half][rest] = _Shaped(tuple(shape))
    try:
        variant = detect_variant(halves["image_proj"], halves["ip_adapter"])
    except CheckpointError as err:
        return ModelInfo("adapter", base_of_width(ip_width), {}, str(err))
    cross, embed = variant.cross_attention_dim, variant.image_embed_dim
    # Plain FaceID and Portrait read only an insightface face embedding: no CLIP image encoder.
    encoder = required_encoder(file_name, variant) if variant.uses_image_encoder else None
    details = {"variant": variant.projection, "num_tokens": variant.num_tokens,
               "encoder_output": variant.encoder_output, "encoder_width": embed, "cross_attention_dim": cross,
               "layers": len(layers), "encoder": encoder,
               "encoder_needed": ENCODER_WORDS[encoder] if encoder else "none (an insightface face embedding)"}
    if variant.is_faceid:
        details.update(faceid=variant.display_name, lora_rank=variant.lora_rank)
    problem = None
    if ip_width != cross:
        problem = f"its image tokens are {cross} wide but its to_k_ip reads {ip_width}: corrupt or mixed file"
    if cross not in BASE_BY_CROSS_WIDTH:
        details["base"] = f"unknown (cross-attention width {cross})"  # still usable: the UNet decides
    return ModelInfo("adapter", base_of_width(cross), details, problem)


def required_encoder(file_name: str, variant_or_widths: Any = None) -> str:
    """The image encoder an IP-Adapter needs: "ViT-L", "ViT-H" or "ViT-bigG".

    ``variant_or_widths``: an :class:`~imprompt.adapter.variants.AdapterVariant` (anything with
    ``encoder_output`` and ``image_embed_dim``), or ``(projection or encoder output, width)`` such as
    ``("linear", 1024)``, or None. Widths are facts of the file and decide when they name an encoder.
    Otherwise the official naming rule (h94/IP-Adapter) decides: a ``vit-h`` name needs ViT-H;
    ``vit-G`` names and the SDXL ones without ``vit-h`` (``ip-adapter_sdxl``) need ViT-bigG; the other
    SD1.5 ones need ViT-H.
    """
    if variant_or_widths is not None:
        if hasattr(variant_or_widths, "encoder_output"):
            output, width = variant_or_widths.encoder_output, variant_or_widths.image_embed_dim
        else:
            kind, width = variant_or_widths
            output = _OUTPUT_OF_PROJECTION.get(kind, kind)
        if (output, width) in _ENCODER_BY_OUTPUT:
            return _ENCODER_BY_OUTPUT[(output, width)]
    name = Path(file_name).name.lower()
    if re.search(r"vit[-_]h", name):
        return "ViT-H"
    if re.search(r"vit[-_](big)?g", name) or "sdxl" in name:
        return "ViT-bigG"
    return "ViT-H"


# --- image encoder ------------------------------------------------------------------------------------

def _image_encoder(shapes: Shapes) -> ModelInfo:
    """A CLIP vision tower: transformers (``vision_model.*``, ``visual_projection``) or OpenCLIP
    (``visual.*``). Details: family (by hidden width), width, layers, projection_dim (None: no
    projection, so no image_embeds for the linear adapters)."""
    if any(k.startswith("vision_model.") for k in shapes):
        fmt, width_key = "transformers", "vision_model.embeddings.class_embedding"
        layer_re = r"vision_model\.encoder\.layers\.(\d+)\."
        projection = shapes.get("visual_projection.weight", (None,))[0]
    else:
        fmt, width_key = "open_clip", "visual.class_embedding"
        layer_re = r"visual\.transformer\.resblocks\.(\d+)\."
        projection = shapes.get("visual.proj", (None, None))[-1]
    width_shape = shapes.get(width_key, ())
    width = width_shape[-1] if width_shape else None
    layers = {m.group(1) for k in shapes if (m := re.match(layer_re, k))}
    family = ENCODER_BY_HIDDEN_WIDTH.get(width) if width else None
    details = {"format": fmt, "family": family or f"width {width}", "width": width, "layers": len(layers),
               "projection_dim": projection}
    return ModelInfo("image_encoder", None, details,
                     None if width else "no CLIP vision width found (truncated, or not a CLIP vision model)")


# --- ControlNet ---------------------------------------------------------------------------------------

def _controlnet_original(shapes: Shapes) -> ModelInfo:
    """lllyasviel's layout: ``control_model.*`` (1.0, often with a whole checkpoint beside it) or the
    same keys unprefixed (ControlNet 1.1 ``.pth``). What it controls (canny, depth, ...) is not in the shapes."""
    prefix = "control_model." if any(k.startswith("control_model.") for k in shapes) else ""
    width = _cross_width(shapes, prefix)
    sdxl = width is None and any(k.startswith(prefix + "label_emb.") for k in shapes)
    base = "SDXL" if sdxl else base_of_width(width)
    convs = [shapes[k] for k in _numbered(shapes, prefix + "input_hint_block.", ".weight")]
    details = {"format": "original", "cross_attention_dim": width,
               **_hint_details(convs[:-1], shapes.get(prefix + "input_blocks.0.0.weight"))}
    return ModelInfo("controlnet", base, details, _controlnet_problem(base, width))


def _controlnet_diffusers(shapes: Shapes) -> ModelInfo:
    width = _cross_width(shapes)
    base = "SDXL" if any(k.startswith("add_embedding.") for k in shapes) else base_of_width(width)
    blocks = [shapes[k] for k in _numbered(shapes, "controlnet_cond_embedding.blocks.", ".weight")]
    convs = [shapes.get("controlnet_cond_embedding.conv_in.weight", ()), *blocks]
    details = {"format": "diffusers", "cross_attention_dim": width, **_hint_details(convs, shapes.get("conv_in.weight"))}
    return ModelInfo("controlnet", base, details, _controlnet_problem(base, width))


def _controlnet_problem(base: str | None, width: int | None) -> str | None:
    # A known width of no published base (a tiny or custom model) is usable with a UNet of that width;
    # the loader checks the match.
    return None if base or width else "no cross-attention weights to tell its base model by"


def _numbered(shapes: Shapes, prefix: str, suffix: str) -> list[str]:
    """The keys ``prefix + N + suffix`` in the order of N."""
    found = [(int(k[len(prefix):-len(suffix)]), k) for k in shapes
             if k.startswith(prefix) and k.endswith(suffix) and k[len(prefix):-len(suffix)].isdigit()]
    return [k for _, k in sorted(found)]


def _hint_details(convs: list[tuple[int, ...]], conv_in: tuple[int, ...] | None) -> dict:
    """The sizes of a ControlNet's hint encoder, which are not the UNet's: diffusers'
    ControlNetConditioningEmbedding is conv_in (hint channels -> c0), then per step a conv c_i -> c_i and a
    strided conv c_i -> c_i+1; the original input_hint_block is the same convolutions numbered 0, 2, 4, ...
    So, the zero conv left out, ``conditioning_embedding_out_channels`` are the outputs of convs 0, 2, 4, ..."""
    if not convs or any(len(c) != 4 for c in convs):
        return {}
    return {"conditioning_channels": convs[0][1], "conditioning_embedding_out_channels": [c[0] for c in convs[0::2]],
            **({"in_channels": conv_in[1]} if conv_in and len(conv_in) == 4 else {})}


# --- VAE ----------------------------------------------------------------------------------------------

def _vae(shapes: Shapes) -> ModelInfo | None:
    """An autoencoder alone (models/VAE): ``encoder.*`` / ``decoder.*`` / ``quant_conv``, possibly all
    under ``first_stage_model.``. SD1.5, SD2 and SDXL VAEs have the same shapes, so base is None."""
    keys = list(shapes)
    if all(k.startswith("first_stage_model.") for k in keys):
        shapes = {k.removeprefix("first_stage_model."): s for k, s in shapes.items()}
        keys = list(shapes)
    if not (any(k.startswith("decoder.") for k in keys) and any(k.startswith("encoder.") for k in keys)):
        return None
    if not ("quant_conv.weight" in shapes or "post_quant_conv.weight" in shapes):
        return None
    fmt = "diffusers" if any(k.startswith("decoder.up_blocks.") for k in keys) else "ldm"
    conv_in = shapes.get("decoder.conv_in.weight", ())
    latent = conv_in[1] if len(conv_in) == 4 else None
    problem = None if latent in (4, None) else f"a {latent}-channel VAE (SD3 / Flux), not for SD1.5, SD2 or SDXL"
    return ModelInfo("vae", None, {"format": fmt, "latent_channels": latent}, problem)
