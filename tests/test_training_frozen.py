"""Training holds the VAE, text and image encoders only while it needs them (building the cache,
sample sheets); freeing them, or never loading them, changes nothing in what is trained."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from safetensors.torch import load_file

from imprompt.training import trainer
from imprompt.training.features import FeatureCache
from imprompt.training.frozen import source_key
from imprompt.training.trainer import set_up, train
from test_training import config, data_key, world  # noqa: F401  (world: the tiny models and data, a fixture)


def spy_on_loads(monkeypatch) -> list[dict[str, weakref.ref]]:
    """Weak references to every frozen model the trainer loads, one dict per load."""
    loads: list[dict[str, weakref.ref]] = []
    real = trainer.load_frozen

    def load(*args, **kwargs):
        models = real(*args, **kwargs)
        loads.append({"vae": weakref.ref(models.pipe.vae), "text_encoder": weakref.ref(models.pipe.text_encoder),
                      "image_encoder": weakref.ref(models.encoder.model), "pipeline": weakref.ref(models.pipe)})
        return models

    monkeypatch.setattr(trainer, "load_frozen", load)
    return loads


def test_frozen_models_are_freed_after_caching_and_not_loaded_with_a_complete_cache(world, tmp_path, monkeypatch):
    loads = spy_on_loads(monkeypatch)
    cache = tmp_path / "cache"
    run = set_up(config(world, tmp_path / "a", cache_dir=str(cache)), log_fn=lambda m: None)
    gc.collect()
    assert len(loads) == 1  # loaded once, to build the cache ...
    alive = [name for name, ref in loads[0].items() if ref() is not None]
    assert alive == [], f"still resident during the cached steps: {alive}"  # ... and gone before the first step
    assert run.frozen is None
    unet = run.trained.unet
    assert any(p.requires_grad for p in run.trained.adapter.parameters()) and not any(p.requires_grad for p in unet.parameters())
    assert type(unet).__name__ == "UNet2DConditionModel"
    # Nothing the run holds is one of the frozen encoders (by type, whatever attribute it might hide in).
    held = [m for m in run.trained.modules() if type(m).__name__ in ("AutoencoderKL", "CLIPTextModel", "CLIPVisionModelWithProjection")]
    assert held == []
    del run, unet
    messages: list[str] = []
    run = set_up(config(world, tmp_path / "b", cache_dir=str(cache)), log_fn=messages.append)
    assert len(loads) == 1, "a complete cache must not load the VAE, text or image encoder"
    assert any("are not loaded" in m for m in messages), messages
    assert run.frozen is None


def adapters_equal(*results) -> None:
    a, *others = (load_file(r.adapter_file) for r in results)
    for other in others:
        assert sorted(a) == sorted(other)
        for k in a:
            assert torch.equal(a[k], other[k]), k
    assert all(r.losses == results[0].losses for r in results)


def test_same_seed_same_adapter_whether_the_models_were_freed_or_never_loaded(world, tmp_path, monkeypatch):
    loads = spy_on_loads(monkeypatch)
    cache = str(tmp_path / "cache")
    built = train(config(world, tmp_path / "built", cache_dir=cache, max_steps=2), log_fn=lambda m: None)
    reused = train(config(world, tmp_path / "reused", cache_dir=cache, max_steps=2), log_fn=lambda m: None)
    assert len(loads) == 1  # the second run never loaded them
    adapters_equal(built, reused)


@pytest.mark.slow  # over 10 s: sample generations
def test_sample_sheets_keep_the_frozen_models_and_train_the_same_adapter(world, tmp_path, monkeypatch):
    loads = spy_on_loads(monkeypatch)
    freed = train(config(world, tmp_path / "freed", cache_dir=str(tmp_path / "cache"), max_steps=2), log_fn=lambda m: None)
    kept = train(config(world, tmp_path / "kept", cache_dir=str(tmp_path / "cache2"), max_steps=2, sample_every=2,
                        sample_steps=1, sample_images=[str(world / "data" / "img01.png")]), log_fn=lambda m: None)
    assert (tmp_path / "kept" / "samples" / "step-00000002.png").is_file()
    assert len(loads) == 2 and loads[1]["vae"]() is None  # loaded for the sheets, gone after the run
    adapters_equal(freed, kept)


def test_source_key_follows_the_model_files_and_the_settings(world, tmp_path):
    base = config(world, tmp_path / "a")
    key = source_key(base, data_key(world / "data"))
    assert key is not None and key == source_key(base, data_key(world / "data"))
    assert source_key(config(world, tmp_path / "b", resolution=24), data_key(world / "data")) != key
    assert source_key(config(world, tmp_path / "b", variant="plus"), data_key(world / "data")) != key
    assert source_key(base, "other data") != key
    assert source_key(config(world, tmp_path / "b", model="org/hub-id"), data_key(world / "data")) is None
    weights = world / "encoder" / "config.json"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # replaced weights: new time
    try:
        assert source_key(base, data_key(world / "data")) != key
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_cache_is_recalled_only_when_complete(tmp_path):
    cache = FeatureCache(tmp_path, "abc")
    cache.folder.mkdir()
    cache.remember("k1")
    assert FeatureCache.recall(tmp_path, "k1") is None  # no index yet: a build killed midway
    cache.index_file.write_text("{}")
    assert FeatureCache.recall(tmp_path, "k1").folder == cache.folder
    assert FeatureCache.recall(tmp_path, "k2") is None and FeatureCache.recall(tmp_path, None) is None
    assert FeatureCache.recall(tmp_path / "missing", "k1") is None


@pytest.mark.parametrize("variant", ["plus"])
def test_a_complete_cache_gives_the_variant_its_encoder_width(world, tmp_path, monkeypatch, variant):
    cache = str(tmp_path / "cache")
    first = set_up(config(world, tmp_path / "a", cache_dir=cache, variant=variant), log_fn=lambda m: None)
    loads = spy_on_loads(monkeypatch)
    again = set_up(config(world, tmp_path / "b", cache_dir=cache, variant=variant), log_fn=lambda m: None)
    assert not loads and again.variant == first.variant  # read from the cached features' width, not from the encoder
