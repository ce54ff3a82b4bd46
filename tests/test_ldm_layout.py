"""imprompt.models.ldm: diffusers components -> the original single-file layout, read back by diffusers.

Each round trip converts a tiny seeded pipeline, saves it with safetensors, loads it with diffusers' own
``from_single_file`` offline (the configs from ``save_pretrained``, the weights deleted from that folder,
sockets refused) and asserts every tensor is bit-identical. Real-sized models are built on the meta
device to check the key names and shapes diffusers uses to detect v1 / v2 / xl_base / controlnet.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from diffusers import (AutoencoderKL, ControlNetModel, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import tiny_models
from imprompt.models.ldm import (controlnet_to_ldm, detect_base, open_clip_to_ldm, pipeline_to_ldm,
                                 text_encoder_to_ldm, unet_to_ldm, vae_to_ldm)

torch.set_flush_denormal(True)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test instead of downloading."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def text_encoder(seed: int, hidden: int, act: str, projection: int | None = None):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=190, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or hidden,
                            hidden_act=act, bos_token_id=188, eos_token_id=189, pad_token_id=189)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         sample_size=32).eval()


def sd_unet(seed: int, linear: bool) -> UNet2DConditionModel:
    """SD1.5 (conv proj_in) or SD2 (linear proj_in) shaped: three levels, two layers each, attention in
    the first two down and last two up levels, so an upsampler follows a transformer (``.2.conv``)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, sample_size=16,
        attention_head_dim=(2, 4, 4) if linear else 8, use_linear_projection=linear, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def sd_pipeline(base: str, seed: int = 0) -> StableDiffusionPipeline:
    linear = base == "sd2"
    return StableDiffusionPipeline(
        vae=vae(seed), text_encoder=text_encoder(seed, 32, "gelu" if linear else "quick_gelu"),
        tokenizer=tiny_models.tokenizer(), unet=sd_unet(seed, linear), scheduler=tiny_models.scheduler(),
        safety_checker=None, feature_extractor=tiny_models.feature_extractor(), image_encoder=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    # The two encoders must differ in width, as 768 and 1280 do: diffusers picks the layout of each by
    # comparing its width with the file's position embeddings. projection 40 != width 48 makes a missing
    # transpose of text_projection fail.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16, cross_attention_dim=32 + 48,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8,
        norm_num_groups=8,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=vae(seed), text_encoder=text_encoder(seed, 32, "quick_gelu"),
        text_encoder_2=text_encoder(seed + 1, 48, "gelu", projection=40), tokenizer=tiny_models.tokenizer(),
        tokenizer_2=tiny_models.tokenizer(), unet=unet, scheduler=tiny_models.scheduler(),
        feature_extractor=tiny_models.feature_extractor(), image_encoder=None,
    )


def controlnet(seed: int = 0) -> ControlNetModel:
    net = ControlNetModel.from_unet(sd_unet(seed, linear=False), conditioning_embedding_out_channels=(4, 8, 8, 16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # from_unet zero-initialises the outputs; make every tensor distinct
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return net.eval()


def config_folder(model, folder: Path) -> str:
    """``save_pretrained``'s folder with the weights removed: from_single_file needs only its configs."""
    model.save_pretrained(folder)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return str(folder)


def assert_identical(original: torch.nn.Module, loaded: torch.nn.Module, name: str) -> None:
    want, got = original.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want), name
    for key, tensor in want.items():
        assert got[key].device.type != "meta", f"{name}.{key} was not loaded"
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{name}.{key} differs"


@pytest.mark.parametrize("base", ["sd15", "sd2"])
def test_sd_pipeline_round_trip(base, tmp_path, offline):
    pipe = sd_pipeline(base)
    assert detect_base(pipe) == base
    state = pipeline_to_ldm(pipe)
    prefix = {"sd15": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model."}[base]
    stacked = 4 * pipe.text_encoder.config.num_hidden_layers if base == "sd2" else 0  # 6 q/k/v tensors -> 2
    assert sum(k.startswith(prefix) for k in state) == len(pipe.text_encoder.state_dict()) - stacked
    save_file(state, tmp_path / "model.safetensors")
    loaded = StableDiffusionPipeline.from_single_file(str(tmp_path / "model.safetensors"),
                                                      config=config_folder(pipe, tmp_path / "config"),
                                                      local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_identical(getattr(pipe, name), getattr(loaded, name), name)
    assert loaded.unet.config.use_linear_projection == (base == "sd2")


def test_sdxl_pipeline_round_trip(tmp_path, offline):
    pipe = sdxl_pipeline()
    assert detect_base(pipe) == "sdxl"
    state = pipeline_to_ldm(pipe)
    assert state["conditioner.embedders.1.model.text_projection"].shape == (48, 40)
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight" in state
    save_file(state, tmp_path / "model.safetensors")
    loaded = StableDiffusionXLPipeline.from_single_file(str(tmp_path / "model.safetensors"),
                                                        config=config_folder(pipe, tmp_path / "config"),
                                                        local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_identical(getattr(pipe, name), getattr(loaded, name), name)


def test_controlnet_round_trip(tmp_path, offline):
    net = controlnet()
    state = controlnet_to_ldm(net.state_dict(), net.config)
    assert "control_model.input_hint_block.14.weight" in state and "control_model.zero_convs.8.0.weight" in state
    assert infer_diffusers_model_type(state) == "controlnet"
    save_file(state, tmp_path / "control.safetensors")
    loaded = ControlNetModel.from_single_file(str(tmp_path / "control.safetensors"),
                                              config=config_folder(net, tmp_path / "config"), local_files_only=True)
    assert_identical(net, loaded, "controlnet")


def test_components_load_from_a_dict(tmp_path, offline):
    # Model classes (not pipelines) also take the state dict itself instead of a path.
    pipe = sd_pipeline("sd15")
    folder = config_folder(pipe, tmp_path / "config")
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config) | vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    unet = UNet2DConditionModel.from_single_file(state, config=folder, subfolder="unet", local_files_only=True)
    decoder = AutoencoderKL.from_single_file(state, config=folder, subfolder="vae", local_files_only=True)
    assert_identical(pipe.unet, unet, "unet")
    assert_identical(pipe.vae, decoder, "vae")


def test_vae_attention_is_a_1x1_conv():
    model = vae(0)
    state = vae_to_ldm(model.state_dict(), model.config)
    for name in ("q", "k", "v", "proj_out"):
        weight = state[f"first_stage_model.decoder.mid.attn_1.{name}.weight"]
        assert weight.shape == (16, 16, 1, 1)
    assert torch.equal(state["first_stage_model.encoder.mid.attn_1.q.weight"][:, :, 0, 0],
                       model.encoder.mid_block.attentions[0].to_q.weight)
    assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in state  # diffusers' last up block
    assert "first_stage_model.decoder.up.2.upsample.conv.weight" in state  # and its first


def test_unmapped_and_mismatched_keys_are_named():
    unet = sd_unet(0, linear=False)
    state = dict(unet.state_dict())
    with pytest.raises(ValueError, match=r"'down_blocks\.0\.extra\.weight'"):
        unet_to_ldm(state | {"down_blocks.0.extra.weight": torch.zeros(1)}, unet.config)
    with pytest.raises(ValueError, match=r"'down_blocks\.0\.(resnets|attentions)\.1\.[^']+' has no place"):
        unet_to_ldm(state, {**unet.config, "layers_per_block": 1})
    with pytest.raises(ValueError, match=r"no such key"):
        unet_to_ldm({k: v for k, v in state.items() if not k.startswith("mid_block.attentions.")}, unet.config)
    with pytest.raises(ValueError, match=r"expected one of CrossAttnDownBlock2D, DownBlock2D"):
        unet_to_ldm(state, {**unet.config, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D",
                                                                "DownBlock2D"]})
    with pytest.raises(ValueError, match=r"expected 4 widths .* found 2"):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
        controlnet_to_ldm(net.state_dict(), net.config)
    encoder = text_encoder(0, 32, "gelu").state_dict()
    with pytest.raises(ValueError, match=r"k missing"):
        open_clip_to_ldm({k: v for k, v in encoder.items() if "layers.1.self_attn.k_proj" not in k}, "p.")
    with pytest.raises(ValueError, match=r"'text_projection\.weight' has no place"):
        text_encoder_to_ldm(text_encoder(0, 32, "quick_gelu", projection=16).state_dict(), "sd15")


def test_base_mismatch_is_refused():
    pipe = sd_pipeline("sd15")
    with pytest.raises(ValueError, match="text_encoder_2 is None"):
        pipeline_to_ldm(pipe, base="sdxl")
    with pytest.raises(ValueError, match="expected base='sdxl'"):
        pipeline_to_ldm(sdxl_pipeline(), base="sd15")
    with pytest.raises(ValueError, match="expected one of sd15, sd2, sdxl"):
        pipeline_to_ldm(pipe, base="sd3")


def _meta_state(unet_config: dict, texts: list[tuple[dict, bool]], base: str) -> dict:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        encoders = [(CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))
                    for config, projection in texts]
    state = unet_to_ldm(unet.state_dict(), unet.config)
    for index, encoder in enumerate(encoders):
        state |= text_encoder_to_ldm(encoder.state_dict(), base, index)
    return state


CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def test_real_sizes_have_the_keys_diffusers_detects():
    """Full-size configs on the meta device: the file's key names and shapes match the real checkpoints
    (SD1.5 has 686 UNet keys, SDXL 1680) and diffusers' detector names each family."""
    sd15 = _meta_state(dict(cross_attention_dim=768), [(CLIP_L, False)], "sd15")
    assert sum(k.startswith("model.diffusion_model.") for k in sd15) == 686
    assert infer_diffusers_model_type(sd15) == "v1"
    for key, shape in (("model.diffusion_model.output_blocks.11.0.skip_connection.weight", (320, 640, 1, 1)),
                       ("model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
                       ("model.diffusion_model.input_blocks.3.0.op.weight", (320, 320, 3, 3)),
                       ("model.diffusion_model.output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
                       ("model.diffusion_model.output_blocks.8.2.conv.weight", (640, 640, 3, 3)),
                       ("cond_stage_model.transformer.text_model.final_layer_norm.weight", (768,))):
        assert sd15[key].shape == shape, key

    open_clip_h = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                       hidden_act="gelu")
    sd2 = _meta_state(dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
                      [(open_clip_h, False)], "sd2")
    assert infer_diffusers_model_type(sd2) == "v2"
    assert sd2["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert sd2["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)

    big_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")
    xl_unet = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, use_linear_projection=True,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                   addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816)
    xl = _meta_state(xl_unet, [(CLIP_L, False), (big_g, True)], "sdxl")
    assert sum(k.startswith("model.diffusion_model.") for k in xl) == 1680
    assert infer_diffusers_model_type(xl) == "xl_base"
    for key, shape in (("model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
                       ("model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
                       ("model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight", (1280, 1280)),
                       ("model.diffusion_model.output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
                       ("model.diffusion_model.output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
                       ("conditioner.embedders.1.model.text_projection", (1280, 1280)),
                       ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", (1280,)),
                       ("conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                        (768, 3072))):
        assert xl[key].shape == shape, key

    with torch.device("meta"):
        vae_full = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    first_stage = vae_to_ldm(vae_full.state_dict(), vae_full.config)
    assert len(first_stage) == 248
    assert first_stage["first_stage_model.decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert first_stage["first_stage_model.encoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
