"""Toy world models: tokenizer, model configurations, and a smoke run of every build stage (tiny sizes)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import CLIPTokenizer

from imprompt.toy import build, compose, judge, models, shapes, toy_paths
from imprompt.toy import tokenizer as toy_tokenizer
from imprompt.toy.config import STAGES, BuildConfig, ConfigError, StageSelection
from imprompt.toy.loop import TrainingLoop
from imprompt.toy.package import stage_package

torch.set_flush_denormal(True)


def _world_words() -> list[str]:
    captions = [s.caption for split in shapes.SPLITS for s in shapes.sample(split, 300, 0)]
    return toy_tokenizer.words(captions)


def test_every_caption_word_is_one_token(tmp_path):
    words = _world_words()
    for name in shapes.SHAPES + shapes.COLORS + shapes.BACKGROUNDS + ("striped", "dotted", "outlined", "solid"):
        assert name in words
    tok = toy_tokenizer.build(words)
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) > 512  # the vocabulary really loaded (not the 2-token fallback)
    toy_tokenizer.check(loaded, words, len(tok))
    ids = loaded("a red circle on a blue background")["input_ids"]
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id and len(ids) == 9
    assert loaded.model_max_length == toy_tokenizer.MAX_LENGTH


def test_model_configurations_build_and_fit_together():
    spec = models.ToySpec()
    clip = models.clip(spec.clip, 624, 622, 623)
    vae = models.vae(spec.vae)
    unet = models.unet(spec.unet, spec.clip.width)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
        assert latents.shape == (1, 4, 8, 8)
        text = clip.text_model(input_ids=torch.tensor([[622, 1, 623]])).last_hidden_state
        assert unet(latents, 10, text).sample.shape == latents.shape
    names = [n for n, _ in unet.attn_processors.items() if "attn2" in n]
    assert any(n.startswith("down_blocks.2.") for n in names) and any(n.startswith("up_blocks.1.") for n in names)
    assert any(n.startswith("mid_block.") for n in names)
    assert models.parameter_count(unet) < 10_000_000  # fp16 weights must fit the 25 MB package


def test_edits_are_valid_attribute_changes():
    truth = [s.attributes for s in shapes.sample("test", 40, 0)]
    plan = judge.edit_plan(truth)
    assert plan == judge.edit_plan(truth) and {e.changed for e in plan} == {"background", "color"}
    for edit, a in zip(plan, truth):
        changed, expected = edit.changed, edit.expected
        assert getattr(expected, changed) != getattr(a, changed) and getattr(expected, changed) in edit.text
        assert dataclasses.replace(expected, **{changed: getattr(a, changed)}) == a


@pytest.mark.slow  # over 10 s
def test_build_stages_smoke(tmp_path):
    cfg = BuildConfig(work=tmp_path / "work", train_size=64, eval_size=16, heldout_size=8, clip_steps=2,
                      clip_batch=16, robust_clip_steps=2, robust_clip_batch=8, vae_steps=2, vae_batch=8,
                      vae_shape_weight=4, unet_steps=2,
                      unet_batch=8, adapter_steps=1, adapter_loosened_p=0.5,
                      quality_samples=2, quality_steps=2, controlnet_steps=2, controlnet_batch=8,
                      controlnet_quality_samples=6, controlnet_compose_steps=2, progress=False)
    results = build.run(cfg, StageSelection(until="quality"))
    assert set(results) == set(STAGES[:STAGES.index("quality") + 1])
    assert results["tokenizer"]["longest_caption_tokens"] <= toy_tokenizer.MAX_LENGTH
    assert set(results["clip"]["zero_shot"]) == {"shape", "color", "background", "style"}
    assert set(results["robust_clip"]["robustness"]) == {"drawn_0.5", "drawn_1.0"}
    # robust_clip trains the vision tower only: the text tower the UNet learned from stays bit for bit.
    from transformers import CLIPModel

    before, after = (CLIPModel.from_pretrained(cfg.work / s / "model") for s in ("clip", "robust_clip"))
    assert all(torch.equal(p, q) for p, q in zip(before.text_model.parameters(), after.text_model.parameters()))
    assert not torch.equal(before.vision_model.encoder.layers[0].mlp.fc1.weight,
                           after.vision_model.encoder.layers[0].mlp.fc1.weight)
    # The adapters' list: about half the samples take a loosened picture of their target as the image prompt.
    items = [json.loads(line) for line in (cfg.work / "adapter" / "data" / "train.jsonl").read_text().splitlines()]
    loosened = [i for i in items if i.get("reference_file", "").startswith("loosened/")]
    assert 0.25 < len(loosened) / len(items) < 0.75
    assert all((cfg.work / "adapter" / "data" / i["reference_file"]).is_file() for i in loosened)
    assert results["unet"]["steps"] == 2
    for part in ("text_to_image", "unconditional", "image_only", "multimodal"):
        assert part in results["quality"]
    # A second run skips every finished stage.
    assert build.run(cfg, StageSelection(until="quality")) == results
    control = build.run(cfg, StageSelection(stage="controlnet"))["controlnet"]
    assert control["steps"] == 2 and set(control["quality"]["alone"]) >= {"shape", "size", "position"}
    assert (cfg.work / "controlnet" / "model" / "config.json").is_file()
    composed = build.run(cfg, StageSelection(stage="controlnet_compose"))["controlnet_compose"]
    assert composed["steps"] == 2 and composed["pictures"] == len(compose.combinations("train"))
    assert set(composed["quality"]["with_adapter"]) >= {"shape", "color", "background", "style", "all"}
    assert composed["quality_named"]["control_scale"] == compose.NAMED_CONTROL_SCALE
    assert set(composed["quality_named"]["with_adapter_and_text"]) >= {"shape", "color", "all"}

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(cfg.work / "pipeline")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    vision = CLIPVisionModelWithProjection.from_pretrained(cfg.work / "pipeline" / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(cfg.work / "pipeline" / "image_encoder")
    assert vision.config.image_size == 32 and processor.crop_size["height"] == 32
    assert list(processor.image_mean) == list(models.CLIP_MEAN)

    dest = tmp_path / "package" / "data"
    info = stage_package(cfg, dest)
    assert info["total_bytes"] <= 25 * 2 ** 20
    assert (dest / "MODEL_CARD.md").is_file() and (dest / "ip_adapter.safetensors").is_file()
    assert json.loads((dest / "references" / "attributes.json").read_text())
    shipped = StableDiffusionPipeline.from_pretrained(dest / "pipeline", dtype=torch.float32)
    assert shipped.unet.dtype == torch.float32
    # The package follows the official layout: the image encoder beside the adapter files.
    paths = toy_paths(dest)
    assert paths["image_encoder"] == dest / "image_encoder" and not (dest / "pipeline" / "image_encoder").exists()
    assert CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"]).config.image_size == 32
    # The ControlNet ships in fp8: each weight is the work folder's (fine-tuned beside the adapter) rounded to e4m3fn.
    from diffusers import ControlNetModel

    trained = ControlNetModel.from_pretrained(cfg.work / "controlnet_compose" / "model").state_dict()
    alone = ControlNetModel.from_pretrained(cfg.work / "controlnet" / "model").state_dict()
    assert not all(torch.equal(alone[k], v) for k, v in trained.items())
    packed = ControlNetModel.from_pretrained(paths["controlnet"], dtype=torch.float32).state_dict()
    assert packed.keys() == trained.keys()
    assert all(torch.equal(packed[k], v.to(torch.float8_e4m3fn).float()) for k, v in trained.items())
    scoring = models.load_shared_tower_clip(paths["clip"])
    assert torch.equal(scoring.vision_model.embeddings.patch_embedding.weight,
                       vision.vision_model.embeddings.patch_embedding.weight.half().float())


def test_the_vae_loss_weights_the_shapes_pixels_and_keeps_its_scale():
    from imprompt.toy.stages import reconstruction_loss

    target = torch.zeros(2, 3, 4, 4)
    error = torch.zeros(2, 3, 4, 4)
    error[:, :, :2, :2] = 0.5  # wrong inside a 2x2 "shape" only
    coverage = torch.zeros(2, 1, 4, 4)
    coverage[:, :, :2, :2] = 1.0
    plain = reconstruction_loss(error, target)
    assert torch.isclose(plain, torch.nn.functional.mse_loss(error, target) + 0.1 * error.abs().mean())
    assert torch.isclose(reconstruction_loss(error, target, torch.ones(2, 1, 4, 4)), plain)  # weight 1: the same
    weights = 1.0 + 4.0 * coverage  # mean weight 2: the shape's pixels count 5 / 2 times as much as before
    assert torch.isclose(reconstruction_loss(error, target, weights), plain * 5 / 2)
    outside = torch.zeros(2, 3, 4, 4)
    outside[:, :, 2:, 2:] = 0.5  # the same error on background pixels counts 1 / 2
    assert torch.isclose(reconstruction_loss(outside, target, weights), plain / 2)
    with pytest.raises(ConfigError, match="vae_shape_weight must be a finite number >= 0"):
        BuildConfig(vae_shape_weight=-1)


def test_loop_resumes_from_checkpoint(tmp_path):
    layer = torch.nn.Linear(2, 2)
    calls, logs = [], []

    def loop(total):
        return TrainingLoop(tmp_path / "toy", total, {"model": layer}, name="toy", checkpoint_seconds=0.0,
                            progress=False, log=logs.append)

    info = loop(3).run(lambda i: calls.append(i) or 0.0)
    assert info["steps"] == 3 and calls == [0, 1, 2]
    resumed = loop(5)
    # Without a progress bar every checkpoint logs a line (here: every step).
    assert [line.split(",")[0] for line in logs[:3]] == ["toy: step 1/3", "toy: step 2/3", "toy: step 3/3"]
    assert resumed.step == 3 and len(logs) == 4 and logs[3].startswith("toy: resumed at step 3 ")
    resumed.run(lambda i: calls.append(i) or 0.0)
    assert calls == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("argv", [["toy", "build", "--help"]])
def test_cli_has_toy_subcommand(argv, capsys):
    from imprompt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "--until" in capsys.readouterr().out


def _simulate(jobs: int, durations: dict[str, int], done=()) -> tuple[list[tuple[int, str, int]], int]:
    """Run build.schedule against a clock: each stage takes durations[stage] ticks (default 1)."""
    waiting = [s for s in STAGES if s not in done]
    running: dict[str, int] = {}
    finished, starts, clock = set(done), [], 0
    while waiting or running:
        for stage, threads in build.schedule(waiting, set(running), finished, jobs, 1):
            starts.append((clock, stage, threads))
            running[stage] = clock + durations.get(stage, 1)
            waiting.remove(stage)
        assert running, f"nothing can start: waiting {waiting}"
        clock = min(running.values())
        for stage in [s for s, end in running.items() if end == clock]:
            del running[stage]
            finished.add(stage)
    return starts, clock


def test_build_schedule_runs_independent_stages_side_by_side():
    durations = {"clip": 10, "robust_clip": 5, "vae": 28, "unet": 40, "adapter": 29, "simple_adapter": 28, "quality": 5,
                 "controlnet": 30, "controlnet_compose": 20}
    starts, total = _simulate(2, durations)
    started = {stage: (t, threads) for t, stage, threads in starts}
    assert [s for _, s, _ in starts] != list(STAGES)  # not the one-after-the-other order
    assert set(started) == set(STAGES)
    for stage, deps in build.DEPENDS.items():  # nothing starts before what it reads has finished
        assert all(started[d][0] + durations.get(d, 1) <= started[stage][0] for d in deps)
    assert started["vae"][0] == started["tokenizer"][0] and started["clip"][0] < started["vae"][0] + 28
    assert started["adapter"][0] == started["simple_adapter"][0]
    assert started["quality"][0] == started["adapter"][0] + 29  # beside the ControlNet, still running
    assert started["controlnet"][0] == started["simple_adapter"][0] + 28  # in the simple adapter's slot
    # Alone, a stage gets both threads; side by side, one each.
    assert started["unet"][1] == started["latents"][1] == 2 and started["vae"][1] == started["adapter"][1] == 1
    sequential = sum(durations.get(s, 1) for s in STAGES)
    # clip, robust_clip and the tokenizer hide behind the VAE, one adapter behind the other, and the quality
    # stage and the adapter's last tick behind the ControlNet
    assert started["robust_clip"][0] == started["clip"][0] + 10 < started["vae"][0] + 28
    assert total == sequential - 10 - 5 - 1 - 28 - 5 - 1
    one_job, one_job_total = _simulate(1, durations)
    assert [s for _, s, _ in one_job] == list(STAGES) and one_job_total == sequential
    assert all(threads == 1 for _, _, threads in one_job)


def test_build_schedule_treats_stages_outside_the_build_as_done():
    starts, _ = _simulate(2, {}, done=STAGES[:STAGES.index("pipeline") + 1])
    assert [(t, s) for t, s, _ in starts] == [(0, "adapter"), (0, "simple_adapter"), (1, "quality"), (1, "controlnet"),
                                              (2, "controlnet_compose"), (3, "package")]
