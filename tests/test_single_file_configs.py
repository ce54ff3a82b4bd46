"""The shipped single-file configs and tokenizers: the published architectures, read back as their base."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from imprompt.generation.pipelines import MemoryOptions, pick_device, pick_dtype
from imprompt.models import ldm
from imprompt.models.inspect import classify_shapes
from imprompt.models.single_file import CONFIGS
from imprompt.models.tokenizers import VOCAB_SIZE, clip_tokenizer


def test_clip_tokenizer_is_the_published_one():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE == 49408
    # Ids as openai/clip-vit-large-patch14 gives them (bos 49406, eos 49407; 'a</w>' 320, 'cat</w>' 2368).
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("x", padding="max_length").input_ids[-1] == 49407  # SD1.5 pads with <|endoftext|>
    assert clip_tokenizer("!")("x", padding="max_length").input_ids[-1] == 0  # SD2 / SDXL's second: '!'


def _meta_shapes(folder) -> dict[str, tuple[int, ...]]:
    """The single-file key shapes of the full-size model the shipped configs describe (built on meta)."""
    read = lambda sub: json.loads((folder / sub / "config.json").read_text())  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read("unet"))
        vae = AutoencoderKL.from_config(read("vae"))
        texts = [CLIPTextModel(CLIPTextConfig(**read("text_encoder")))]
        if (folder / "text_encoder_2").is_dir():
            texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**read("text_encoder_2"))))
    base = {"sd15": "sd15", "sd2": "sd2", "sdxl": "sdxl"}[folder.name]
    state = {**ldm.unet_to_ldm(unet.state_dict(), unet.config), **ldm.vae_to_ldm(vae.state_dict(), vae.config)}
    for i, text in enumerate(texts):
        state.update(ldm.text_encoder_to_ldm(text.state_dict(), base, i))
    return {k: tuple(v.shape) for k, v in state.items()}, unet


@pytest.mark.parametrize("name, base, unet_params", [("sd15", "SD1.5", 859_520_964), ("sd2", "SD2", 865_910_724),
                                                     ("sdxl", "SDXL", 2_567_463_684)])
def test_shipped_configs_are_the_published_architectures(name, base, unet_params):
    shapes, unet = _meta_shapes(CONFIGS / name)
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    info = classify_shapes(shapes, f"{name}.safetensors")
    assert (info.kind, info.base, info.problem) == ("checkpoint", base, None)


def test_device_and_dtype_choices():
    assert pick_device("auto") == torch.device("cpu")  # no accelerator on this machine
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert pick_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto or one of float32, float16, bfloat16, got 'half'"):
        pick_dtype("half", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a GPU device"):
        MemoryOptions(cpu_offload="model").check(torch.device("cpu"))
    with pytest.raises(ValueError, match="is not available here"):
        pick_device("cuda")
