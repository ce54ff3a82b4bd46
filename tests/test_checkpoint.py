"""Checkpoint formats: variant detection from official keys, byte-exact round trips, full-size counts.

The official layouts are written out here by hand from tencent-ailab/IP-Adapter's module names (not
from our modules), so that detection and loading are checked against the format itself. Full-size
UNets and adapters are built on the meta device: shapes and parameter counts only, no memory, fast.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

import tiny_models as tm
from imprompt.adapter.attach import adapter_for_unet, cross_attention_layers
from imprompt.adapter.checkpoint import load_adapter, read_state, save_adapter
from imprompt.adapter.model import IPAdapter
from imprompt.adapter.variants import AdapterVariant, CheckpointError, detect_variant, layer_ids

# --------------------------------------------------------------------------------------------------
# Official layouts, by hand
# --------------------------------------------------------------------------------------------------

# Width of each cross-attention layer, in the official ``ip_adapter.N`` order (attn_processors order:
# down blocks, up blocks, mid block last; attn1/attn2 alternate, so attn2 sits at the odd positions).
SD15_WIDTHS = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
# SDXL: down_blocks.1 (640, 2 attentions x 2 transformer layers), down_blocks.2 (1280, 2 x 10),
# up_blocks.0 (1280, 3 x 10), up_blocks.1 (640, 3 x 2), mid_block (1280, 1 x 10).
SDXL_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10


def official_ip_adapter(widths: list[int], cross_attention_dim: int) -> dict[str, torch.Tensor]:
    """``ip_adapter.N.to_k_ip.weight`` / ``to_v_ip.weight`` (Linear(cross_dim, width, bias=False))."""
    out = {}
    for position, width in enumerate(widths):
        index = 2 * position + 1
        for name in ("to_k_ip", "to_v_ip"):
            out[f"{index}.{name}.weight"] = torch.randn(width, cross_attention_dim)
    return out


def official_linear(embed_dim: int, cross_attention_dim: int, tokens: int) -> dict[str, torch.Tensor]:
    """ImageProjModel: ``proj`` = Linear(embed, tokens * cross_dim), ``norm`` = LayerNorm(cross_dim)."""
    return {
        "proj.weight": torch.randn(tokens * cross_attention_dim, embed_dim),
        "proj.bias": torch.randn(tokens * cross_attention_dim),
        "norm.weight": torch.randn(cross_attention_dim),
        "norm.bias": torch.randn(cross_attention_dim),
    }


def official_resampler(embed_dim: int, width: int, depth: int, tokens: int, cross_attention_dim: int,
                       ff_mult: float = 4, heads: int | None = None) -> dict[str, torch.Tensor]:
    """Resampler(dim=width, depth, dim_head=64, heads, num_queries=tokens, embedding_dim=embed_dim,
    output_dim=cross_attention_dim, ff_mult): latents, proj_in, layers.N.0 (PerceiverAttention, whose
    inner width is heads * 64, independent of ``width``), layers.N.1 (LayerNorm, Linear, GELU, Linear
    as indices 0..3; inner width int(width * ff_mult)), proj_out, norm_out. ``heads`` defaults to
    width // 64, as in the released plus models."""
    inner = 64 * (heads if heads is not None else width // 64)
    ff = int(width * ff_mult)
    out = {
        "latents": torch.randn(1, tokens, width),
        "proj_in.weight": torch.randn(width, embed_dim),
        "proj_in.bias": torch.randn(width),
        "proj_out.weight": torch.randn(cross_attention_dim, width),
        "proj_out.bias": torch.randn(cross_attention_dim),
        "norm_out.weight": torch.randn(cross_attention_dim),
        "norm_out.bias": torch.randn(cross_attention_dim),
    }
    for n in range(depth):
        for norm in ("norm1", "norm2"):
            out[f"layers.{n}.0.{norm}.weight"] = torch.randn(width)
            out[f"layers.{n}.0.{norm}.bias"] = torch.randn(width)
        out[f"layers.{n}.0.to_q.weight"] = torch.randn(inner, width)
        out[f"layers.{n}.0.to_kv.weight"] = torch.randn(2 * inner, width)
        out[f"layers.{n}.0.to_out.weight"] = torch.randn(width, inner)
        out[f"layers.{n}.1.0.weight"] = torch.randn(width)
        out[f"layers.{n}.1.0.bias"] = torch.randn(width)
        out[f"layers.{n}.1.1.weight"] = torch.randn(ff, width)
        out[f"layers.{n}.1.3.weight"] = torch.randn(width, ff)
    return out


def official_mlp(embed_dim: int, cross_attention_dim: int) -> dict[str, torch.Tensor]:
    """MLPProjModel (full-face): proj.0 Linear(embed, embed), proj.1 GELU, proj.2 Linear(embed, cross),
    proj.3 LayerNorm(cross)."""
    return {
        "proj.0.weight": torch.randn(embed_dim, embed_dim),
        "proj.0.bias": torch.randn(embed_dim),
        "proj.2.weight": torch.randn(cross_attention_dim, embed_dim),
        "proj.2.bias": torch.randn(cross_attention_dim),
        "proj.3.weight": torch.randn(cross_attention_dim),
        "proj.3.bias": torch.randn(cross_attention_dim),
    }


def flat(image_proj: dict, ip_adapter: dict) -> dict[str, torch.Tensor]:
    return {**{f"image_proj.{k}": v for k, v in image_proj.items()}, **{f"ip_adapter.{k}": v for k, v in ip_adapter.items()}}


# The released checkpoints, at their real sizes (built on meta: only shapes matter for detection).
OFFICIAL = {
    "ip-adapter_sd15": (lambda: official_linear(1024, 768, 4), SD15_WIDTHS, 768,
                        AdapterVariant("linear", 1024, 768, 4)),
    "ip-adapter_sd15_vit-G": (lambda: official_linear(1280, 768, 4), SD15_WIDTHS, 768,
                              AdapterVariant("linear", 1280, 768, 4)),
    "ip-adapter-plus_sd15": (lambda: official_resampler(1280, 768, 4, 16, 768), SD15_WIDTHS, 768,
                             AdapterVariant("plus", 1280, 768, 16, resampler_width=768, resampler_depth=4,
                                            resampler_ff_mult=4)),
    "ip-adapter-full-face_sd15": (lambda: official_mlp(1280, 768), SD15_WIDTHS, 768,
                                  AdapterVariant("full", 1280, 768, None)),
    "ip-adapter_sdxl": (lambda: official_linear(1280, 2048, 4), SDXL_WIDTHS, 2048,
                        AdapterVariant("linear", 1280, 2048, 4)),
    "ip-adapter-plus_sdxl_vit-h": (lambda: official_resampler(1280, 1280, 4, 16, 2048), SDXL_WIDTHS, 2048,
                                   AdapterVariant("plus", 1280, 2048, 16, resampler_width=1280,
                                                  resampler_depth=4, resampler_ff_mult=4)),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_detect_variant_from_official_keys(name):
    make_proj, widths, cross_dim, expected = OFFICIAL[name]
    with torch.device("meta"):
        image_proj, ip_adapter = make_proj(), official_ip_adapter(widths, cross_dim)
    variant = detect_variant(image_proj, ip_adapter)
    assert variant == expected
    assert layer_ids(ip_adapter) == list(range(1, 2 * len(widths), 2))


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_layout_loads_with_exactly_its_keys_and_shapes(name):
    """Our module tree is the official key set: from_state_dict accepts the hand-written layout, and
    the built adapter's state has exactly those keys and shapes (nothing missing, nothing extra)."""
    make_proj, widths, cross_dim, expected = OFFICIAL[name]
    with torch.device("meta"):
        state = flat(make_proj(), official_ip_adapter(widths, cross_dim))
    adapter = IPAdapter.from_state_dict(state)
    assert adapter.variant == expected
    ours = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in state.items()}


def test_detected_variant_names_and_encoder_outputs():
    assert OFFICIAL["ip-adapter_sd15"][3].name == "base (SD1.5, CLIP ViT-H/14 (official models/image_encoder))"
    assert OFFICIAL["ip-adapter_sd15"][3].encoder_output == "image_embeds"
    plus = OFFICIAL["ip-adapter-plus_sd15"][3]
    assert plus.name == "plus (SD1.5, CLIP ViT-H/14 (official models/image_encoder))"
    assert plus.encoder_output == "penultimate_hidden" and plus.resampler_heads == 12
    assert OFFICIAL["ip-adapter-full-face_sd15"][3].name.startswith("full-face (SD1.5,")
    assert OFFICIAL["ip-adapter_sdxl"][3].name == "base (SDXL, OpenCLIP ViT-bigG/14 (official sdxl_models/image_encoder))"
    assert OFFICIAL["ip-adapter-plus_sdxl_vit-h"][3].resampler_heads == 20


def test_one_vocabulary_of_projection_kinds():
    """linear / plus / full (and, for inference only, faceid / faceid_plus) everywhere (training's
    --variant adds only 'shared'); the official release names are display names derived from the kind,
    and the former kind names are refused by name."""
    from imprompt.adapter.projection import PROJECTIONS
    from imprompt.adapter.variants import DISPLAY_NAMES, PROJECTION_KINDS, TRAINING_VARIANTS

    assert PROJECTION_KINDS == ("linear", "plus", "full", "faceid", "faceid_plus")
    assert TRAINING_VARIANTS == ("linear", "plus", "full", "shared")
    assert set(PROJECTIONS) == set(DISPLAY_NAMES) == set(PROJECTION_KINDS)
    assert {name: OFFICIAL[name][3].projection for name in OFFICIAL} == {
        "ip-adapter_sd15": "linear", "ip-adapter_sd15_vit-G": "linear", "ip-adapter-plus_sd15": "plus",
        "ip-adapter-full-face_sd15": "full", "ip-adapter_sdxl": "linear", "ip-adapter-plus_sdxl_vit-h": "plus"}
    for former, now in (("resampler", "plus"), ("mlp", "full")):
        with pytest.raises(ValueError, match=rf"unknown projection kind '{former}'; expected one of linear, plus, "
                                             rf"full, faceid, faceid_plus \('{former}' is now called '{now}'\)"):
            AdapterVariant(former, 32, 32, 4)
    with pytest.raises(ValueError, match="unknown projection kind 'shared'"):
        AdapterVariant("shared", 32, 32, 4)  # a training variant, not a projection


def test_detection_reads_widths_not_names():
    """Non-standard sizes are read off the shapes: depth, token count, width, ff multiplier."""
    variant = detect_variant(official_resampler(48, 128, 3, 5, 40, ff_mult=2), official_ip_adapter([24, 56], 40))
    assert variant == AdapterVariant("plus", 48, 40, 5, resampler_width=128, resampler_depth=3,
                                     resampler_ff_mult=2)
    assert detect_variant(official_linear(20, 16, 7), official_ip_adapter([8], 16)) == AdapterVariant("linear", 20, 16, 7)
    assert detect_variant(official_mlp(20, 16), official_ip_adapter([8], 16)) == AdapterVariant("full", 20, 16, None)


# --------------------------------------------------------------------------------------------------
# Every Resampler shape the official code can produce, against diffusers
# --------------------------------------------------------------------------------------------------

# (embedding dim, width, depth, heads, num_queries, output dim, ff_mult). The official Resampler takes
# each of these as a free argument; only dim_head is fixed at 64 (as in every release and in diffusers,
# which reads heads as to_q rows / 64). The first case is the reported failure: width 32 with 12 heads
# ('image_proj.layers.0.0.to_q.weight' has shape (768, 32), expected (0, 32)).
PLUS_SHAPES = {
    "inner-wider-than-width": (48, 32, 4, 12, 5, 40, 4),
    "inner-narrower-than-width": (24, 128, 4, 1, 3, 16, 4),
    "odd-width": (40, 96, 4, 2, 7, 24, 4),
    "depth-2": (24, 64, 2, 3, 4, 32, 4),
    "depth-6": (16, 32, 6, 1, 2, 8, 4),
    "ff-mult-2": (24, 64, 4, 2, 4, 16, 2),
    "ff-mult-2.5": (24, 36, 3, 1, 4, 16, 2.5),
    "one-query": (8, 16, 1, 1, 1, 8, 1),
}


def _diffusers_plus_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Resampler keys -> diffusers' IPAdapterPlusImageProjection keys, for any depth (diffusers'
    own converter spells out layers 0-3 only); checked against that converter below."""
    import re

    out = {}
    for key, value in state.items():
        m = re.match(r"layers\.(\d+)\.(\d)\.(.*)$", key)
        if not m:
            out[key] = value
            continue
        n, part, rest = m.groups()
        if part == "0":
            if rest.startswith("norm1."):
                out[f"layers.{n}.ln0.{rest[6:]}"] = value
            elif rest.startswith("norm2."):
                out[f"layers.{n}.ln1.{rest[6:]}"] = value
            elif rest == "to_kv.weight":
                out[f"layers.{n}.attn.to_k.weight"], out[f"layers.{n}.attn.to_v.weight"] = value.chunk(2, dim=0)
            elif rest == "to_out.weight":
                out[f"layers.{n}.attn.to_out.0.weight"] = value
            else:
                out[f"layers.{n}.attn.{rest}"] = value
        else:
            index, _, param = rest.partition(".")
            name = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}[index]
            out[f"layers.{n}.{name}.{param}"] = value
    return out


def test_hand_written_diffusers_key_map_equals_diffusers_converter():
    state = official_resampler(24, 32, 4, 3, 16, heads=2)
    converted = tm.sd15_unet()._convert_ip_adapter_image_proj_to_diffusers(state, low_cpu_mem_usage=False)
    theirs = converted.state_dict()
    ours = _diffusers_plus_keys(state)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("shape", list(PLUS_SHAPES))
def test_plus_of_any_official_shape_loads_and_matches_diffusers(shape):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    embed, width, depth, heads, queries, out_dim, ff_mult = PLUS_SHAPES[shape]
    torch.manual_seed(0)
    image_proj = {k: v * 0.2 for k, v in official_resampler(embed, width, depth, queries, out_dim, ff_mult, heads).items()}
    adapter = IPAdapter.from_state_dict(flat(image_proj, official_ip_adapter([16, 8], out_dim)))
    variant = adapter.variant
    assert (variant.projection, variant.image_embed_dim, variant.cross_attention_dim, variant.num_tokens) == (
        "plus", embed, out_dim, queries)
    assert (variant.resampler_width, variant.resampler_depth, variant.resampler_heads) == (width, depth, heads)
    assert int(width * variant.resampler_ff_mult) == int(width * ff_mult)

    if depth == 4 and ff_mult == 4:  # what diffusers' loader itself builds: its own converter
        theirs = tm.sd15_unet()._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)
    else:  # diffusers' module with the same arguments the official Resampler took
        theirs = IPAdapterPlusImageProjection(embed_dims=embed, output_dims=out_dim, hidden_dims=width, depth=depth,
                                              dim_head=64, heads=heads, num_queries=queries, ffn_ratio=ff_mult)
        theirs.load_state_dict(_diffusers_plus_keys(image_proj), strict=True)
    features = torch.randn(2, 9, embed)
    with torch.no_grad():
        expected = theirs.eval()(features)
        got = adapter.project(features)
    assert got.shape == (2, queries, out_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_plus_with_inner_width_not_a_multiple_of_64_is_refused_clearly():
    """The head split of an inner width that is not a multiple of 64 cannot be read from the weights."""
    state = official_resampler(24, 32, 2, 3, 16)
    for n in range(2):
        state[f"layers.{n}.0.to_q.weight"] = torch.randn(48, 32)
        state[f"layers.{n}.0.to_kv.weight"] = torch.randn(96, 32)
        state[f"layers.{n}.0.to_out.weight"] = torch.randn(32, 48)
    with pytest.raises(CheckpointError, match=(
        r"'image_proj\.layers\.0\.0\.to_q\.weight' has 48 rows, not a multiple of the 64-wide attention heads"
    )):
        IPAdapter.from_state_dict(flat(state, official_ip_adapter([16], 16)))


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------

KINDS = ["linear", "plus", "full"]
EXTS = [".safetensors", ".bin"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def adapters():
    unet = tm.sd15_unet()
    return {kind: tm.random_adapter(unet, kind, seed=i) for i, kind in enumerate(KINDS)}


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_save_is_byte_identical(adapters, kind, ext, tmp_path):
    first = save_adapter(adapters[kind], tmp_path / f"first{ext}")
    second = save_adapter(load_adapter(first), tmp_path / f"second{ext}")
    if ext == ".bin":
        # torch.save names the zip's top folder after the file it writes; save_adapter writes to a
        # random temporary name, so a file-name-dependent prefix would make every save differ.
        prefixes = {n.split("/")[0] for f in (first, second) for n in zipfile.ZipFile(f).namelist()}
        assert len(prefixes) == 1, (
            f"save_adapter's .bin embeds the temporary file name as the zip prefix ({sorted(prefixes)}): "
            "the same weights give different bytes on every save"
        )
    assert _digest(first) == _digest(second)


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("kind", KINDS)
def test_loaded_tensors_equal_the_original(adapters, kind, ext, tmp_path):
    original = adapters[kind]
    loaded = load_adapter(save_adapter(original, tmp_path / f"a{ext}"))
    assert loaded.variant == original.variant
    want, got = original.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    # The loaded module computes the same thing, not only holds the same numbers.
    width = original.variant.image_embed_dim
    features = torch.randn(2, width) if kind == "linear" else torch.randn(2, 17, width)
    torch.testing.assert_close(loaded.project(features), original.project(features), rtol=0, atol=0)


def test_load_with_dtype(adapters, tmp_path):
    loaded = load_adapter(save_adapter(adapters["linear"], tmp_path / "a.safetensors"), dtype=torch.float16)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}


def test_bin_is_the_official_nested_layout_and_loads_weights_only(adapters, tmp_path):
    adapter = adapters["plus"]
    path = save_adapter(adapter, tmp_path / "a.bin")
    nested = torch.load(path, map_location="cpu", weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"}
    state = adapter.state_dict()
    assert set(nested["image_proj"]) == {k.removeprefix("image_proj.") for k in state if k.startswith("image_proj.")}
    assert set(nested["ip_adapter"]) == {"1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight",
                                         "3.to_v_ip.weight", "5.to_k_ip.weight", "5.to_v_ip.weight",
                                         "7.to_k_ip.weight", "7.to_v_ip.weight"}
    for half in ("image_proj", "ip_adapter"):
        for key, value in nested[half].items():
            assert torch.equal(value, state[f"{half}.{key}"]), key
    # Each tensor has its own storage of its own size (no shared or oversized storages in the pickle).
    for value in nested["ip_adapter"].values():
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


def test_safetensors_is_the_official_flat_layout(adapters, tmp_path):
    adapter = adapters["linear"]
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    state = load_file(path)
    assert set(state) == set(adapter.state_dict())
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in state)
    assert read_state(path).keys() == state.keys()


@pytest.mark.parametrize("ext", EXTS)
def test_save_is_atomic_and_overwrites(adapters, tmp_path, ext):
    path = tmp_path / "sub" / f"a{ext}"
    save_adapter(adapters["linear"], path)
    save_adapter(adapters["full"], path)  # replace with a different adapter
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    assert load_adapter(path).variant == adapters["full"].variant


def test_official_hand_written_file_round_trips(tmp_path):
    """A file in the official layout, written by another tool, loads and re-saves to the same tensors."""
    from safetensors.torch import save_file

    state = flat(official_resampler(32, 64, 2, 4, 32), official_ip_adapter([16, 32, 16, 32], 32))
    save_file(state, str(tmp_path / "official.safetensors"))
    adapter = load_adapter(tmp_path / "official.safetensors")
    again = load_file(save_adapter(adapter, tmp_path / "ours.safetensors"))
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


# --------------------------------------------------------------------------------------------------
# Full-size models on the meta device
# --------------------------------------------------------------------------------------------------


def sd15_meta_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )


def sdxl_meta_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, attention_head_dim=(5, 10, 20), sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sd15_unet_meta():
    return sd15_meta_unet()


@pytest.fixture(scope="module")
def sdxl_unet_meta():
    return sdxl_meta_unet()


def test_sd15_unet_has_859_520_964_parameters(sd15_unet_meta):
    assert next(sd15_unet_meta.parameters()).is_meta
    assert _count(sd15_unet_meta) == 859_520_964


def test_sd15_cross_attention_layers_are_1_to_31_mid_block_last(sd15_unet_meta):
    layers = cross_attention_layers(sd15_unet_meta)
    assert [layer.index for layer in layers] == list(range(1, 32, 2))
    assert [layer.attn.to_k.out_features for layer in layers] == SD15_WIDTHS
    assert layers[-1].index == 31 and layers[-1].name.startswith("mid_block.")
    assert all(not layer.name.startswith("mid_block.") for layer in layers[:-1])
    assert layers[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    assert all(layer.name.endswith("attn2.processor") for layer in layers)


def test_sd15_base_adapter_has_22_319_616_parameters(sd15_unet_meta):
    with torch.device("meta"):
        adapter = adapter_for_unet(sd15_unet_meta, AdapterVariant("linear", 1024, 768, 4), copy_text_kv=False)
    assert next(adapter.parameters()).is_meta
    # projection: 1024 * 3072 + 3072 (proj) + 2 * 768 (norm) = 3,150,336
    assert _count(adapter.image_proj) == 3_150_336
    # to_k_ip + to_v_ip: 2 * 768 * (5 * 320 + 5 * 640 + 6 * 1280) = 19,169,280
    assert _count(adapter.ip_adapter) == 19_169_280
    assert adapter.num_parameters() == 22_319_616


def test_sd15_adapter_built_for_unet_has_the_official_keys(sd15_unet_meta):
    with torch.device("meta"):
        adapter = adapter_for_unet(sd15_unet_meta, AdapterVariant("linear", 1024, 768, 4), copy_text_kv=False)
        official = flat(official_linear(1024, 768, 4), official_ip_adapter(SD15_WIDTHS, 768))
    assert {k: tuple(v.shape) for k, v in adapter.state_dict().items()} == {k: tuple(v.shape) for k, v in official.items()}


def test_sd15_plus_adapter_has_49_087_488_parameters(sd15_unet_meta):
    """ip-adapter-plus_sd15: 49,087,488 parameters (98.2 MB in fp16), derived by hand:

    latents                16 * 768                                   =     12,288
    proj_in                1280 * 768 + 768                           =    983,808
    per layer (x4)
      norm1, norm2         2 * (2 * 768)                              =      3,072
      to_q                 768 * 768                                  =    589,824
      to_kv                768 * 1536                                 =  1,179,648
      to_out               768 * 768                                  =    589,824
      ff LayerNorm         2 * 768                                    =      1,536
      ff Linear in / out   768 * 3072 + 3072 * 768                    =  4,718,592
      layer total                                                     =  7,082,496
    4 layers                                                          = 28,329,984
    proj_out               768 * 768 + 768                            =    590,592
    norm_out               2 * 768                                    =      1,536
    projection total                                                  = 29,918,208
    to_k_ip / to_v_ip      (same as the base adapter)                 = 19,169,280
    adapter total                                                     = 49,087,488
    """
    variant = AdapterVariant("plus", 1280, 768, 16, resampler_width=768, resampler_depth=4, resampler_ff_mult=4)
    with torch.device("meta"):
        adapter = adapter_for_unet(sd15_unet_meta, variant, copy_text_kv=False)
    layer = adapter.image_proj.layers[0]
    assert _count(layer) == 7_082_496
    assert _count(adapter.image_proj) == 29_918_208
    assert _count(adapter.ip_adapter) == 19_169_280
    assert adapter.num_parameters() == 49_087_488


def test_sdxl_unet_has_70_cross_attention_layers(sdxl_unet_meta):
    # 2,567,463,684: the SDXL base UNet's size (the often quoted "2.6B").
    assert _count(sdxl_unet_meta) == 2_567_463_684
    layers = cross_attention_layers(sdxl_unet_meta)
    assert len(layers) == 70
    assert [layer.index for layer in layers] == list(range(1, 140, 2))
    assert [layer.attn.to_k.out_features for layer in layers] == SDXL_WIDTHS
    assert layers[-1].index == 139 and layers[-1].name.startswith("mid_block.attentions.0.transformer_blocks.9.")
    assert sum(layer.name.startswith("mid_block.") for layer in layers) == 10


def test_sdxl_base_adapter_has_351_285_248_parameters(sdxl_unet_meta):
    """ip-adapter_sdxl: 351,285,248 parameters = the 351.29M in shared/notes/offline-facts.md.

    projection: 1280 * 8192 + 8192 (proj) + 2 * 2048 (norm)            =  10,498,048
    to_k_ip / to_v_ip: 2 * 2048 * (10 * 640 + 60 * 1280)                = 340,787,200
    """
    with torch.device("meta"):
        adapter = adapter_for_unet(sdxl_unet_meta, AdapterVariant("linear", 1280, 2048, 4), copy_text_kv=False)
    assert _count(adapter.image_proj) == 10_498_048
    assert _count(adapter.ip_adapter) == 340_787_200
    assert adapter.num_parameters() == 351_285_248
    assert round(adapter.num_parameters() / 1e6, 2) == 351.29


def test_copy_text_kv_copies_each_layers_to_k_and_to_v():
    unet = tm.sd15_unet()
    adapter = adapter_for_unet(unet, tm.variant("linear", 32, 24), copy_text_kv=True)
    for layer in cross_attention_layers(unet):
        assert torch.equal(adapter.layer(layer.index).to_k_ip.weight, layer.attn.to_k.weight)
        assert torch.equal(adapter.layer(layer.index).to_v_ip.weight, layer.attn.to_v.weight)
        assert adapter.layer(layer.index).to_k_ip.weight.data_ptr() != layer.attn.to_k.weight.data_ptr()
