"""Training: the recipe's functions, the cache, resume, data sources, export, and 2-process DDP."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny_models as tm
from imprompt.adapter.checkpoint import load_adapter, save_adapter
from imprompt.training.config import TrainConfig, load_config
from imprompt.training.data import SkipCounter, data_fingerprint, expand_braces, folder_records, open_source
from imprompt.training.recipe import batch_indices, dropout_masks
from imprompt.training.trainer import checkpoints, launch_warning, train
from test_training_data import png_declaring

HERE = Path(__file__).parent


def make_dataset(folder: Path, n: int = 16, bad: bool = True) -> Path:
    """Squares whose colour the caption names; plus a corrupt, a truncated, a bomb and a FIFO file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[:] = 255 - colour
        pixels[8:24, 8:24] = colour
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"square {i % 4}")
    if bad:
        (folder / "corrupt.png").write_bytes(b"not an image at all")
        data = (folder / "img00.png").read_bytes()
        (folder / "truncated.png").write_bytes(data[: len(data) // 2])
        (folder / "bomb.png").write_bytes(png_declaring(50000, 50000))
        os.mkfifo(folder / "fifo.png")  # would block a plain open() forever
    return folder


def data_key(folder: Path) -> str:
    return data_fingerprint(str(folder), None, folder_records(folder))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    pipe = tm.sd15_pipeline()
    pipe.save_pretrained(root / "sd")
    tm.image_encoder().save_pretrained(root / "encoder")
    make_dataset(root / "data")
    return root


def config(world: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(model=str(world / "sd"), image_encoder=str(world / "encoder"), data=str(world / "data"),
                  output_dir=str(out), resolution=16, batch_size=4, max_steps=4, checkpoint_every=2,
                  learning_rate=1e-3, progress=False, cache_dir=str(world / "cache"))
    values.update(overrides)
    return TrainConfig(**values)


def test_dropout_masks_follow_the_official_rule():
    u = torch.tensor([0.01, 0.06, 0.12, 0.5, 0.049, 0.099, 0.149])
    drop_image, drop_text = dropout_masks(u, 0.05, 0.05, 0.05)
    assert drop_image.tolist() == [True, False, True, False, True, False, True]
    assert drop_text.tolist() == [False, True, True, False, False, True, True]
    image, text = dropout_masks(torch.rand(200_000, generator=torch.Generator().manual_seed(0)), 0.1, 0.2, 0.3)
    assert abs(image.float().mean() - 0.4) < 0.01 and abs(text.float().mean() - 0.5) < 0.01
    assert abs((image & text).float().mean() - 0.3) < 0.01


def test_batch_indices_split_the_stream_across_processes():
    a = [i for m in range(3) for i in batch_indices(24, 0, m, 0, 2, 4)]
    b = [i for m in range(3) for i in batch_indices(24, 0, m, 1, 2, 4)]
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(24))  # one epoch, every item once
    assert batch_indices(24, 0, 3, 0, 2, 4) != batch_indices(24, 1, 3, 0, 2, 4)


def fixed_loss(world: Path, adapter_file: Path) -> float:
    """Denoising loss of an adapter on every cached training item with fixed noise and timesteps."""
    from diffusers import DDPMScheduler

    from imprompt.encoding import ImageEncoder
    from imprompt.generation.pipelines import load_pipeline
    from imprompt.training.features import FeatureCache, FrozenModels
    from imprompt.training.trainer import TrainingModel

    pipe = load_pipeline(world / "sd")
    models = FrozenModels(pipe, ImageEncoder.from_pretrained(world / "encoder"), "image_embeds")
    cached = FeatureCache(world / "cache", models.fingerprint(16, True, data_key(world / "data"))).open()
    batch = cached.batch(list(range(len(cached))))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    model = TrainingModel(load_adapter(adapter_file), pipe.unet, shared=False)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for _ in range(4):
            latents = batch["latent_mean"] * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, 1000, (len(latents),), generator=generator)
            prediction = model(scheduler.add_noise(latents, noise, t), t, batch["text"], batch["image"])
            losses.append(torch.nn.functional.mse_loss(prediction, noise).item())
    return float(np.mean(losses))


@pytest.mark.slow  # over 10 s
def test_loss_goes_down_and_export_loads_in_diffusers(world, tmp_path):
    initial = train(config(world, tmp_path / "init", max_steps=1, learning_rate=1e-12))
    result = train(config(world, tmp_path / "run", max_steps=40, checkpoint_every=40, learning_rate=3e-3))
    before, after = fixed_loss(world, initial.adapter_file), fixed_loss(world, result.adapter_file)
    assert after < 0.95 * before, (before, after)  # measured: 1.087 -> 0.984
    adapter = load_adapter(result.adapter_file)
    assert adapter.variant.projection == "linear"
    assert json.loads((tmp_path / "run" / "ip_adapter.json").read_text())["max_steps"] == 40
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == 4
    assert sorted(summary["skipped"]) == ["bomb.png", "corrupt.png", "fifo.png", "truncated.png"]

    # The exported file loads in diffusers and generates what imprompt generates.
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate

    encoder = CLIPVisionModelWithProjection.from_pretrained(world / "encoder")
    ours = StableDiffusionPipeline.from_pretrained(world / "sd", safety_checker=None, requires_safety_checker=False)
    theirs = StableDiffusionPipeline.from_pretrained(world / "sd", safety_checker=None, requires_safety_checker=False)
    theirs.image_encoder, theirs.feature_extractor = encoder, tm.feature_extractor()
    theirs.load_ip_adapter(str(result.adapter_file.parent), subfolder="", weight_name=result.adapter_file.name,
                           image_encoder_folder=None, local_files_only=True)
    reference = Image.open(world / "data" / "img03.png").convert("RGB")
    expected = theirs("square", num_inference_steps=3, ip_adapter_image=[[reference]], output_type="np",
                      generator=torch.Generator("cpu").manual_seed(0)).images
    with attach(ours.unet, adapter) as attachment:
        got = generate(ours, attachment, GenerationSettings(prompt="square", steps=3, seed=0),
                       [ImagePrompt([reference], scale=1.0)], [ImageEncoder(encoder)], output_type="np")
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("variant", ["plus", "full", "shared"])
def test_other_variants_train(world, tmp_path, variant):
    result = train(config(world, tmp_path / variant, variant=variant, max_steps=2, num_tokens=8 if variant == "plus" else None))
    state = load_file(result.adapter_file)
    if variant == "shared":
        assert state and all(k.startswith("image_proj.") for k in state)
    else:
        adapter = load_adapter(result.adapter_file)
        assert adapter.variant.projection == variant


def test_kv_layers_start_as_copies_of_the_text_layers(world, tmp_path):
    result = train(config(world, tmp_path / "zero", max_steps=1, learning_rate=1e-12))
    state = load_file(result.adapter_file)
    unet = load_file(world / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert torch.allclose(state["ip_adapter.1.to_k_ip.weight"], unet[f"{first}.to_k.weight"], atol=1e-6)
    assert torch.allclose(state["ip_adapter.1.to_v_ip.weight"], unet[f"{first}.to_v.weight"], atol=1e-6)


def test_init_adapter_starts_from_its_weights_and_refuses_another_variant(world, tmp_path):
    """--init-adapter (the official --pretrained_ip_adapter_path): at a vanishing learning rate the exported
    adapter is the file it started from (a random start is not); a file of another variant is refused before
    anything is cached or trained."""
    pipe = tm.sd15_pipeline()
    start = tm.random_adapter(pipe.unet, "linear", seed=5, encoder=tm.image_encoder())
    save_adapter(start, tmp_path / "start.safetensors")
    result = train(config(world, tmp_path / "from", max_steps=1, learning_rate=1e-12,
                          init_adapter=str(tmp_path / "start.safetensors")))
    trained, begun = load_file(result.adapter_file), load_file(tmp_path / "start.safetensors")
    assert trained.keys() == begun.keys()
    assert all(torch.allclose(trained[k], begun[k], atol=1e-6) for k in begun)
    fresh = load_file(train(config(world, tmp_path / "fresh", max_steps=1, learning_rate=1e-12)).adapter_file)
    assert not torch.allclose(fresh["image_proj.proj.weight"], begun["image_proj.proj.weight"])
    save_adapter(tm.random_adapter(pipe.unet, "plus", encoder=tm.image_encoder()), tmp_path / "plus.safetensors")
    with pytest.raises(ValueError, match=r"plus.safetensors is a plus adapter with .*this run builds .*variant"):
        train(config(world, tmp_path / "wrong", init_adapter=str(tmp_path / "plus.safetensors")))
    assert not (tmp_path / "wrong" / "checkpoints").exists()
    with pytest.raises(ValueError, match="--init-adapter .*no such file"):
        train(config(world, tmp_path / "missing", init_adapter=str(tmp_path / "nothing.safetensors")))


_CHILD = """
import sys; sys.path.insert(0, {tests!r})
from imprompt.training.config import TrainConfig
from imprompt.training.trainer import train
train(TrainConfig(**{values!r}))
"""


def _start(run: TrainConfig, log: Path) -> subprocess.Popen:
    # Every run of the comparison in a fresh process with the same thread count, so float
    # reductions happen in the same order whatever the test process did before.
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(HERE), values=vars(run))],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow  # over 10 s
def test_resume_after_a_kill_is_exact(world, tmp_path):
    straight = _start(config(world, tmp_path / "straight", max_steps=6, checkpoint_every=3), tmp_path / "straight.log")
    assert straight.wait(timeout=900) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    # A run that would go on for long is killed (SIGKILL) once its step-3 checkpoint exists.
    long_run = config(world, tmp_path / "killed", max_steps=10_000, checkpoint_every=3, keep_checkpoints=10_000)
    child = _start(long_run, tmp_path / "killed.log")
    target = tmp_path / "killed" / "checkpoints" / "step-00000003"
    deadline = time.time() + 600
    while not (target / "state.json").is_file() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert (target / "state.json").is_file(), (tmp_path / "killed.log").read_text()[-3000:]
    resumed = _start(config(world, tmp_path / "resumed", max_steps=6, checkpoint_every=3, resume=str(target)),
                     tmp_path / "resumed.log")
    assert resumed.wait(timeout=900) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    a = load_file(tmp_path / "straight" / "ip_adapter.safetensors")
    b = load_file(tmp_path / "resumed" / "ip_adapter.safetensors")
    assert a.keys() == b.keys()
    differ = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, differ
    straight_summary, resumed_summary = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("straight", "resumed"))
    assert straight_summary["images_seen"] == resumed_summary["images_seen"] == 6 * 4  # the killed run's steps count
    assert resumed_summary["seconds"] > resumed_summary["seconds_this_run"] > 0


def test_resume_latest_ignores_unfinished_checkpoints(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, max_steps=4, checkpoint_every=2, keep_checkpoints=1))
    folder = out / "checkpoints"
    assert [p.name for p in checkpoints(folder)] == ["step-00000004"]
    (folder / ".step-00000006.tmp").mkdir()  # what a kill during a checkpoint write leaves
    result = train(config(world, out, max_steps=5, resume="latest"))
    assert result.losses and len(result.losses) == 1  # only step 5 ran


def test_feature_cache_is_reused_and_invalidated(world, tmp_path):
    cache = tmp_path / "cache"
    train(config(world, tmp_path / "a", max_steps=1, cache_dir=str(cache)))
    first = sorted(p.name for p in cache.iterdir())
    stamp = (cache / first[0] / "index.json").stat().st_mtime_ns
    train(config(world, tmp_path / "b", max_steps=1, cache_dir=str(cache)))
    assert sorted(p.name for p in cache.iterdir()) == first
    assert (cache / first[0] / "index.json").stat().st_mtime_ns == stamp  # not rebuilt
    train(config(world, tmp_path / "c", max_steps=1, cache_dir=str(cache), resolution=24))
    train(config(world, tmp_path / "d", max_steps=1, cache_dir=str(cache), center_crop=False))
    assert len(list(cache.iterdir())) == 3


def test_feature_cache_follows_the_data(world, tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    (data / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"no usable training images .*\(1 skipped"):
        train(config(world, tmp_path / "a", data=str(data), cache_dir=str(cache), max_steps=1))
    for name in ("img01", "img02"):  # the folder is fixed: its new images are trained on, not the old cache
        for suffix in (".png", ".txt"):
            shutil.copy(world / "data" / f"{name}{suffix}", data)
    messages: list[str] = []
    result = train(config(world, tmp_path / "b", data=str(data), cache_dir=str(cache), max_steps=1),
                   log_fn=messages.append)
    assert result.skipped == ["broken.png"] and not any("reusing" in m for m in messages)
    (data / "img01.txt").write_text("another caption")  # a changed caption changes the text features
    train(config(world, tmp_path / "c", data=str(data), cache_dir=str(cache), max_steps=1))
    assert len(list(cache.iterdir())) == 3
    messages.clear()
    train(config(world, tmp_path / "d", data=str(data), cache_dir=str(cache), max_steps=1), log_fn=messages.append)
    assert len(list(cache.iterdir())) == 3
    assert any(m.startswith(f"reusing the feature cache {cache}") for m in messages), messages


def test_resume_checks_the_checkpoint_before_training(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, max_steps=2, checkpoint_every=2))
    with pytest.raises(ValueError, match=r"trained with num_tokens=4; this run has num_tokens=8 \(set by num_tokens\): "
                                         r"resume with the checkpoint's settings, or train afresh in a new --output-dir"):
        train(config(world, out, max_steps=4, resume="latest", num_tokens=8))
    with pytest.raises(ValueError, match=r"trained with variant=linear, .*this run has variant=plus, .*set by .*variant"):
        train(config(world, out, max_steps=4, resume="latest", variant="plus"))
    with pytest.raises(ValueError, match=r"step-00000002 is at step 2, beyond max_steps 1; raise --max-steps above 2"):
        train(config(world, out, max_steps=1, resume="latest"))
    # A checkpoint written before settings were saved: the state dict itself is checked, in one line.
    state_file = out / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    del state["settings"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"does not fit this run's adapter \(size mismatch.*train afresh") as err:
        train(config(world, out, max_steps=4, resume="latest", num_tokens=8))
    assert "\n" not in str(err.value)
    result = train(config(world, out, max_steps=2, resume="latest"))  # at max_steps: nothing to do, exported as is
    assert result.losses == [] and result.steps == 2
    assert torch.equal(load_file(result.adapter_file)["image_proj.proj.weight"],
                       load_file(out / "checkpoints" / "step-00000002" / "adapter.safetensors")["image_proj.proj.weight"])


def test_launch_warning():
    # accelerate launch --num_processes 4 without --multi_gpu: one process, MASTER_ADDR but no WORLD_SIZE.
    simple = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}
    assert "add --multi_gpu" in launch_warning(1, simple)
    assert launch_warning(1, {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False"}) is None  # asked for 1
    assert launch_warning(4, {**simple, "WORLD_SIZE": "4"}) is None  # --multi_gpu / torchrun
    assert "4 processes were launched (WORLD_SIZE=4) but training runs as 1" in launch_warning(1, {"WORLD_SIZE": "4"})
    assert launch_warning(1, {}) is None


@pytest.mark.slow
def test_accelerate_launch_without_multi_gpu_warns(world, tmp_path):
    out = tmp_path / "launched"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(HERE), values=vars(config(world, out, max_steps=1))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no accelerate config
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                           "--main_process_port", "29534", str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "only this one runs" in done.stdout + done.stderr and "add --multi_gpu" in done.stdout + done.stderr


def test_cached_features_equal_fresh_ones(world):
    from imprompt.encoding import ImageEncoder
    from imprompt.generation.pipelines import load_pipeline
    from imprompt.training.features import FeatureCache, FrozenModels
    from imprompt.training.recipe import apply_dropout

    models = FrozenModels(load_pipeline(world / "sd"), ImageEncoder.from_pretrained(world / "encoder"), "image_embeds")
    cache = FeatureCache(world / "cache", models.fingerprint(16, True, data_key(world / "data")))
    if not cache.complete:
        cache.build(models, folder_records(world / "data"), 16, True, 42, SkipCounter(), progress=False)
    cached = cache.open()
    records = [r for r in folder_records(world / "data") if r.key in ("img05.png", "img07.png")]
    fresh = models.encode(records, 16, True, 42, SkipCounter())
    stored = cached.batch([cached.keys.index(k) for k in fresh["_keys"]])
    # Equal up to float rounding: the cache encoded batches of 16, this call a batch of 2.
    for name in ("latent_mean", "latent_std", "text", "image"):
        assert torch.allclose(stored[name], fresh[name], atol=1e-5, rtol=1e-5), name
    drop = torch.tensor([True, False])
    empty = models.encode_text([""])["text"][0]
    dropped = apply_dropout(stored["text"], cached.unconditional["empty_text"], drop)
    assert torch.equal(dropped[0], empty) and torch.equal(dropped[1], stored["text"][1])
    assert torch.equal(apply_dropout(stored["image"], cached.unconditional["uncond_image"], drop)[0],
                       torch.zeros_like(fresh["image"][0]))  # linear variants: the zero embedding


def test_json_list_and_webdataset_shards_read_the_same_samples(world, tmp_path):
    folder = world / "data"
    items = [{"image_file": f"img{i:02d}.png", "text": (folder / f"img{i:02d}.txt").read_text()} for i in range(16)]
    (tmp_path / "list.json").write_text(json.dumps(items))
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for i in range(shard * 8, shard * 8 + 8):
                for ext, data in (("png", (folder / f"img{i:02d}.png").read_bytes()),
                                  ("txt", (folder / f"img{i:02d}.txt").read_bytes())):
                    info = tarfile.TarInfo(f"img{i:02d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    assert expand_braces(str(tmp_path / "shard-{000..001}.tar")) == [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]
    counter = SkipCounter()
    sources = [open_source(str(tmp_path / "list.json"), str(folder), counter),
               open_source(str(tmp_path / "list.jsonl"), str(folder), counter),
               list(open_source(str(tmp_path / "shard-{000..001}.tar"), None, counter))]
    for records in sources:
        assert [r.caption for r in records] == [i["text"] for i in items]
        assert [r.read() for r in records] == [(folder / i["image_file"]).read_bytes() for i in items]
    result = train(config(world, tmp_path / "wds", data=str(tmp_path / "shard-{000..001}.tar"), max_steps=1,
                          cache_dir=str(tmp_path / "cache")))
    assert result.adapter_file.is_file() and not result.skipped


def test_reference_file_is_the_image_prompt_and_the_target_stays_the_image(world, tmp_path):
    from imprompt.encoding import ImageEncoder
    from imprompt.generation.pipelines import load_pipeline
    from imprompt.training.data import json_records
    from imprompt.training.features import FrozenModels

    folder = world / "data"
    items = [{"image_file": "img01.png", "text": "a"},
             {"image_file": "img01.png", "text": "a", "reference_file": "img02.png"},
             {"image_file": "img02.png", "text": "a"},
             {"image_file": "img01.png", "text": "a", "reference_file": "corrupt.png"}]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    records = json_records(tmp_path / "edits.jsonl", folder)
    models = FrozenModels(load_pipeline(world / "sd"), ImageEncoder.from_pretrained(world / "encoder"), "image_embeds")
    counter = SkipCounter()
    out = models.encode(records, 16, True, 42, counter)
    assert len(out["_keys"]) == 3 and counter.skipped == ["img01.png"]  # the unreadable reference drops its sample
    assert torch.equal(out["latent_mean"][0], out["latent_mean"][1])  # same target image...
    assert torch.allclose(out["image"][1], out["image"][2], atol=1e-6)  # ...whose image prompt is img02
    assert not torch.allclose(out["image"][0], out["image"][1], atol=1e-3)


def test_yaml_config_and_command_line(world, tmp_path):
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text(f"model: {world / 'sd'}\nimage_encoder: {world / 'encoder'}\ndata: {world / 'data'}\n"
                         f"resolution: 16\nbatch_size: 2\nmax_steps: 50\nprogress: false\n")
    assert load_config(yaml_file, {"max_steps": 2}).max_steps == 2
    with pytest.raises(ValueError, match="unknown config field"):
        load_config(None, {"learning_rte": 1})
    from imprompt.cli import main

    out = tmp_path / "cli"
    assert main(["train", str(yaml_file), "--max-steps", "2", "--output-dir", str(out), "--cache-dir", str(world / "cache"),
                 "--no-progress"]) == 0
    assert json.loads((out / "ip_adapter.json").read_text())["batch_size"] == 2
    assert load_adapter(out / "ip_adapter.safetensors").variant.num_tokens == 4


@pytest.mark.slow  # over 10 s
def test_two_processes_see_different_data(world, tmp_path):
    out = tmp_path / "ddp"
    values = vars(config(world, out, max_steps=2, record_data=True, cache_dir=str(tmp_path / "cache")))
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(HERE), values=values))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                           str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((out / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8  # 2 steps x batch 4 per process: one epoch together
    assert set(seen[0]).isdisjoint(seen[1]) and len(set(seen[0]) | set(seen[1])) == 16
    assert load_adapter(out / "ip_adapter.safetensors").variant.projection == "linear"


def test_sample_sheets_during_training(world, tmp_path):
    from imprompt.generation.pnginfo import read_parameters

    out = tmp_path / "samples"
    train(config(world, out, max_steps=2, sample_every=1, sample_steps=2,
                 sample_images=[str(world / "data" / "img01.png"), str(world / "data" / "img02.png")]))
    sheets = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in sheets] == ["step-00000001.png", "step-00000002.png"]
    sheet = Image.open(sheets[0])
    assert sheet.height == 16 + 2 * (128 + 4) + 4  # header + two rows (one per reference), 128 px cells
    assert "training samples" in read_parameters(sheets[0])


def test_names_in_an_a1111_tree_train_what_the_folders_train(world, tmp_path):
    """--models-dir: a single-file checkpoint and an encoder folder by name give the same adapter."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from imprompt.models.ldm import pipeline_to_ldm

    root = tmp_path / "a1111"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    pipe = StableDiffusionPipeline.from_pretrained(world / "sd")
    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(pipe, "sd15").items()},
              root / "models" / "Stable-diffusion" / "Tiny.safetensors")
    (root / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / "clip_vision").mkdir(parents=True)
    shutil.copytree(world / "encoder", root / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads"
                    / "clip_vision" / "tiny-vit")
    paths = train(config(world, tmp_path / "paths", max_steps=2, cache_dir=str(tmp_path / "c1")))
    named = train(config(world, tmp_path / "named", max_steps=2, cache_dir=str(tmp_path / "c2"), model="tiny",
                         image_encoder="tiny-vit", models_dir=[str(root)], model_config=str(world / "sd")))
    a, b = load_file(paths.adapter_file), load_file(named.adapter_file)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image_proj.proj.weight"], load_file(train(config(
        world, tmp_path / "one", max_steps=1, cache_dir=str(tmp_path / "c1"))).adapter_file)["image_proj.proj.weight"])
