"""Batched generation (imprompt.generation.batched, imprompt.evaluation.batched) against single calls.

What is asserted, and why not more: oneDNN picks convolution (and small matrix-product) algorithms by
batch size, so the same row computed in a batch of 4 and in a batch of 24 can differ in the last bits
(measured on the toy UNet: ~1e-6). So:

* with batch-invariant kernels (every convolution, linear layer and group norm run one row at a time,
  the ``rowwise_kernels`` fixture), a batch equals the single calls bit for bit: everything else (text
  embeddings, image keys and values, each row's noise, scheduler, attention, norms) is exact;
* with the ordinary kernels, a batch of one item equals the single call bit for bit, and a batch of
  several equals the single calls to 1e-5 in float, and in uint8 pixels up to a difference of 1 in
  rare pixels (values at a rounding boundary; on the development CPU none of these differed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from transformers import CLIPImageProcessor

import tiny_models as tm
from imprompt.adapter.attach import attach
from imprompt.adapter.attention import ImageKV, StepWindow
from imprompt.adapter.checkpoint import save_adapter
from imprompt.adapter.model import IPAdapter
from imprompt.adapter.variants import AdapterVariant
from imprompt.encoding import ImageEncoder
from imprompt.evaluation.config import load_config
from imprompt.evaluation.run import evaluate
from imprompt.generation.batched import BatchItem, generate_batch, stack_image_kv
from imprompt.generation.generate import generate
from imprompt.generation.prompts import ImagePrompt
from imprompt.generation.settings import GenerationSettings

STEPS = 3
SEEDS = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]  # 6 items x 2 images: 24 UNet rows with guidance
TEXTS = ["a red", "bb", "", "c", "dd e", "f"]


@pytest.fixture(scope="module")
def models():
    pipe = tm.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    encoder_model = tm.image_encoder()
    adapter = tm.random_adapter(pipe.unet, "linear", encoder=encoder_model)
    return pipe, adapter, ImageEncoder(encoder_model, tm.feature_extractor()), tm.reference_images(len(SEEDS))


@pytest.fixture
def rowwise_kernels(monkeypatch):
    """Every convolution, linear layer and group norm computed one batch row at a time: batch-size
    independent. Rows are made contiguous: after the toy VAE's attention block a batch's rows have
    channels-last strides and a single row's do not, and the kernels differ by layout."""
    conv, linear, group_norm = nn.Conv2d._conv_forward, nn.Linear.forward, nn.GroupNorm.forward
    monkeypatch.setattr(nn.GroupNorm, "forward", lambda self, x: torch.cat(
        [group_norm(self, x[i:i + 1].contiguous()) for i in range(x.shape[0])]))
    monkeypatch.setattr(nn.Conv2d, "_conv_forward",
                        lambda self, x, w, b: torch.cat([conv(self, x[i:i + 1].contiguous(), w, b)
                                                         for i in range(x.shape[0])]))
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: torch.cat(
        [linear(self, x[i:i + 1]) for i in range(x.shape[0])]) if x.ndim > 1 else linear(self, x))


def single_calls(pipe, attachment, encoder, refs, kind: str, scale: float = 0.7) -> list[np.ndarray]:
    out = []
    for ref, seeds, text in zip(refs, SEEDS, TEXTS):
        settings = GenerationSettings(prompt="" if kind == "unconditional" else text, steps=STEPS,
                                      guidance=1.0 if kind == "unconditional" else 7.5, num_images=len(seeds),
                                      extra={"generator": [torch.Generator("cpu").manual_seed(s) for s in seeds]})
        prompts = [ImagePrompt([ref], scale=scale)] if kind == "ip_adapter" else []
        out.append(np.asarray(generate(pipe, attachment, settings, prompts, [encoder] if prompts else [],
                                       output_type="np")))
    return out


def batched(pipe, attachment, encoder, refs, kind: str, scale: float = 0.7, count: int = len(SEEDS)) -> list[np.ndarray]:
    items = [BatchItem(seeds, "" if kind == "unconditional" else text,
                       image_prompts=[ImagePrompt([ref], scale=scale)] if kind == "ip_adapter" else [])
             for ref, seeds, text in list(zip(refs, SEEDS, TEXTS))[:count]]
    settings = GenerationSettings(steps=STEPS, guidance=1.0 if kind == "unconditional" else 7.5)
    images = generate_batch(pipe, attachment, settings, items, [encoder] if kind == "ip_adapter" else [], output_type="np")
    return [np.stack(item) for item in images]


def run_both(models, kind: str):
    pipe, adapter, encoder, refs = models
    if kind == "ip_adapter":
        with attach(pipe.unet, adapter) as attachment:
            return single_calls(pipe, attachment, encoder, refs, kind), batched(pipe, attachment, encoder, refs, kind)
    return single_calls(pipe, None, encoder, refs, kind), batched(pipe, None, encoder, refs, kind)


@pytest.mark.parametrize("kind", ["ip_adapter", "text_only", "unconditional"])
def test_batch_equals_single_calls_bit_for_bit_with_batch_invariant_kernels(models, rowwise_kernels, kind):
    single, batch = run_both(models, kind)
    assert len(batch) == len(SEEDS) and all(b.shape == (2, 16, 16, 3) for b in batch)
    for s, b in zip(single, batch):
        assert np.array_equal(s, b)
    assert not np.array_equal(batch[0][0], batch[0][1])  # each row has its own seed
    assert not np.array_equal(batch[0][0], batch[1][0])  # and each item its own prompt


@pytest.mark.parametrize("kind", ["ip_adapter", "text_only", "unconditional"])
def test_batch_equals_single_calls_to_float_rounding(models, kind):
    single, batch = run_both(models, kind)
    pixels_differing, pixels = 0, 0
    for s, b in zip(single, batch):
        np.testing.assert_allclose(b, s, rtol=0, atol=1e-5)
        diff = np.abs((s * 255).round().astype(int) - (b * 255).round().astype(int))
        assert diff.max() <= 1
        pixels_differing += int((diff > 0).sum())
        pixels += diff.size
    assert pixels_differing <= pixels * 1e-3


def test_a_batch_of_one_is_the_single_call_bit_for_bit(models):
    pipe, adapter, encoder, refs = models
    with attach(pipe.unet, adapter) as attachment:
        single = single_calls(pipe, attachment, encoder, refs[:1], "ip_adapter")
        batch = batched(pipe, attachment, encoder, refs, "ip_adapter", count=1)
    assert np.array_equal(single[0], batch[0])


def test_the_adapter_acts_per_row(models, rowwise_kernels):
    """Each row sees its own reference: scale 0 (no image attention at all) gives other images."""
    pipe, adapter, encoder, refs = models
    with attach(pipe.unet, adapter) as attachment:
        with_image = batched(pipe, attachment, encoder, refs, "ip_adapter", count=2)
        without = batched(pipe, attachment, encoder, refs, "ip_adapter", scale=0.0, count=2)
        swapped = batched(pipe, attachment, encoder, [refs[1], refs[0]], "ip_adapter", count=2)
    text_only = batched(pipe, None, encoder, refs, "text_only", count=2)
    assert np.array_equal(without[0], text_only[0])  # scale 0: the plain UNet, bit for bit
    assert not np.array_equal(with_image[0], without[0])
    assert not np.array_equal(with_image[0], swapped[0])  # same seeds and text, the other reference


def kv(value: float, rows: int, tokens: int = 3, scale: float = 1.0) -> ImageKV:
    t = torch.full((rows, 2, tokens, 4), value)
    return ImageKV(t, -t, scale, StepWindow())


def test_stack_image_kv_lays_rows_out_as_diffusers_does():
    # item 0: one image (rows u0, c0); item 1: two images (u1, u1, c1, c1) -> [u0, u1, u1, c0, c1, c1]
    first = {"down": ImageKV(torch.tensor([10.0, 11.0]).reshape(2, 1, 1, 1).expand(2, 2, 3, 4).clone(),
                             torch.zeros(2, 2, 3, 4), 0.5, StepWindow())}
    second = {"down": ImageKV(torch.tensor([20.0, 20.0, 21.0, 21.0]).reshape(4, 1, 1, 1).expand(4, 2, 3, 4).clone(),
                              torch.zeros(4, 2, 3, 4), 0.5, StepWindow())}
    out = stack_image_kv([first, second], [1, 2], guidance=True)["down"]
    assert out.key[:, 0, 0, 0].tolist() == [10.0, 20.0, 20.0, 11.0, 21.0, 21.0]
    assert out.scale == 0.5 and out.key.shape == (6, 2, 3, 4)
    unguided = stack_image_kv([{"down": kv(1.0, 1)}, {"down": kv(2.0, 2)}], [1, 2], guidance=False)["down"]
    assert unguided.key[:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0] and unguided.value[:, 0, 0, 0].tolist() == [-1.0, -2.0, -2.0]


@pytest.mark.parametrize("second, message", [
    ({"down": kv(2.0, 2, scale=0.5)}, "one batch takes one scale"),
    ({"down": kv(2.0, 2, tokens=5)}, "same number of reference images"),
    ({"up": kv(2.0, 2)}, "other layers"),
    ({"down": kv(2.0, 3)}, "expected 2"),
])
def test_stack_image_kv_refuses_what_rows_cannot_share(second, message):
    with pytest.raises(ValueError, match=message):
        stack_image_kv([{"down": kv(1.0, 2)}, second], [1, 1], guidance=True)


def test_bad_batches_say_what_is_wrong(models):
    pipe, adapter, encoder, refs = models
    with pytest.raises(ValueError, match="per item"):
        generate_batch(pipe, None, GenerationSettings(prompt="x", steps=1), [BatchItem([1])])
    with pytest.raises(ValueError, match="at least one seed"):
        generate_batch(pipe, None, GenerationSettings(steps=1), [BatchItem([])])
    with pytest.raises(ValueError, match="prompt editing"):
        generate_batch(pipe, None, GenerationSettings(steps=2), [BatchItem([1], "[cat:dog:0.5]")])
    with attach(pipe.unet, adapter) as attachment, pytest.raises(ValueError, match="same number of image prompts"):
        generate_batch(pipe, attachment, GenerationSettings(steps=1),
                       [BatchItem([1], image_prompts=[ImagePrompt([refs[0]])]), BatchItem([2])], [encoder])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny model, adapters and scoring CLIP on disk, as test_evaluation builds them (smaller)."""
    from test_evaluation import tiny_clip

    root = tmp_path_factory.mktemp("batched-eval")
    pipe = tm.sd15_pipeline()
    pipe.unet.register_to_config(sample_size=16)  # 32 px: the toy world's size
    pipe.save_pretrained(root / "sd")
    encoder = tm.image_encoder()
    encoder.save_pretrained(root / "encoder")
    save_adapter(tm.random_adapter(pipe.unet, "linear", encoder=encoder), root / "ip.safetensors")
    torch.manual_seed(1)
    save_adapter(IPAdapter(AdapterVariant("linear", 24, 32, 4), {}), root / "shared.safetensors")
    tiny_clip().save_pretrained(root / "clip")
    tm.tokenizer().save_pretrained(root / "clip")
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(root / "clip")
    refs = root / "refs"
    refs.mkdir()
    for i, image in enumerate(tm.reference_images(3)):
        image.save(refs / f"ref{i}.png")
        (refs / f"ref{i}.txt").write_text(f"picture {i}\n")
    return root


def eval_samples(world: Path, out: Path, batch_images: int) -> dict:
    methods = [f"ip:ip_adapter:adapter={world}/ip.safetensors,image_encoder={world}/encoder",
               f"ip2:ip_adapter:adapter={world}/ip.safetensors,image_encoder={world}/encoder,"
               "layers=down_blocks=0.5;default=1,guidance=6,image_guidance=2",
               f"simple:shared:adapter={world}/shared.safetensors,image_encoder={world}/encoder",
               "text:text_only", "uncond:unconditional"]
    config = load_config(None, dict(model=str(world / "sd"), data=str(world / "refs"), references=2, samples=2, steps=2,
                                    clip_model=str(world / "clip"), output_dir=str(out), scales=[0.5],
                                    progress=False, batch_images=batch_images, save_images=True, methods=methods))
    evaluate(config, log=lambda m: None)
    results = json.loads((out / "results.json").read_text())
    return {(name, key): p["samples"] for name, m in results["methods"].items() for key, p in m["passes"].items()}


def test_eval_scores_equal_batched_and_unbatched(world, tmp_path, rowwise_kernels):
    one = eval_samples(world, tmp_path / "one", batch_images=1)  # one reference per call: the unbatched path
    many = eval_samples(world, tmp_path / "many", batch_images=4)  # both references in one call
    assert set(one) == set(many) and ("ip", "sweep 0.5") in one
    assert one[("ip2", "sweep 0.5")] != one[("ip", "sweep 0.5")]  # its layers and guidance scales took effect
    for key in one:
        assert one[key] == many[key], key  # every score, seed and attribute read, exactly
    for path in (tmp_path / "one" / "images").rglob("*.png"):
        other = tmp_path / "many" / path.relative_to(tmp_path / "one")
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other))), path


def test_batch_images_must_be_positive(world):
    config = load_config(None, dict(model=str(world / "sd"), data=str(world / "refs"), clip_model=str(world / "clip"),
                                    batch_images=0, methods=["text:text_only"]))
    with pytest.raises(ValueError, match="batch_images must be at least 1, got 0"):
        config.check()


def test_batch_workflow_jobs_per_call_makes_the_one_job_files(tmp_path, rowwise_kernels, monkeypatch):
    """imprompt batch with jobs_per_call 4: 8 jobs (2 references x 2 prompts x 2 seeds) in 2 calls, the same
    files, pixels and PNG parameters as one job per call."""
    import imprompt.generation.batched as batched_module
    from imprompt import toy
    from imprompt.cli import main

    calls = []
    original = batched_module.generate_batch
    monkeypatch.setattr(batched_module, "generate_batch", lambda *a, **k: calls.append(len(a[3])) or original(*a, **k))
    refs = sorted(toy.toy_paths()["references"].glob("*.png"))[:2]
    outputs = {}
    for per_call in (1, 4):
        out = tmp_path / f"out{per_call}"
        workflow = tmp_path / f"wf{per_call}.yaml"
        workflow.write_text(f"references: [{refs[0]}, {refs[1]}]\nprompts: ['a circle', 'a red square']\n"
                            f"scales: [0.7]\nseeds: [3, 4]\nsteps: 2\noutput: {out}\nprogress: false\n"
                            f"jobs_per_call: {per_call}\n")
        assert main(["batch", str(workflow)]) == 0
        outputs[per_call] = {p.name: Image.open(p) for p in out.glob("*.png")}
    assert calls == [4, 4]  # one job per call never batches; four per call: two calls of four
    assert len(outputs[1]) == 8 and outputs[1].keys() == outputs[4].keys()
    for name, image in outputs[1].items():
        assert np.array_equal(np.asarray(image), np.asarray(outputs[4][name])), name
        assert image.text["parameters"] == outputs[4][name].text["parameters"]
    assert len({np.asarray(i).tobytes() for i in outputs[4].values()}) == 8  # each job its own image


def test_call_groups_keep_scale_and_control_together():
    from imprompt.generation.batch import BatchJob, call_groups

    jobs = [BatchJob(None, 0, "", scale, None, seed, f"{scale}-{seed}") for scale in (0.5, 1.0) for seed in (1, 2, 3)]
    groups = call_groups(jobs, 2)
    assert [[j.file_name for j in g] for g in groups] == [["0.5-1", "0.5-2"], ["0.5-3"], ["1.0-1", "1.0-2"], ["1.0-3"]]
    assert call_groups(jobs, 1) == [[j] for j in jobs]
    with pytest.raises(ValueError, match="at least 1"):
        call_groups(jobs, 0)


def test_sdxl_batch_equals_single_calls_with_batch_invariant_kernels(rowwise_kernels):
    """SDXL: pooled text embeddings and time ids are per row too."""
    pipe = tm.sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    encoder_model = tm.image_encoder()
    adapter = tm.random_adapter(pipe.unet, "linear", encoder=encoder_model)
    models = (pipe, adapter, ImageEncoder(encoder_model, tm.feature_extractor()), tm.reference_images(len(SEEDS)))
    single, batch = run_both(models, "ip_adapter")
    for s, b in zip(single, batch):
        assert np.array_equal(s, b)
    assert not np.array_equal(batch[0][0], batch[1][0])


def test_grid_cells_per_call_makes_the_one_cell_grid(tmp_path, rowwise_kernels, monkeypatch):
    """imprompt grid, x = seed (3 values), y = prompt_sr (2 rows), cells_per_call 3: one call per row, the same
    cells and grid as one cell per call."""
    import imprompt.generation.batched as batched_module
    from imprompt import toy
    from imprompt.cli import main

    calls = []
    original = batched_module.generate_batch
    monkeypatch.setattr(batched_module, "generate_batch", lambda *a, **k: calls.append(len(a[3])) or original(*a, **k))
    ref = sorted(toy.toy_paths()["references"].glob("*.png"))[0]
    outputs = {}
    for per_call in (1, 3):
        out = tmp_path / f"grid{per_call}"
        assert main(["grid", "--image", str(ref), "--prompt", "a red circle", "--steps", "2", "--x", "seed=1,2,3",
                     "--y", "prompt_sr=red,blue", "--cells-per-call", str(per_call), "--output", str(out)]) == 0
        outputs[per_call] = sorted(out.glob("*.png"))
    assert calls == [3, 3]
    assert [p.name for p in outputs[1]] == [p.name for p in outputs[3]] and len(outputs[1]) == 7  # 6 cells + grid
    for a, b in zip(outputs[1], outputs[3]):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name
        assert Image.open(a).text["parameters"] == Image.open(b).text["parameters"]
