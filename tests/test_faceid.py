"""IP-Adapter FaceID (h94/IP-Adapter-FaceID): detection, face-embedding input, the LoRA, and parity
with diffusers' own FaceID support (``load_ip_adapter`` + ``ip_adapter_image_embeds``; diffusers
applies the FaceID LoRA itself, through PEFT) on tiny random weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate
from imprompt.adapter.attach import cross_attention_layers
from imprompt.adapter.checkpoint import load_adapter, nest
from imprompt.adapter.model import IPAdapter, LoRAShape
from imprompt.adapter.variants import AdapterVariant, CheckpointError
from imprompt.generation.faceid import FaceEmbeddingError, check_face_embeddings, insightface_embeddings, load_face_embedding

PROMPT = "a portrait"
FACE = 512


def faceid_adapter(unet, kind: str = "faceid", tokens: int = 4, lora_rank: int = 4, clip_width: int = 32,
                   seed: int = 0) -> IPAdapter:
    """A FaceID adapter shaped as the official release for ``unet`` (MLP 512 -> 1024 -> tokens x dim; a
    depth-4 Perceiver for Plus; LoRA on every attention layer), with random weights."""
    modules = dict(unet.named_modules())
    widths = {layer.index: layer.attn.to_k.out_features for layer in cross_attention_layers(unet)}
    loras = {}
    if lora_rank:
        for i, name in enumerate(unet.attn_processors):
            attn = modules[name.removesuffix(".processor")]
            loras[i] = LoRAShape(lora_rank, attn.to_q.in_features, attn.to_k.in_features, attn.to_q.out_features)
    dim = unet.config.cross_attention_dim
    common = dict(face_embed_dim=FACE, face_hidden_dim=2 * FACE, lora_rank=lora_rank)
    if kind == "faceid":
        variant = AdapterVariant("faceid", FACE, dim, tokens, **common)
    else:  # one 64-wide head: diffusers reads the head count as to_q rows // 64
        variant = AdapterVariant("faceid_plus", clip_width, dim, tokens, resampler_width=dim, resampler_depth=4,
                                 resampler_ff_mult=4, resampler_heads=1, **common)
    adapter = IPAdapter(variant, widths, loras)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.1 if "lora" in name else 0.3))
    return adapter


def faces(n: int = 1, seed: int = 5) -> torch.Tensor:
    f = torch.randn(n, FACE, generator=torch.Generator().manual_seed(seed))
    return f / f.norm(dim=-1, keepdim=True)  # as insightface's normed_embedding


def _run(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0), **kwargs).images


def _pipes(family: str):
    pipe = tm.sd15_pipeline() if family == "sd15" else tm.sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, copy.deepcopy(pipe)


@pytest.mark.parametrize("family", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind,tokens,rank,n", [("faceid", 4, 4, 1), ("portrait", 16, 0, 3)], ids=["faceid", "portrait"])
def test_faceid_matches_diffusers(family, kind, tokens, rank, n):
    ours, theirs = _pipes(family)
    adapter = faceid_adapter(ours.unet, "faceid", tokens=tokens, lora_rank=rank)
    face = faces(n)

    theirs.load_ip_adapter(nest({k: v.clone() for k, v in adapter.state_dict().items()}),
                           subfolder="", weight_name="", image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.7)
    embeds = torch.stack([torch.zeros_like(face), face])  # (negative | positive, faces, 512)
    expected = _run(theirs, ip_adapter_image_embeds=[embeds])

    with attach(ours.unet, adapter) as attachment:
        settings = GenerationSettings(prompt=PROMPT, steps=3, guidance=7.5, seed=0)
        got = generate(ours, attachment, settings, [ImagePrompt([], scale=0.7, face_embeddings=face)], [None],
                       output_type="np")
    plain = _run(ours)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - plain).max() > 1e-2


@pytest.mark.parametrize("shortcut,s_scale", [(False, 1.0), (True, 0.6)], ids=["plus", "plusv2"])
def test_faceid_plus_matches_diffusers(shortcut, s_scale):
    ours, theirs = _pipes("sd15")
    encoder = tm.image_encoder()
    adapter = faceid_adapter(ours.unet, "plus", clip_width=encoder.config.hidden_size)
    face, crop = faces(1), tm.reference_images(1)

    theirs.image_encoder = copy.deepcopy(encoder)
    theirs.load_ip_adapter(nest({k: v.clone() for k, v in adapter.state_dict().items()}),
                           subfolder="", weight_name="", image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.7)
    # As diffusers' docs (ip_adapter.md, "IP-Adapter-FaceID-Plus"): the CLIP features travel on the projection.
    clip_embeds = theirs.prepare_ip_adapter_image_embeds([crop], None, torch.device("cpu"), 1, True)[0]
    projection = theirs.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds, projection.shortcut, projection.shortcut_scale = clip_embeds, shortcut, s_scale
    expected = _run(theirs, ip_adapter_image_embeds=[torch.stack([torch.zeros_like(face), face])])

    with attach(ours.unet, adapter) as attachment:
        settings = GenerationSettings(prompt=PROMPT, steps=3, guidance=7.5, seed=0)
        prompt = ImagePrompt(crop, scale=0.7, face_embeddings=face[0].numpy(), shortcut=shortcut, s_scale=s_scale)
        got = generate(ours, attachment, settings, [prompt], [ImageEncoder(encoder)], output_type="np")
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - _run(ours)).max() > 1e-2


# --- detection and refusals ------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tokens,rank,name", [
    ("faceid", 4, 4, "faceid (SD1.5-shaped"), ("faceid", 16, 0, "faceid-portrait"), ("plus", 4, 4, "faceid-plus")])
@pytest.mark.parametrize("ext", [".bin", ".safetensors"])
def test_each_kind_is_detected_from_its_keys(tmp_path, kind, tokens, rank, name, ext):
    unet = tm.sd15_unet()
    adapter = faceid_adapter(unet, kind, tokens=tokens, lora_rank=rank)
    state = adapter.state_dict()
    if rank:  # LoRA on every attention layer, self-attention included; image K/V only at attn2
        assert {f"ip_adapter.{i}.to_out_lora.up.weight" for i in range(len(unet.attn_processors))} <= set(state)
        assert "ip_adapter.0.to_k_ip.weight" not in state and "ip_adapter.1.to_k_ip.weight" in state
    else:
        assert not any("lora" in k for k in state)
    from imprompt.adapter.checkpoint import save_adapter
    path = save_adapter(adapter, tmp_path / f"ip-adapter-faceid{'-plusv2' if kind == 'plus' else ''}_sd15{ext}")
    loaded = load_adapter(path)
    assert loaded.variant == adapter.variant
    assert loaded.variant.num_tokens == tokens and loaded.variant.lora_rank == rank
    assert loaded.variant.display_name in name and loaded.lora_ids == adapter.lora_ids
    assert loaded.shortcut_default == (kind == "plus")  # PlusV2, by its file name
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def _state(kind="faceid", rank=4, **kw):
    return {k: v.clone() for k, v in faceid_adapter(tm.sd15_unet(), kind, lora_rank=rank, **kw).state_dict().items()}


def test_refusals_name_the_problem():
    state = _state()
    cut = {k: v for k, v in state.items() if k != "ip_adapter.2.to_v_lora.up.weight"}
    with pytest.raises(CheckpointError, match=r"layer 2's LoRA is incomplete: 'ip_adapter.2.to_v_lora.up.weight' is missing"):
        IPAdapter.from_state_dict(cut)
    wide = {**state, "image_proj.proj.0.weight": torch.zeros(1024, 768)}
    with pytest.raises(CheckpointError, match=r"reads a face embedding of width 768; every FaceID release reads insightface's 512"):
        IPAdapter.from_state_dict(wide)
    odd = {**state, "image_proj.proj.2.weight": torch.zeros(130, 1024)}
    with pytest.raises(CheckpointError, match=r"has 130 rows, not a multiple of the token width 32"):
        IPAdapter.from_state_dict(odd)
    # LoRA weights beside a plain IP-Adapter projection: two files mixed
    plain = {k: v for k, v in tm.random_adapter(tm.sd15_unet()).state_dict().items()}
    mixed = {**plain, "ip_adapter.0.to_q_lora.down.weight": torch.zeros(4, 16)}
    with pytest.raises(CheckpointError, match=r"'ip_adapter.0.to_q_lora.down.weight' is a FaceID LoRA weight, but the image "
                                              r"projection is not FaceID's"):
        IPAdapter.from_state_dict(mixed)
    bad = {**state, "ip_adapter.1.to_k_lora.up.weight": torch.zeros(16, 5)}
    with pytest.raises(CheckpointError, match=r"'ip_adapter.1.to_k_lora.up.weight' has shape \(16, 5\), expected \(16, 4\)"):
        IPAdapter.from_state_dict(bad)


def test_a_lora_for_another_unet_is_refused_at_attach():
    state = _state()
    # layer 0 (a self-attention) made 24 wide instead of 16: consistent in the file, wrong for this UNet
    state["ip_adapter.0.to_q_lora.down.weight"] = torch.zeros(4, 24)
    state["ip_adapter.0.to_out_lora.up.weight"] = torch.zeros(24, 4)
    adapter = IPAdapter.from_state_dict(state)
    with pytest.raises(CheckpointError, match=r"ip_adapter.0.to_q_lora maps width 24 to 16, but this UNet's "
                                              r"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q maps 16 to 16"):
        attach(tm.sd15_unet(), adapter)


# --- the LoRA ------------------------------------------------------------------------------------------

def test_lora_linear_is_the_official_sum():
    from imprompt.adapter.lora import LayerLoRA, lora_linear
    linear = torch.nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]))
        linear.bias.copy_(torch.tensor([0.5, -1.0]))
    down, up = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[2.0], [-1.0]])  # rank 1
    x = torch.tensor([[1.0, 2.0, 3.0]])
    lora = LayerLoRA({"to_q": down}, {"to_q": up}, scale=0.5)
    # W x + b = (7.5, 1); down x = 3; up (down x) = (6, -3); half of it added
    assert lora_linear(linear, x, [lora], "to_q").tolist() == [[10.5, -0.5]]
    assert torch.equal(lora_linear(linear, x, [], "to_q"), linear(x))


def test_lora_acts_and_leaves_the_unet_bit_for_bit():
    unet = tm.sd15_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = dict(unet.attn_processors)
    generator = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 7, 32, generator=generator)

    def run(call=None):
        with torch.no_grad():
            kwargs = {"cross_attention_kwargs": call.cross_attention_kwargs()} if call is not None else {}
            return unet(sample, 10, text, **kwargs).sample

    plain = run()
    with attach(unet, faceid_adapter(unet, "faceid")) as attachment:
        lora = attachment.layer_loras(0, 1.0)
        assert len(lora) == len(unet.attn_processors)  # self-attention layers too
        with_lora = run(attachment.prompt_call([lora, attachment.layer_loras(0, 1.0)]))  # once per adapter
        once = run(attachment.prompt_call([lora]))
        off = run(attachment.prompt_call([attachment.layer_loras(0, 0.0)]))
        assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # never merged
    assert (with_lora - plain).abs().max() > 1e-3 and torch.equal(with_lora, once)
    assert (off - plain).abs().max() <= 1e-6  # the same attention, computed by our processor
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all(a is b for a, b in zip(unet.attn_processors.values(), processors.values()))
    assert torch.equal(run(), plain)


# --- face embeddings -------------------------------------------------------------------------------

def test_face_embedding_files(tmp_path):
    one, three = faces(1)[0].numpy(), faces(3).numpy()
    np.save(tmp_path / "one.npy", one)
    np.save(tmp_path / "three.npy", three)
    save_file({"embedding": torch.from_numpy(three)}, str(tmp_path / "three.safetensors"))
    assert load_face_embedding(tmp_path / "one.npy").shape == (1, 512)
    assert torch.equal(load_face_embedding(tmp_path / "three.npy"), torch.from_numpy(three))
    assert torch.equal(load_face_embedding(tmp_path / "three.safetensors"), torch.from_numpy(three))
    assert check_face_embeddings([one, three]).shape == (4, 512)

    np.save(tmp_path / "short.npy", np.zeros(511, np.float32))
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 512), np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    save_file({"a": torch.zeros(512), "b": torch.zeros(512)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "face.txt").write_text("0.1 0.2")
    for name, message in [("short.npy", r"short.npy has shape \(511,\); expected \(512,\) or \(n, 512\)"),
                          ("cube.npy", r"cube.npy has shape \(2, 3, 512\)"),
                          ("objects.npy", r"cannot read objects.npy as a face embedding"),
                          ("two.safetensors", r"two.safetensors holds 2 tensors \(a, b\); a face embedding file holds one"),
                          ("face.txt", r"face.txt: a face embedding is a .npy or .safetensors file"),
                          ("missing.npy", r"does not exist")]:
        with pytest.raises(FaceEmbeddingError, match=message):
            load_face_embedding(tmp_path / name)
    with pytest.raises(FaceEmbeddingError, match="NaN"):
        check_face_embeddings(np.full(512, np.nan, np.float32))


def test_without_insightface_the_message_says_what_to_do():
    pytest.importorskip("PIL")
    try:
        import insightface  # noqa: F401
        pytest.skip("insightface is installed here")
    except ImportError:
        pass
    with pytest.raises(FaceEmbeddingError) as err:
        insightface_embeddings(tm.reference_images(1))
    message = str(err.value)
    assert "needs insightface, which is not installed" in message
    assert "pip install 'imprompt[faceid]'" in message and "--face-embedding face.npy" in message
    # and through a generation that gives a face image but no embedding
    pipe = tm.sd15_pipeline()
    with attach(pipe.unet, faceid_adapter(pipe.unet)) as attachment:
        with pytest.raises(FaceEmbeddingError, match=r"pip install 'imprompt\[faceid\]'"):
            generate(pipe, attachment, GenerationSettings(prompt=PROMPT, steps=1), [ImagePrompt(tm.reference_images(1))], [None])


def test_face_embeddings_for_a_clip_adapter_are_refused():
    pipe = tm.sd15_pipeline()
    encoder = tm.image_encoder()
    with attach(pipe.unet, tm.random_adapter(pipe.unet, encoder=encoder)) as attachment:
        with pytest.raises(ValueError, match=r"face embeddings were given for adapter 0, a base .* only FaceID adapters"):
            generate(pipe, attachment, GenerationSettings(prompt=PROMPT, steps=1),
                     [ImagePrompt(tm.reference_images(1), face_embeddings=faces(1))], [ImageEncoder(encoder)])


# --- the command line ----------------------------------------------------------------------------

def test_command_line_face_embeddings(tmp_path, capsys):
    from PIL import Image

    from imprompt.adapter.checkpoint import save_adapter
    from imprompt.cli import main
    from imprompt.generation.pnginfo import parse_parameters, read_parameters

    pipe = tm.sd15_pipeline()
    pipe.save_pretrained(tmp_path / "sd")
    adapter = faceid_adapter(pipe.unet, "faceid", tokens=16, lora_rank=0)  # Portrait: several faces, no CLIP
    save_adapter(adapter, tmp_path / "ip-adapter-faceid-portrait_sd15.bin")
    np.save(tmp_path / "a.npy", faces(1, seed=1)[0].numpy())
    np.save(tmp_path / "b.npy", faces(2, seed=2).numpy())
    args = ["generate", "--model", str(tmp_path / "sd"), "--adapter", str(tmp_path / "ip-adapter-faceid-portrait_sd15.bin"),
            "--prompt", PROMPT, "--steps", "3", "--seed", "7", "--scale", "0.8", "--output", str(tmp_path / "out")]
    assert main([*args, "--face-embedding", str(tmp_path / "a.npy"), "--face-embedding", f"0={tmp_path / 'b.npy'}"]) == 0
    png = next((tmp_path / "out").glob("*.png"))
    described = parse_parameters(read_parameters(png))["IP-Adapter 0"]
    assert described.startswith("Model: ip-adapter-faceid-portrait_sd15, Weight: 0.8, Combine: concat")  # no images
    assert described.endswith("Face embeddings: a.npy+b.npy")

    pipe.set_progress_bar_config(disable=True)
    with attach(pipe.unet, load_adapter(tmp_path / "ip-adapter-faceid-portrait_sd15.bin")) as attachment:
        prompt = ImagePrompt([], scale=0.8, face_embeddings=[np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")])
        expected = generate(pipe, attachment, GenerationSettings(prompt=PROMPT, steps=3, seed=7), [prompt], [None])[0]
    assert np.abs(np.asarray(Image.open(png), np.int16) - np.asarray(expected, np.int16)).max() <= 1

    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    capsys.readouterr()
    assert main([*args, "--face-embedding", str(tmp_path / "bad.npy")]) != 0
    assert "bad.npy has shape (2, 3); expected (512,) or (n, 512)" in capsys.readouterr().err


def test_faceid_options_per_adapter():
    from imprompt.generation.request import GenerateRequest, adapter_options

    request = GenerateRequest(adapter=["a.bin", "b.bin"], image=["1=crop.png"], face_embedding=["a.npy", "a2.npy", "1=b.npy"],
                              shortcut=["1=on"], s_scale=["1=0.5"], lora_scale=["0.8"])
    first, second = adapter_options(request)
    assert (first.face_embeddings, first.shortcut, first.lora_scale, first.images) == (("a.npy", "a2.npy"), None, 0.8, ())
    assert (second.face_embeddings, second.shortcut, second.s_scale) == (("b.npy",), True, 0.5)
    assert "Face embeddings: b.npy" in second.describe() and "Shortcut: on, S scale: 0.5" in second.describe()
    with pytest.raises(ValueError, match=r"--shortcut 'maybe': expected on or off"):
        adapter_options(GenerateRequest(adapter=["a.bin"], face_embedding=["a.npy"], shortcut=["maybe"]))
    with pytest.raises(ValueError, match=r"adapter 0 \(a.bin\) has no reference image; give --image 0=PATH \(or --embeds 0=FILE; "
                                         r"FaceID: --face-embedding 0=FILE\)"):
        adapter_options(GenerateRequest(adapter=["a.bin"], lora_scale=["1"]))
