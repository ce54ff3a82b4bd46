"""Per-call state: generations that share one UNet never see each other's image prompts.

A server runs requests side by side on one model. Each generation's image prompts and its progress
through the schedule travel with the call (``cross_attention_kwargs``); the processors installed on
the UNet hold only what is fixed at attach time. These tests interleave generations with different
adapters, scales and step windows and compare every pixel with the same generation run alone.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate
from imprompt.adapter.attention import DecoupledAttnProcessor


@pytest.fixture(scope="module")
def world():
    pipe = tm.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    vision = tm.image_encoder()
    adapters = [tm.random_adapter(pipe.unet, "linear", seed=s, encoder=vision) for s in (0, 1)]
    return pipe, adapters, ImageEncoder(vision)


def _settings(**extra) -> GenerationSettings:
    return GenerationSettings(**{"prompt": "a red square", "steps": 4, "seed": 7, **extra})


def _run(pipe, attachment, prompt, encoder, callback=None, **extra):
    return generate(pipe, attachment, _settings(**extra), [prompt], [encoder], output_type="np", callback=callback)


def test_a_generation_nested_inside_another_changes_neither(world):
    pipe, (adapter_a, adapter_b), encoder = world
    refs = tm.reference_images(2)
    prompt_a = ImagePrompt(refs[:1], scale=0.9, start=0.25)  # its window opens after the nested run
    prompt_b = ImagePrompt(refs[1:], scale=0.5)
    with attach(pipe.unet, adapter_a) as a, attach(pipe.unet, adapter_b) as b:
        alone_a = _run(pipe, a, prompt_a, encoder)
        alone_b = _run(pipe, b, prompt_b, encoder, seed=3)
        nested = {}

        def during_a(pipeline, step, timestep, tensors):
            if step == 0:  # B starts and finishes between A's first and second UNet calls
                nested["b"] = _run(pipe, b, prompt_b, encoder, seed=3)
            return tensors

        interleaved_a = _run(pipe, a, prompt_a, encoder, callback=during_a)
    assert np.array_equal(interleaved_a, alone_a)
    assert np.array_equal(nested["b"], alone_b)
    assert not np.array_equal(alone_a, alone_b)  # the two really differ, so mixing them would show


def test_concurrent_generations_in_threads_match_their_solo_runs(world):
    pipe, (adapter_a, adapter_b), encoder = world
    refs = tm.reference_images(2)
    jobs = {
        "a": (adapter_a, ImagePrompt(refs[:1], scale=0.8), {"seed": 1}),
        "b": (adapter_b, ImagePrompt(refs[1:], scale=0.3, end=0.5), {"seed": 2, "scheduler": "euler"}),
    }
    with attach(pipe.unet, adapter_a) as a, attach(pipe.unet, adapter_b) as b:
        attachments = {"a": a, "b": b}
        alone = {k: _run(pipe, attachments[k], p, encoder, **x) for k, (_, p, x) in jobs.items()}
        together: dict[str, np.ndarray] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def work(key):
            try:
                _, prompt, extra = jobs[key]
                barrier.wait(timeout=30)
                for _ in range(2):  # several rounds so the calls overlap at different steps
                    together[key] = _run(pipe, attachments[key], prompt, encoder, **extra)
            except BaseException as err:  # reported below; a thread's exception is otherwise lost
                errors.append(err)

        threads = [threading.Thread(target=work, args=(k,)) for k in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert set(together) == {"a", "b"}
    for key in jobs:
        assert np.array_equal(together[key], alone[key]), key


def test_attachments_share_the_unet_and_the_last_detach_restores_it(world):
    pipe, (adapter_a, adapter_b), encoder = world
    original = dict(pipe.unet.attn_processors)
    prompt = ImagePrompt(tm.reference_images(1), scale=0.7)
    plain = generate(pipe, None, _settings(), output_type="np")
    with attach(pipe.unet, adapter_b) as b:
        solo_b = _run(pipe, b, prompt, encoder)
    a = attach(pipe.unet, adapter_a)
    b = attach(pipe.unet, adapter_b)
    # A call that brings no image prompts sees the plain UNet while adapters are attached.
    assert np.array_equal(generate(pipe, None, _settings(), output_type="np"), plain)
    a.detach()
    assert all(isinstance(p, DecoupledAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert np.array_equal(_run(pipe, b, prompt, encoder), solo_b)  # b still works after a left
    b.detach()
    after = pipe.unet.attn_processors
    assert list(after) == list(original) and all(after[k] is original[k] for k in after)
    with pytest.raises(RuntimeError, match="detached"):
        _run(pipe, b, prompt, encoder)


def test_generation_leaves_the_callers_pipeline_untouched(world):
    pipe, (adapter, _), encoder = world
    scheduler = pipe.scheduler
    with attach(pipe.unet, adapter) as attachment:
        _run(pipe, attachment, ImagePrompt(tm.reference_images(1)), encoder, scheduler="euler_a")
    assert pipe.scheduler is scheduler  # the scheduler choice lived in the call's own pipeline view
    assert getattr(pipe, "_cross_attention_kwargs", None) is None


def test_unet_called_directly_with_a_prompt_call(world):
    """The training path: a UNet forward with the call state in cross_attention_kwargs."""
    pipe, (adapter, _), encoder = world
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 5, 32, generator=generator)
    with attach(unet, adapter) as attachment, torch.no_grad():
        plain = unet(latents, 10, text).sample
        tokens = adapter.project(torch.randn(1, 24, generator=generator))
        call = attachment.prompt_call([attachment.layer_kv(0, tokens, scale=1.0, layer_scales=_all())])
        with_image = unet(latents, 10, text, cross_attention_kwargs=call.cross_attention_kwargs()).sample
        again = unet(latents, 10, text).sample
    assert not torch.equal(plain, with_image)
    assert torch.equal(plain, again)


def _all():
    from imprompt import LayerScales

    return LayerScales()
