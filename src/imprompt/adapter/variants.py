"""Adapter variants as data, and their detection from checkpoint keys and shapes.

Every released IP-Adapter (Ye et al., 2023, arXiv 2308.06721) is the same decoupled cross-attention
fed by one of three image projections. What differs between ``ip-adapter_sd15``, ``_light``,
``_plus``, ``_plus-face``, ``_full-face``, ``_sdxl`` and ``_vit-h`` is only the projection kind, which
encoder output it reads and a handful of widths. So a variant is a frozen dataclass, read off the
checkpoint's own shapes; there are no per-variant classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Mapping

if TYPE_CHECKING:  # detection reads only .shape, so listing a model folder runs it without torch
    import torch

# One vocabulary for variants, used by detection, training and messages alike:
#   linear  ImageProjModel: the pooled embedding -> a few tokens (the paper's IP-Adapter, 3.2.1)
#   plus    Resampler: learned queries read the penultimate hidden states (ip-adapter-plus*)
#   full    MLPProjModel: every penultimate hidden state becomes a token (ip-adapter-full-face)
#   faceid       MLP: an insightface face-ID embedding -> a few tokens (IP-Adapter-FaceID, -Portrait)
#   faceid_plus  the face-ID tokens are the queries of a Perceiver reading CLIP's penultimate hidden
#                states (IP-Adapter-FaceID-Plus, -PlusV2: same weights, V2 adds the "shortcut")
# plus "shared", a training variant only: the paper's simple adapter (4.4.1), a linear projection
# whose tokens join the text tokens in the frozen attention (no to_k_ip / to_v_ip).
ProjectionKind = Literal["linear", "plus", "full", "faceid", "faceid_plus"]
PROJECTION_KINDS: tuple[ProjectionKind, ...] = ("linear", "plus", "full", "faceid", "faceid_plus")
FACEID_KINDS: tuple[ProjectionKind, ...] = ("faceid", "faceid_plus")
TRAINING_VARIANTS: tuple[str, ...] = ("linear", "plus", "full", "shared")  # FaceID is inference only
# The official release names, for display only: the shapes cannot tell base from light, or plus from
# plus-face (same modules, other training data), so the display says the family's first name.
DISPLAY_NAMES: dict[str, str] = {"linear": "base", "plus": "plus", "full": "full-face", "faceid": "faceid",
                                 "faceid_plus": "faceid-plus"}
_FORMER_NAMES = {"resampler": "plus", "mlp": "full"}
EncoderOutput = Literal["image_embeds", "penultimate_hidden", "face_embedding"]
# The released FaceID models read insightface's buffalo_l recognition embedding (ArcFace, 512 wide).
FACE_EMBEDDING_DIM = 512

# The official Resampler takes dim_head as an argument, but every released plus model uses 64 and
# diffusers' loader assumes it (heads = to_q rows / 64): the split of to_q's rows into heads is not
# stored in the checkpoint, so this is the one assumption detection makes. The head count itself is
# read from the weights (it is independent of the Resampler's width).
RESAMPLER_HEAD_DIM = 64


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, incomplete, unsupported or for another model."""


@dataclass(frozen=True)
class AdapterVariant:
    """What a checkpoint is, in the terms needed to build and validate it.

    ``num_tokens`` is None for the ``full`` projection (full-face), whose token count is the image
    encoder's sequence length (257 for ViT-H/14 at 224 px).
    """

    projection: ProjectionKind
    image_embed_dim: int  # width of the encoder output the projection reads
    cross_attention_dim: int  # width of the image tokens = the UNet's cross_attention_dim
    num_tokens: int | None
    # Resampler only (paper's "plus" variants; Perceiver of Alayrac et al. 2022). The official
    # Resampler(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult): width is
    # its ``dim``; its attention's inner width is heads * 64, which need not equal ``dim``.
    resampler_width: int = 0
    resampler_depth: int = 0
    resampler_ff_mult: float = 0  # feed-forward inner width / width (4 in every release)
    resampler_heads: int = 0  # 0: width // 64, the released models' choice
    # FaceID only (tencent-ailab ip_adapter_faceid.py): the face-ID embedding's width (512), the width
    # of its MLP's hidden layer (twice that in every release), and the rank of the LoRA the checkpoint
    # carries for every attention layer of the UNet (0: none, as FaceID-Portrait). For faceid_plus,
    # ``image_embed_dim`` is the CLIP hidden width its Perceiver reads.
    face_embed_dim: int = 0
    face_hidden_dim: int = 0
    lora_rank: int = 0

    def __post_init__(self) -> None:
        if self.projection not in PROJECTION_KINDS:
            former = _FORMER_NAMES.get(self.projection)
            raise ValueError(f"unknown projection kind {self.projection!r}; expected one of {', '.join(PROJECTION_KINDS)}"
                             + (f" ({self.projection!r} is now called {former!r})" if former else ""))
        if self.projection in FACEID_KINDS and min(self.face_embed_dim, self.face_hidden_dim, self.num_tokens or 0) <= 0:
            raise ValueError(f"a {self.projection} projection needs positive face_embed_dim, face_hidden_dim and "
                             f"num_tokens; got {self.face_embed_dim}, {self.face_hidden_dim}, {self.num_tokens}")
        if self.projection in ("plus", "faceid_plus"):
            if not self.resampler_heads:
                object.__setattr__(self, "resampler_heads", self.resampler_width // RESAMPLER_HEAD_DIM)
            if min(self.resampler_width, self.resampler_depth, self.resampler_heads) <= 0 or self.resampler_ff_mult <= 0:
                raise ValueError(
                    f"a Resampler needs a positive width, depth, head count and ff_mult; got width "
                    f"{self.resampler_width}, depth {self.resampler_depth}, heads {self.resampler_heads}, "
                    f"ff_mult {self.resampler_ff_mult} (heads default to width // 64: give a width of at least 64)"
                )
            ff = self.resampler_width * self.resampler_ff_mult
            if abs(ff - round(ff)) > 1e-6:
                raise ValueError(f"resampler width {self.resampler_width} x ff_mult {self.resampler_ff_mult} "
                                 "is not a whole feed-forward width")

    @property
    def encoder_output(self) -> EncoderOutput:
        # Linear variants read CLIP's pooled, projected embedding; plus and full-face read the
        # penultimate hidden states (official code: ``hidden_states[-2]``). FaceID-Plus reads those
        # too, beside the face embedding; FaceID reads only the face embedding (no image encoder).
        if self.projection == "faceid":
            return "face_embedding"
        return "image_embeds" if self.projection == "linear" else "penultimate_hidden"

    @property
    def is_faceid(self) -> bool:
        return self.projection in FACEID_KINDS

    @property
    def uses_image_encoder(self) -> bool:
        return self.projection != "faceid"

    @property
    def display_name(self) -> str:
        """faceid / faceid-portrait (the same modules: Portrait has 16 tokens and no LoRA) / faceid-plus."""
        if self.projection == "faceid" and not self.lora_rank:
            return "faceid-portrait" if self.num_tokens == 16 else "faceid (no LoRA)"
        return DISPLAY_NAMES[self.projection]

    @property
    def resampler_ff_width(self) -> int:
        # round, not the official int(): exact for a ratio read back as rows / width (int() of a
        # product just under a whole number would lose a row); equal to int() for every whole width,
        # the only kind __post_init__ accepts.
        return round(self.resampler_width * self.resampler_ff_mult)

    @property
    def name(self) -> str:
        return f"{self.display_name} ({unet_family(self.cross_attention_dim)}, {encoder_family(self)})"


def unet_family(cross_attention_dim: int) -> str:
    return {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}.get(
        cross_attention_dim, f"cross_attention_dim {cross_attention_dim}"
    )


# (encoder output, width) -> the encoder that produces it and where the official repo keeps it.
_ENCODERS = {
    ("image_embeds", 768): "CLIP ViT-L/14",
    ("image_embeds", 1024): "CLIP ViT-H/14 (official models/image_encoder)",
    ("image_embeds", 1280): "OpenCLIP ViT-bigG/14 (official sdxl_models/image_encoder)",
    ("penultimate_hidden", 1024): "CLIP ViT-L/14",
    ("penultimate_hidden", 1280): "CLIP ViT-H/14 (official models/image_encoder)",
    ("penultimate_hidden", 1664): "OpenCLIP ViT-bigG/14 (official sdxl_models/image_encoder)",
    ("face_embedding", FACE_EMBEDDING_DIM): "an insightface face-ID embedding (buffalo_l)",
}


def encoder_family_of(output: EncoderOutput, width: int) -> str:
    return _ENCODERS.get((output, width), f"an image encoder with {output} width {width}")


def encoder_family(variant: AdapterVariant) -> str:
    return encoder_family_of(variant.encoder_output, variant.image_embed_dim)


_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
# FaceID's LoRA (tencent-ailab attention_processor_faceid.LoRAAttnProcessor / LoRAIPAttnProcessor): a
# low-rank down/up pair beside to_q, to_k, to_v and to_out[0] of *every* attention layer, attn1 included.
LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")
_LORA_KEY = re.compile(r"^(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def check_not_faceid(keys: Iterable[str]) -> None:
    """Refuse a FaceID file in a layout other than tencent-ailab's (keys that name ``faceid``, e.g. a
    ``faceid_proj``): the official ``image_proj`` / ``ip_adapter`` layout is read by :func:`detect_variant`."""
    named = sorted(k for k in keys if "faceid" in k.lower())
    if named:
        raise CheckpointError(
            f"this is an IP-Adapter FaceID checkpoint (found {named[0]!r}) in a layout imprompt does not know: "
            "use the tencent-ailab release (h94/IP-Adapter-FaceID: ip-adapter-faceid*_sd15.bin / _sdxl.bin), whose "
            "weights are under image_proj.* and ip_adapter.*"
        )


def detect_variant(image_proj: Mapping[str, torch.Tensor], ip_adapter: Mapping[str, torch.Tensor]) -> AdapterVariant:
    """Read the variant off the keys and shapes of the two halves of an official checkpoint."""
    keys = set(image_proj)
    check_not_faceid([f"image_proj.{k}" for k in image_proj] + [f"ip_adapter.{k}" for k in ip_adapter])
    if not ip_adapter:
        raise CheckpointError("the checkpoint has no 'ip_adapter' weights (to_k_ip / to_v_ip); it is empty or truncated")
    bad = sorted(k for k in ip_adapter if not _IP_KEY.match(k) and not _LORA_KEY.match(k))
    if bad:
        raise CheckpointError(f"unexpected key 'ip_adapter.{bad[0]}'; expected 'ip_adapter.N.to_k_ip.weight' / 'to_v_ip.weight'"
                              " (and, in FaceID files, 'ip_adapter.N.to_q_lora.down.weight' and the like)")
    lora = sorted(k for k in ip_adapter if _LORA_KEY.match(k))
    faceid = "perceiver_resampler.proj_in.weight" in keys or (
        {"norm.weight", "proj.0.weight"} <= keys and "proj.weight" not in keys and "latents" not in keys)
    if lora and not faceid:
        raise CheckpointError(
            f"'ip_adapter.{lora[0]}' is a FaceID LoRA weight, but the image projection is not FaceID's "
            f"(no 'image_proj.norm.weight' beside 'image_proj.proj.0.weight'; found {sorted(keys)[:6]}): "
            "the file mixes two adapters; re-download it"
        )
    if faceid:
        return _detect_faceid(image_proj, ip_adapter)

    if "latents" in keys:
        _require(image_proj, "proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_q.weight",
                 "layers.0.1.1.weight")
        _, tokens, width = _shape(image_proj, "latents", 3)
        depth = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"layers\.(\d+)\.", k)))
        # Every size is read off a weight, as diffusers' loader does: heads from to_q's rows (the
        # attention's inner width, heads * 64, free of the Resampler's width), the feed-forward ratio
        # from its first Linear.
        inner = _shape(image_proj, "layers.0.0.to_q.weight", 2)[0]
        if inner % RESAMPLER_HEAD_DIM:
            raise CheckpointError(
                f"'image_proj.layers.0.0.to_q.weight' has {inner} rows, not a multiple of the "
                f"{RESAMPLER_HEAD_DIM}-wide attention heads every plus model (and diffusers) uses, so its head "
                f"count cannot be read from the file; re-train with dim_head={RESAMPLER_HEAD_DIM}"
            )
        ff = _shape(image_proj, "layers.0.1.1.weight", 2)[0]
        return AdapterVariant(
            projection="plus",
            image_embed_dim=_shape(image_proj, "proj_in.weight", 2)[1],
            cross_attention_dim=_shape(image_proj, "proj_out.weight", 2)[0],
            num_tokens=tokens,
            resampler_width=width,
            resampler_depth=depth,
            resampler_ff_mult=ff // width if ff % width == 0 else ff / width,
            resampler_heads=inner // RESAMPLER_HEAD_DIM,
        )
    if "proj.weight" in keys:
        _require(image_proj, "norm.weight")
        out_dim = _shape(image_proj, "norm.weight", 1)[0]
        total, embed_dim = _shape(image_proj, "proj.weight", 2)
        if total % out_dim:
            raise CheckpointError(
                f"image_proj.proj.weight has {total} rows, not a multiple of the token width {out_dim}"
            )
        return AdapterVariant("linear", embed_dim, out_dim, total // out_dim)
    if "proj.0.weight" in keys and "norm.weight" not in keys:
        _require(image_proj, "proj.2.weight", "proj.3.weight")
        return AdapterVariant(
            "full", _shape(image_proj, "proj.0.weight", 2)[1], _shape(image_proj, "proj.3.weight", 1)[0], None
        )
    raise CheckpointError(
        "unrecognised image projection: expected 'image_proj.proj.weight' (base), 'image_proj.latents' "
        f"(plus) or 'image_proj.proj.0/.3' (full-face); found {sorted(keys)[:6]}"
    )


def _detect_faceid(image_proj: Mapping[str, torch.Tensor], ip_adapter: Mapping[str, torch.Tensor]) -> AdapterVariant:
    """FaceID / Portrait (``proj.0``, ``proj.2``, ``norm``) or FaceID-Plus (those and ``perceiver_resampler.*``).

    Token count: ``proj.2`` makes all tokens at once, ``num_tokens`` x the width of ``norm`` (4 for
    FaceID and Plus, 16 for Portrait), as diffusers' converter reads it. LoRA rank: the rows of a
    ``down`` weight (128 in the releases).
    """
    keys = set(image_proj)
    _require(image_proj, "proj.0.weight", "proj.2.weight", "norm.weight")
    hidden, face_dim = _shape(image_proj, "proj.0.weight", 2)
    total = _shape(image_proj, "proj.2.weight", 2)[0]
    width = _shape(image_proj, "norm.weight", 1)[0]
    if total % width:
        raise CheckpointError(f"'image_proj.proj.2.weight' has {total} rows, not a multiple of the token width {width} "
                              "('image_proj.norm.weight'); the file is corrupt")
    if face_dim != FACE_EMBEDDING_DIM:
        raise CheckpointError(f"'image_proj.proj.0.weight' reads a face embedding of width {face_dim}; every FaceID "
                              f"release reads insightface's {FACE_EMBEDDING_DIM}-wide embedding (not an IP-Adapter FaceID file?)")
    downs = sorted((k for k in ip_adapter if k.endswith("_lora.down.weight")), key=lambda k: int(k.split(".")[0]))
    rank = tuple(ip_adapter[downs[0]].shape)[0] if downs else 0
    common = dict(num_tokens=total // width, face_embed_dim=face_dim, face_hidden_dim=hidden, lora_rank=rank)
    if "perceiver_resampler.proj_in.weight" not in keys:
        return AdapterVariant("faceid", face_dim, width, **common)
    pr = "perceiver_resampler."
    _require(image_proj, *(pr + n for n in ("proj_out.weight", "norm_out.weight", "layers.0.0.to_q.weight",
                                             "layers.0.1.1.weight")))
    res_width, clip_width = _shape(image_proj, pr + "proj_in.weight", 2)
    if res_width != width:
        raise CheckpointError(f"the face-ID tokens are {width} wide ('image_proj.norm.weight') but the Perceiver reads "
                              f"{res_width}-wide queries ('image_proj.perceiver_resampler.proj_in.weight'); the file is corrupt")
    inner = _shape(image_proj, pr + "layers.0.0.to_q.weight", 2)[0]
    if inner % RESAMPLER_HEAD_DIM:
        raise CheckpointError(f"'image_proj.{pr}layers.0.0.to_q.weight' has {inner} rows, not a multiple of the "
                              f"{RESAMPLER_HEAD_DIM}-wide heads of every FaceID-Plus release")
    depth = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"perceiver_resampler\.layers\.(\d+)\.", k)))
    ff = _shape(image_proj, pr + "layers.0.1.1.weight", 2)[0]
    return AdapterVariant(
        "faceid_plus", clip_width, _shape(image_proj, pr + "proj_out.weight", 2)[0], resampler_width=res_width,
        resampler_depth=depth, resampler_ff_mult=ff // res_width if ff % res_width == 0 else ff / res_width,
        resampler_heads=inner // RESAMPLER_HEAD_DIM, **common,
    )


def _require(state: Mapping[str, torch.Tensor], *names: str) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise CheckpointError(f"image projection is incomplete: missing 'image_proj.{missing[0]}' (truncated file?)")


def _shape(state: Mapping[str, torch.Tensor], name: str, ndim: int) -> tuple[int, ...]:
    """The shape of a tensor detection reads, refused by name if it could not come from the official code."""
    shape = tuple(state[name].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(
            f"'image_proj.{name}' has shape {shape}; expected {ndim} non-empty dimension{'s' * (ndim > 1)} "
            "(corrupt or not an IP-Adapter file)"
        )
    return shape


def layer_ids(ip_adapter: Mapping[str, torch.Tensor]) -> list[int]:
    """The official positional layer indices with image keys / values in an ``ip_adapter`` state, sorted."""
    return sorted({int(m.group(1)) for k in ip_adapter if (m := _IP_KEY.match(k))})


def lora_layer_ids(ip_adapter: Mapping[str, torch.Tensor]) -> list[int]:
    """The positions (among all attention processors) that carry FaceID LoRA weights, sorted."""
    return sorted({int(m.group(1)) for k in ip_adapter if (m := _LORA_KEY.match(k))})
