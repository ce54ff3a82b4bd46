"""The toy ControlNet: its silhouette control images, its fit to the toy UNet, its training stage and its
measurement (imprompt.toy.controlnet, imprompt.toy.control_quality). Tiny models, a few steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline

import tiny_models as tm
from imprompt.generation.preprocess import preprocess
from imprompt.toy import control_quality, controlnet, models, reader, shapes
from imprompt.toy.config import BuildConfig
from imprompt.toy.models import SPEC

torch.set_flush_denormal(True)

LARGE_SQUARE = shapes.Attributes("square", "red", "blue", "striped", "large", "center")


def _mask(image) -> np.ndarray:
    pixels = np.asarray(image)
    assert pixels.shape == (32, 32, 3)
    assert (pixels == pixels[..., :1]).all()  # grey: no colour
    return pixels[..., 0]


def test_silhouette_is_white_exactly_where_the_shape_is():
    mask = _mask(shapes.silhouette(LARGE_SQUARE))
    # The large square spans 16 +- 0.84 * 11 = 6.76 .. 25.24 px: columns and rows 7..24 are covered whole;
    # pixel 6 by the last of its 4 samples (6.875), a quarter: rint(0.25 * 255) = 64; the rest not at all.
    inside = np.zeros((32, 32), bool)
    inside[7:25, 7:25] = True
    assert (mask[inside] == 255).all()
    assert mask[16, 6] == mask[6, 16] == mask[16, 25] == 64 and mask[6, 6] == 16  # a corner: 1/16
    edge = np.zeros((32, 32), bool)
    edge[6:26, 6:26] = True
    assert (mask[~edge] == 0).all()
    # Solid-filled regardless of style, and nothing of colour or background: only the placement counts.
    for style in shapes.STYLES:
        for color, background in (("red", "blue"), ("yellow", "black"), ("cyan", "white")):
            other = dataclasses.replace(LARGE_SQUARE, style=style, color=color, background=background)
            assert np.array_equal(_mask(shapes.silhouette(other)), mask)
    # Where a solid image differs from its background is where the silhouette is not black.
    solid = np.asarray(shapes.render(dataclasses.replace(LARGE_SQUARE, style="solid")))
    assert np.array_equal((solid != shapes.RGB["blue"]).any(-1), mask > 0)
    small_left = _mask(shapes.silhouette(shapes.Attributes("circle", "red", "blue", "solid", "small", "left")))
    assert small_left[16, 8] == 255 and small_left[16, 24] == 0 and small_left[:, 16:].max() == 0


def test_silhouette_from_any_toy_image():
    """A reference (here: striped, blurred, noisy, JPEG'd) becomes the control image of what it shows."""
    attrs = shapes.Attributes("triangle", "green", "gray", "dotted", "small", "right")
    image = reader.perturb(shapes.render(attrs), seed=0)
    expected = np.asarray(shapes.silhouette(attrs))
    assert np.array_equal(np.asarray(reader.silhouette_of(image)), expected)
    assert np.array_equal(np.asarray(preprocess(image, "toy_silhouette")), expected)
    with pytest.raises(ValueError, match="32x32 RGB images"):
        preprocess(image.resize((64, 64)), "toy_silhouette")


@pytest.mark.parametrize("variant", ["light", "full"])
def test_controlnet_residuals_fit_the_toy_unet(variant):
    torch.manual_seed(0)
    unet = models.unet(SPEC.unet, SPEC.clip.width).eval()
    net = controlnet.make_controlnet(unet, variant).eval()
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, SPEC.clip.width)
    control = controlnet.control_pixels(np.stack([controlnet.silhouette_array(LARGE_SQUARE)] * 2))
    assert control.shape == (2, 3, 32, 32) and control.max() == 1.0
    timesteps = torch.tensor([10, 900])
    with torch.no_grad():
        down, mid = net(latents, timesteps, text, controlnet_cond=control, return_dict=False)
        plain = unet(latents, timesteps, text).sample
        steered = unet(latents, timesteps, text, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    # One residual per skip connection: conv_in, a resnet per block and a downsampler per block but the last.
    assert [tuple(r.shape[1:]) for r in down] == [(64, 8, 8), (64, 8, 8), (64, 4, 4), (128, 4, 4), (128, 2, 2),
                                                  (128, 2, 2), (128, 1, 1), (128, 1, 1)]
    assert tuple(mid.shape[1:]) == (128, 1, 1)
    # The output convolutions start at zero: an untrained ControlNet leaves the UNet's prediction as it was.
    assert torch.equal(steered, plain)
    assert net.config.cross_attention_dim == unet.config.cross_attention_dim
    state = net.state_dict()
    # Started from the UNet where the layers are the same.
    assert torch.equal(state["down_blocks.1.resnets.0.conv1.weight"], unet.down_blocks[1].resnets[0].conv1.weight)
    assert torch.equal(state["mid_block.resnets.0.conv2.weight"], unet.mid_block.resnets[0].conv2.weight)
    has_attention = any(k.startswith("down_blocks.0.attentions.") for k in state)
    assert has_attention == (variant == "full")
    assert controlnet.size_report(net)["parameters"] == sum(p.numel() for p in net.parameters())


def test_controlnet_sizes_and_a_wrong_embedding_are_refused():
    unet = tm.sd15_unet()
    light, full = (controlnet.size_report(controlnet.make_controlnet(unet, v)) for v in ("light", "full"))
    assert light["parameters"] < full["parameters"]
    with pytest.raises(ValueError, match=r"downsample the control image 8x, but the latents are 4x smaller.*give 3"):
        controlnet.make_controlnet(unet, conditioning_channels=(4, 8, 8, 8))
    with pytest.raises(ValueError, match="unknown toy ControlNet variant 'huge'; choose one of full, light"):
        controlnet.make_controlnet(unet, "huge")


def _tiny_pipeline(folder) -> StableDiffusionPipeline:
    """A random tiny pipeline shaped like the toy world's: 32 px images, a 4x VAE, 8x8 latents."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=4, sample_size=32).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=tm.text_encoder(0), tokenizer=tm.tokenizer(),
                                   unet=tm.sd15_unet(), scheduler=models.scheduler(), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def _tiny_work(tmp_path, n: int = 16):
    """A work folder with what the controlnet stage reads: data/train and data/test, latents/cache.pt (random
    latents and text states) and the pipeline."""
    work = tmp_path / "work"
    shapes.write_folder(shapes.sample("train", n, 0), work / "data" / "train")
    shapes.write_folder(shapes.sample("test", 3, 0), work / "data" / "test")
    generator = torch.Generator().manual_seed(0)
    cache = {"latents": torch.randn(n, 4, 8, 8, generator=generator),
             "text": torch.randn(n, 6, 32, generator=generator).half(),
             "empty": torch.randn(1, 6, 32, generator=generator)}
    (work / "latents").mkdir(parents=True)
    torch.save(cache, work / "latents" / "cache.pt")
    _tiny_pipeline(work / "pipeline")
    return work


def test_controlnet_stage_trains_checkpoints_and_resumes(tmp_path, capsys):
    work = _tiny_work(tmp_path)
    cfg = BuildConfig(work=work, train_size=16, controlnet_steps=2, controlnet_batch=4, checkpoint_seconds=0.0,
                      progress=False)
    (work / "controlnet").mkdir()
    info = controlnet.train_controlnet(cfg)
    assert info["steps"] == 2 and info["stopped_by"] == "steps" and info["variant"] == "light"
    assert np.isfinite(info["final_loss"])
    saved = ControlNetModel.from_pretrained(work / "controlnet" / "model")
    # Trained: the zero-initialised output convolutions have moved (the UNet was not touched).
    assert saved.controlnet_mid_block.weight.abs().sum() > 0
    assert info["parameters"] == models.parameter_count(saved)
    checkpoint = torch.load(work / "controlnet" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and set(checkpoint) == {"step", "seconds", "model", "opt"}

    more = controlnet.train_controlnet(dataclasses.replace(cfg, controlnet_steps=3))
    assert more["steps"] == 3
    assert "controlnet: resumed at step 2" in capsys.readouterr().out
    assert torch.load(work / "controlnet" / "checkpoint.pt", weights_only=True)["step"] == 3


def test_controlnet_stage_refuses_a_stale_latent_cache(tmp_path):
    work = _tiny_work(tmp_path)
    cache = torch.load(work / "latents" / "cache.pt", weights_only=True)
    torch.save({k: v[:8] if k != "empty" else v for k, v in cache.items()}, work / "latents" / "cache.pt")
    with pytest.raises(ValueError, match="the latent cache has 8 train images but data/train has 16; rerun"):
        controlnet.train_controlnet(BuildConfig(work=work, controlnet_steps=1, controlnet_batch=4, progress=False))


def test_layout_words_name_what_the_silhouette_fixes():
    a = shapes.Attributes(shape="circle", color="red", background="blue", style="solid", size="small", position="left")
    assert control_quality.layout_words(a) == "a small circle on the left"
    assert control_quality.layout_words(dataclasses.replace(a, size="large", position="center")) == \
        "a large circle in the center"


def test_partners_differ_in_shape_and_placement():
    truth = [shapes.Attributes("circle", "red", "blue", "solid", "large", "center"),
             shapes.Attributes("circle", "green", "blue", "solid", "small", "left"),  # same shape as 0
             shapes.Attributes("square", "green", "blue", "solid", "large", "center"),  # same placement as 0
             shapes.Attributes("cross", "cyan", "black", "dotted", "small", "right")]
    assert control_quality.partners(truth) == [3, 2, 3, 0]  # 0 skips 1 (its shape) and 2 (its placement)
    expected = control_quality.mixed(truth[0], truth[3])
    assert expected == shapes.Attributes("circle", "cyan", "black", "dotted", "large", "center")
    with pytest.raises(ValueError, match="no reference among the 2"):
        control_quality.partners(truth[:2])


def test_the_build_runs_the_stage_and_the_measurement(tmp_path):
    """The stage through the build (RUNNERS), on the tiny pipeline: training, then the measurement of the
    ControlNet alone through imprompt.generate, in done.json. The numbers mean nothing here."""
    from imprompt.toy import build, workdir
    from imprompt.toy.config import StageSelection

    work = _tiny_work(tmp_path)
    cfg = BuildConfig(work=work, train_size=16, controlnet_steps=2, controlnet_batch=4, controlnet_quality_samples=3,
                      quality_steps=2, jobs=1, progress=False)
    info = build.run(cfg, StageSelection(stage="controlnet"))["controlnet"]
    assert info == workdir.done_info(work, "controlnet") and info["steps"] == 2
    assert info["quality"]["n"] == 3 and set(info["quality"]) >= {"alone", "with_caption"}
    assert set(info["quality"]["alone"]) == {"shape", "size", "position", "control"}
    assert set(info["quality"]["with_caption"]) == {"shape", "size", "position", "color", "background", "style",
                                                    "control", "text", "all"}


def test_measurement_with_the_adapter(tmp_path, monkeypatch):
    """Control from reference A, image prompt B, through imprompt.generate with the ControlNet and the adapter:
    with an empty text, and with a text naming A's shape."""
    from imprompt.adapter.checkpoint import save_adapter

    pipe = _tiny_pipeline(tmp_path / "pipeline")
    controlnet.make_controlnet(pipe.unet).save_pretrained(tmp_path / "controlnet")
    encoder = tm.image_encoder()
    encoder.save_pretrained(tmp_path / "image_encoder")
    tm.feature_extractor().save_pretrained(tmp_path / "image_encoder")
    save_adapter(tm.random_adapter(pipe.unet, "linear", encoder=encoder), tmp_path / "ip_adapter.safetensors")
    truth = shapes.sample("test", 3, 0)
    shapes.write_folder(truth, tmp_path / "test")
    calls = []
    original = control_quality.controlled

    def recording(*args, **kwargs):
        calls.append((list(args[2]), args[-1] if len(args) > 10 else kwargs.get("adapter_scale"),
                      kwargs.get("adapter_start")))
        return original(*args, **kwargs)

    monkeypatch.setattr(control_quality, "controlled", recording)
    report = control_quality.measure(tmp_path / "pipeline", tmp_path / "controlnet", tmp_path / "test",
                                     adapter_file=tmp_path / "ip_adapter.safetensors", n=3, steps=2,
                                     parts=("with_adapter", "with_adapter_and_text"), adapter_scale=0.5,
                                     adapter_start=0.3, progress=False)
    assert report["n"] == 3 and (report["adapter_scale"], report["adapter_start"]) == (0.5, 0.3)
    assert "alone" not in report
    for part in ("with_adapter", "with_adapter_and_text"):
        assert set(report[part]) == {"shape", "size", "position", "color", "background", "style", "control",
                                     "reference", "all"}
        assert all(0.0 <= v <= 1.0 for v in report[part].values())
    assert calls == [([""] * 3, 0.5, 0.3), ([f"a {s.attributes.shape}" for s in truth], 0.5, 0.3)]

    # With a text diff: each row's image prompt is told B's shape becomes A's (the CLIP's text tower).
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(text_config=tm.text_encoder(3).config.to_dict(), vision_config=encoder.config.to_dict(),
                                projection_dim=encoder.config.projection_dim))
    clip.save_pretrained(tmp_path / "clip")
    tm.tokenizer().save_pretrained(tmp_path / "clip")
    diffs = []
    monkeypatch.setattr(control_quality, "controlled", lambda *a, **k: diffs.append(k["diffs"]) or original(*a, **k))
    report = control_quality.measure(tmp_path / "pipeline", tmp_path / "controlnet", tmp_path / "test",
                                     adapter_file=tmp_path / "ip_adapter.safetensors", n=3, steps=2,
                                     parts=("with_adapter",), progress=False, text_diff=0.3, clip=tmp_path / "clip")
    partner = control_quality.partners([s.attributes for s in truth])
    assert report["text_diff"] == 0.3
    assert [(d.source, d.target, d.strength) for d in diffs[0]] == [
        (f"a {truth[j].attributes.shape}", f"a {s.attributes.shape}", 0.3) for s, j in zip(truth, partner)]
    with pytest.raises(ValueError, match="with_adapter and with_adapter_and_text need adapter_file"):
        control_quality.measure(tmp_path / "pipeline", tmp_path / "controlnet", tmp_path / "test", n=3, steps=2)
