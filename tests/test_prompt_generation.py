"""The A1111 prompt syntax inside real generations: what the UNet sees step by step, and the same pixels
as diffusers where the syntax is not used."""

import numpy as np
import pytest
import torch

import tiny_models as tm
from imprompt.generation.generate import generate
from imprompt.generation.settings import GenerationSettings
from imprompt.generation.text_encoding import PromptEncoder


def seen_by_unet(pipe):
    """Collects the text states (and SDXL's pooled text_embeds) of every UNet call."""
    seen = []

    def hook(module, args, kwargs):
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        pooled = (kwargs.get("added_cond_kwargs") or {}).get("text_embeds")
        seen.append((states.clone(), None if pooled is None else pooled.clone()))

    return seen, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("make", [tm.sd15_pipeline, tm.sdxl_pipeline], ids=["sd15", "sdxl"])
def test_prompt_editing_switches_what_the_unet_sees(make):
    pipe = make()
    seen, handle = seen_by_unet(pipe)
    try:
        generate(pipe, None, GenerationSettings(prompt="a [red:blue:0.5] cat", negative_prompt="ugly", steps=4,
                                                seed=0, guidance=5.0, height=32, width=32), output_type="np")
    finally:
        handle.remove()
    encoder = PromptEncoder(pipe)
    red, blue, ugly = (encoder.encode(t) for t in ("a red cat", "a blue cat", "ugly"))
    # A1111's rule at 4 steps: [red:blue:0.5] switches after step int(0.5 * 4) = 2, i.e. steps 0-2 red.
    expected = [red, red, red, blue]
    assert len(seen) == 4
    for (states, pooled), cond in zip(seen, expected):
        assert torch.equal(states, torch.cat([ugly.hidden, cond.hidden]))
        if cond.pooled is not None:
            assert torch.equal(pooled, torch.cat([ugly.pooled, cond.pooled]))


def test_alternation_alternates_every_step():
    pipe = tm.sd15_pipeline()
    seen, handle = seen_by_unet(pipe)
    try:
        generate(pipe, None, GenerationSettings(prompt="[cat|dog]", steps=5, seed=0, guidance=1.0, height=32,
                                                width=32), output_type="np")
    finally:
        handle.remove()
    encoder = PromptEncoder(pipe)
    cat, dog = encoder.encode("cat").hidden, encoder.encode("dog").hidden
    assert [torch.equal(s, cat) for s, _ in seen] == [True, True, False, True, False]
    assert [torch.equal(s, dog) for s, _ in seen] == [False, False, True, False, True]


@pytest.mark.parametrize("make", [tm.sd15_pipeline, tm.sdxl_pipeline], ids=["sd15", "sdxl"])
def test_plain_prompt_gives_diffusers_pixels(make):
    pipe = make()
    settings = GenerationSettings(prompt="a red cat", negative_prompt="", steps=3, seed=1, guidance=6.0,
                                  height=32, width=32)
    ours = generate(pipe, None, settings, output_type="np")
    theirs = pipe(prompt="a red cat", num_inference_steps=3, guidance_scale=6.0, height=32, width=32,
                  generator=torch.Generator("cpu").manual_seed(1), output_type="np").images
    assert np.array_equal(ours, theirs)


def test_weighted_prompt_changes_the_picture():
    pipe = tm.sd15_pipeline()
    with torch.no_grad():
        pipe.text_encoder.final_layer_norm.bias.fill_(0.3)

    def run(prompt):
        return generate(pipe, None, GenerationSettings(prompt=prompt, steps=2, seed=1, guidance=6.0, height=32,
                                                       width=32), output_type="np")

    assert np.array_equal(run("a red cat"), run("a (red:1) cat"))  # weight 1 is no weight
    assert not np.array_equal(run("a red cat"), run("a (red:1.6) cat"))
