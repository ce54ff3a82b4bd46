"""Opt-in step skipping (imprompt.generation.acceleration): T-GATE and DeepCache on tiny models.

What is checked: without acceleration nothing changes (bit for bit, against the plain diffusers
pipeline); T-GATE runs the steps before the gate exactly as a plain run, then computes no
cross-attention and returns the CFG-averaged output kept at the last step before the gate, on half
the batch; DeepCache runs the whole UNet every N steps and only the shallow blocks in between; both
keep their state per call (a generation nested in another is unchanged) and leave the shared UNet
as it was. No timings here (benchmarks/bench_acceleration.py measures speed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from imprompt import GenerationSettings, ImagePrompt, attach, generate
from imprompt.generation.acceleration import Acceleration, cfg_average

torch.set_flush_denormal(True)
STEPS = 6


@pytest.fixture(scope="module")
def world():
    return tm.adapter_world()


def _settings(**extra) -> GenerationSettings:
    return GenerationSettings(**{"prompt": "a red square", "steps": STEPS, "seed": 7, "guidance": 5.0, **extra})


def _latents_per_step(pipe, attachment=None, prompts=(), encoders=(), acceleration=None, **extra):
    """The image and the latents after every step."""
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    image = generate(pipe, attachment, _settings(**extra), list(prompts), list(encoders), output_type="np",
                     callback=record, acceleration=acceleration)
    return image, seen


def _cross_attention_modules(unet):
    return {name: m for name, m in unet.named_modules() if name.endswith("attn2")}


# ------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, expected", [
    ("tgate:10", Acceleration("tgate", 10)), ("DeepCache:3", Acceleration("deepcache", 3)),
    (" tgate:1 ", Acceleration("tgate", 1)), ("none", None), ("", None), (None, None)])
def test_accelerate_values_parse(text, expected):
    assert Acceleration.parse(text) == expected


@pytest.mark.parametrize("text, message", [
    ("tgat:10", "unknown method 'tgat'"), ("tgate", "whole number"), ("tgate:x", "found 'x'"),
    ("deepcache:2.5", "whole number"), ("tgate:0", "at least 1"), ("deepcache:1", "at least 2")])
def test_bad_accelerate_values_say_what_is_expected(text, message):
    with pytest.raises(ValueError, match=message):
        Acceleration.parse(text)


def test_gate_step_must_fall_inside_the_steps():
    with pytest.raises(ValueError, match="below 6"):
        Acceleration.parse("tgate:6").check(steps=6)
    Acceleration.parse("tgate:5").check(steps=6)


def test_cfg_average_is_the_mean_of_the_two_halves():
    out = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # [uncond; cond], batch 1 each
    assert torch.equal(cfg_average(out), torch.tensor([[2.0, 4.0]]))


# ------------------------------------------------------------------------------------ no acceleration

def test_without_acceleration_generation_is_the_plain_pipeline_bit_for_bit(world):
    pipe, _, _ = world
    ours = generate(pipe, None, _settings(), output_type="np")
    none = generate(pipe, None, _settings(), output_type="np", acceleration="none")
    plain = pipe("a red square", num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(7)).images
    assert np.array_equal(ours, plain) and np.array_equal(none, plain)


# ---------------------------------------------------------------------------------------------- T-GATE

def test_tgate_before_the_gate_equals_plain_after_it_reuses_the_averaged_cross_attention(world):
    pipe, adapter, encoder = world
    gate = 3
    modules = _cross_attention_modules(pipe.unet)
    calls, outputs, batches, step = [], {}, [], [0]

    def on_to_k(module, args, out):  # to_k runs only when a cross-attention is computed
        calls.append(step[0])

    def on_attn(name):
        def record(module, args, kwargs, out):  # returns None: a forward hook's return value replaces the output
            outputs.setdefault((name, step[0]), out.clone())
        return record

    def on_step(pipeline, i, timestep, tensors):
        step[0] = i + 1
        return tensors

    handles = [m.to_k.register_forward_hook(on_to_k) for m in modules.values()]
    handles += [m.register_forward_hook(on_attn(n), with_kwargs=True) for n, m in modules.items()]
    handles.append(pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0])))
    refs = [ImagePrompt(tm.reference_images(1), scale=0.8)]
    try:
        with attach(pipe.unet, adapter) as attachment:
            plain_image, plain = _latents_per_step(pipe, attachment, refs, [encoder])
            without_image, _ = _latents_per_step(pipe, None)
            _, gated = _latents_per_step(pipe, attachment, refs, [encoder], acceleration=f"tgate:{gate}")
            calls.clear(), outputs.clear(), batches.clear()
            image = generate(pipe, attachment, _settings(), refs, [encoder], output_type="np",
                             acceleration=f"tgate:{gate}", callback=on_step)
    finally:
        for h in handles:
            h.remove()
    for i in range(gate):  # the image prompt acts before the gate: same steps as the plain run with it
        assert torch.equal(gated[i], plain[i])
    assert not np.array_equal(plain_image, without_image)
    assert not torch.equal(gated[gate], plain[gate])
    # Cross-attention computed in steps 0..gate-1 only, once per layer and step.
    assert sorted(set(calls)) == list(range(gate)) and len(calls) == gate * len(modules)
    # Guidance batch (2) until the gate, then the conditional half only.
    assert batches == [2] * gate + [1] * (STEPS - gate)
    for name in modules:
        kept = cfg_average(outputs[(name, gate - 1)])
        for i in range(gate, STEPS):
            assert torch.equal(outputs[(name, i)], kept)
    assert np.isfinite(image).all()


def test_tgate_without_guidance_keeps_the_output_itself(world):
    pipe, _, _ = world
    modules = _cross_attention_modules(pipe.unet)
    outputs, step = {}, [0]

    def on_step(pipeline, i, timestep, tensors):
        step[0] = i + 1
        return tensors

    def on_attn(name):
        def record(module, args, out):
            outputs.setdefault((name, step[0]), out.clone())
        return record

    handles = [m.register_forward_hook(on_attn(n)) for n, m in modules.items()]
    try:
        generate(pipe, None, _settings(guidance=1.0), output_type="np", acceleration="tgate:2", callback=on_step)
    finally:
        for h in handles:
            h.remove()
    for name in modules:
        assert outputs[(name, 1)].shape[0] == 1
        assert torch.equal(outputs[(name, 4)], outputs[(name, 1)])


def test_tgate_leaves_the_unet_processors_as_they_were(world):
    pipe, _, _ = world
    before = dict(pipe.unet.attn_processors)
    generate(pipe, None, _settings(), output_type="np", acceleration="tgate:2")
    after = pipe.unet.attn_processors
    assert all(after[name] is p for name, p in before.items())


def test_tgate_on_sdxl_halves_the_added_conditioning_too():
    pipe = tm.sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        image = generate(pipe, None, _settings(steps=4), output_type="np", acceleration="tgate:2")
    finally:
        handle.remove()
    assert batches == [2, 2, 1, 1] and np.isfinite(image).all()


# -------------------------------------------------------------------------------------------- DeepCache

def test_deepcache_runs_the_whole_unet_every_n_steps(world):
    pipe, adapter, encoder = world
    deep_calls, shallow_calls = [], []
    h_mid = pipe.unet.mid_block.register_forward_hook(lambda *a: deep_calls.append(1))
    h_first = pipe.unet.down_blocks[0].register_forward_hook(lambda *a: shallow_calls.append(1))
    refs = [ImagePrompt(tm.reference_images(1), scale=0.8)]
    try:
        with attach(pipe.unet, adapter) as attachment:
            plain, _ = _latents_per_step(pipe, attachment, refs, [encoder])
            deep_calls.clear(), shallow_calls.clear()
            cached, _ = _latents_per_step(pipe, attachment, refs, [encoder], acceleration="deepcache:3")
    finally:
        h_mid.remove(), h_first.remove()
    assert len(deep_calls) == 2  # steps 0 and 3 of 6
    assert len(shallow_calls) == STEPS  # the shallow blocks run at every step
    assert np.isfinite(cached).all()
    difference = np.abs(cached - plain).mean()
    assert 0 < difference < 0.1, difference
    assert not pipe.unet.up_blocks[-1]._forward_pre_hooks  # the feature hook is gone


def test_deepcache_on_sdxl():
    pipe = tm.sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe, None, _settings(steps=4), output_type="np")
    cached = generate(pipe, None, _settings(steps=4), output_type="np", acceleration="deepcache:2")
    assert np.isfinite(cached).all() and not np.array_equal(cached, plain)
    assert np.abs(cached - plain).mean() < 0.1


def test_with_a_controlnet_deepcache_adds_its_residuals_and_tgate_keeps_guidance(world):
    from diffusers import StableDiffusionControlNetPipeline

    base, _, _ = world
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=tm.controlnet(base.unet, seed=1))
    pipe.set_progress_bar_config(disable=True)
    control = tm.reference_images(1, 16)[0].resize((16, 16))

    def run(acceleration, scale=1.0):
        # The ControlNet acts from step 2 of 4 on; deepcache:4 runs the whole UNet at step 0 only, so the
        # ControlNet reaches the image only through the shallow steps' skip connections.
        return generate(pipe, None, _settings(steps=4, controlnet_scale=scale, control_guidance_start=0.5),
                        control_image=control, output_type="np", acceleration=acceleration)

    assert not np.array_equal(run("deepcache:4"), run("deepcache:4", scale=0.0))
    batches = []
    handle = base.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        gated = run("tgate:2")
    finally:
        handle.remove()
    assert batches == [2, 2, 2, 2] and np.isfinite(gated).all()  # the doubled control image: no halving


def test_accelerated_generations_keep_their_state_per_call(world):
    """A generation started (and finished) inside another one's step does not disturb either."""
    pipe, _, _ = world
    alone = {a: generate(pipe, None, _settings(seed=s), output_type="np", acceleration=a)
             for a, s in (("tgate:3", 1), ("deepcache:2", 2))}
    nested = {}

    def during(pipeline, step, timestep, tensors):
        if step == 0:
            nested["deepcache:2"] = generate(pipe, None, _settings(seed=2), output_type="np",
                                             acceleration="deepcache:2")
        return tensors

    outer = generate(pipe, None, _settings(seed=1), output_type="np", acceleration="tgate:3", callback=during)
    assert np.array_equal(outer, alone["tgate:3"])
    assert np.array_equal(nested["deepcache:2"], alone["deepcache:2"])


def test_acceleration_refuses_what_it_cannot_combine_with(world):
    pipe, _, _ = world
    with pytest.raises(ValueError, match="prompt changes during the steps"):
        generate(pipe, None, _settings(prompt="a [red:blue:0.5] square"), output_type="np", acceleration="tgate:2")
    with pytest.raises(ValueError, match="below 6"):
        generate(pipe, None, _settings(), output_type="np", acceleration="tgate:6")


# ------------------------------------------------------------- request, command line, PNG info, server

def test_the_command_line_takes_accelerate_and_records_it_in_png_info(tmp_path, capsys):
    from imprompt.cli import main
    from imprompt.generation.pnginfo import parse_parameters, read_parameters

    tm.cli_world(tmp_path, adapter="ip.safetensors")
    args = ["generate", "--model", str(tmp_path / "sd"), "--adapter", str(tmp_path / "models" / "ip.safetensors"),
            "--image", str(tmp_path / "ref0.png"), "--prompt", "a red star", "--steps", "4", "--seed", "7"]
    assert main([*args, "--output", str(tmp_path / "out"), "--accelerate", "tgate:2"]) == 0
    png = next((tmp_path / "out").glob("*.png"))
    assert parse_parameters(read_parameters(png))["Acceleration"] == "tgate:2"
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    assert "Acceleration" not in parse_parameters(read_parameters(next((tmp_path / "plain").glob("*.png"))))
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "bad"), "--accelerate", "deepcache:fast"]) == 2
    err = capsys.readouterr().err
    assert "expected deepcache:N with a whole number N" in err and "Traceback" not in err


@pytest.mark.parametrize("changes, message", [
    ({"accelerate": "tgate:30", "steps": 30}, "below 30"),
    ({"accelerate": "deepcache:3", "cpu_offload": "model"}, "--cpu-offload"),
    ({"accelerate": "turbo:2"}, "unknown method 'turbo'"),
])
def test_the_request_checks_accelerate_before_loading_anything(tmp_path, changes, message):
    from imprompt.generation.request import GenerateRequest

    request = GenerateRequest(model="unused", output=str(tmp_path), device="cpu", **changes)
    with pytest.raises(ValueError, match=message):
        request.check()


def test_the_native_api_passes_accelerate_on():
    from imprompt.server.native import NativeRequest, native_to_request

    body = NativeRequest(prompt="a red star", accelerate="deepcache:3")
    request = native_to_request(body, "model", lambda name, kind: name, lambda ref, where, mode: ref)
    assert request.accelerate == "deepcache:3" and request.acceleration == Acceleration("deepcache", 3)
    assert native_to_request(NativeRequest(), "model", lambda n, k: n, lambda r, w, m: r).acceleration is None
