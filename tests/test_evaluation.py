"""Evaluation harness: report structure, shared seeds, config from YAML and flags, clear errors.

Tiny random models saved to a temporary folder; 2-3 references, 2 samples, 2 steps. The tiny UNet's
sample size is raised to 16 latents (32x32 px) so its generations can go through the toy world's
attribute reader: the toy tables are exercised without the trained toy models.
"""

from __future__ import annotations

import json
import re
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

import tiny_models as tm
from imprompt.adapter.checkpoint import load_shared_adapter, save_adapter
from imprompt.adapter.model import IPAdapter
from imprompt.adapter.variants import AdapterVariant, CheckpointError
from imprompt.evaluation import metrics
from imprompt.evaluation.cli import main
from imprompt.evaluation.config import EvalConfig, MethodSpec, load_config, parse_method, with_toy_defaults
from imprompt.evaluation.methods import shared_prompt_embeds
from imprompt.evaluation.run import evaluate, summarize_samples
from imprompt.evaluation.scoring import attribute_hits, edit_hits
from imprompt.generation.pipelines import ModelNotFoundError
from imprompt.toy.shapes import Attributes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_KINDS = ["ip:ip_adapter:adapter={w}/ip.safetensors,image_encoder={w}/encoder",
             "simple:shared:adapter={w}/shared.safetensors,image_encoder={w}/encoder",
             "text:text_only", "uncond:unconditional", "i2i:img2img:strength=0.5"]


def tiny_clip() -> CLIPModel:
    torch.manual_seed(2)
    text = dict(vocab_size=190, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=188, eos_token_id=189, pad_token_id=189)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    pipe = tm.sd15_pipeline()
    pipe.unet.register_to_config(sample_size=16)  # 16 latents x VAE factor 2 = 32 px, the toy world's size
    pipe.save_pretrained(root / "sd")
    encoder = tm.image_encoder()
    encoder.save_pretrained(root / "encoder")
    save_adapter(tm.random_adapter(pipe.unet, "linear", encoder=encoder), root / "ip.safetensors")
    torch.manual_seed(1)
    save_adapter(IPAdapter(AdapterVariant("linear", 24, 32, 4), {}), root / "shared.safetensors")  # image_proj only
    tiny_clip().save_pretrained(root / "clip")
    tm.tokenizer().save_pretrained(root / "clip")
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(root / "clip")
    refs = root / "refs"
    refs.mkdir()
    for i, image in enumerate(tm.reference_images(3)):
        image.save(refs / f"ref{i}.png")
        (refs / f"ref{i}.txt").write_text(f"picture {i}\n")
    return root


def config(world: Path, out: Path, methods: list[str], **values) -> EvalConfig:
    base = dict(model=str(world / "sd"), data=str(world / "refs"), references=3, samples=2, steps=2,
                clip_model=str(world / "clip"), output_dir=str(out), scales=[0.0, 1.0], progress=False)
    base.update(values)
    return load_config(None, {**base, "methods": [m.format(w=world) for m in methods]})


def table_rows(report: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table under ``## heading``."""
    section = report.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        image.verify()
    return path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow  # over 10 s
def test_toy_report_has_one_row_per_method_and_every_file(world, tmp_path):
    out = tmp_path / "toy"
    result = evaluate(config(world, out, ALL_KINDS, data="toy:test", references=2, sheet_references=2), log=lambda m: None)
    names = ["ip", "simple", "text", "uncond", "i2i"]
    report = (out / "report.md").read_text()

    table1 = table_rows(report, "Image prompt alone")
    assert [r[0] for r in table1] == names
    assert all(re.fullmatch(r"-?\d\.\d{3} ± \d\.\d{3}", cell) for r in table1 for cell in r[2:4])
    attributes = table_rows(report, "Attributes of the generation")
    assert [r[0] for r in attributes] == names and len(attributes[0]) == 1 + 7  # six attributes + all
    assert all(re.fullmatch(r"\d+\.\d% \(\d+\.\d–\d+\.\d\)", cell) for r in attributes for cell in r[1:])
    multimodal = table_rows(report, "Image + text")
    assert [r[0] for r in multimodal] == ["ip", "simple", "text", "i2i"]  # unconditional takes no text
    assert len(multimodal[0]) == 4 + 3  # CLIP-I, CLIP-T, follows text, keeps reference, both
    sweep = table_rows(report, "Scale sweep")
    assert [(r[0], r[1]) for r in sweep] == [("ip", "0"), ("ip", "1")]
    assert "CLIP-T = 1 * max(cos(image, text), 0) (plain cosine" in report
    assert re.search(r"wall time: \d+\.\d s", report)

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"settings", "references", "methods", "timing"}
    assert list(results["methods"]) == names
    assert results["timing"]["wall_seconds"] > 0
    assert results["references"][0]["edit"]["changed"] in ("background", "color")
    ip = results["methods"]["ip"]
    assert list(ip["passes"]) == ["image_prompt", "multimodal", "sweep 0", "sweep 1"]
    assert ip["passes"]["sweep 1"]["same_as"] == "multimodal"  # scale 1 is the method's own: generated once
    samples = ip["passes"]["image_prompt"]["samples"]
    assert len(samples) == 2 * 2 and [s["seed"] for s in samples] == [0, 1, 2, 3]
    assert set(samples[0]) == {"reference", "sample", "seed", "clip_i", "clip_t", "read", "hits"}
    assert set(ip["passes"]["multimodal"]["samples"][0]["edit_hits"]) >= {"follows_text", "keeps_reference", "both"}
    summary = ip["passes"]["image_prompt"]["summary"]
    assert set(summary) == {"clip_i", "clip_t", "hits"} and summary["clip_i"]["n"] == 2  # CI over references

    sheets = sorted(p.name for p in (out / "sheets").iterdir())
    assert sheets == sorted(["image_prompt.png", "multimodal.png", "sweep-ip.png"] + [f"{n}.png" for n in names])
    assert all(is_png(out / "sheets" / s) for s in sheets) and is_png(out / "scale_sweep.png")
    with Image.open(out / "sheets" / "ip.png") as sheet:  # reference + 2 image-alone + 2 image+text, 2 rows
        assert sheet.height == 16 + 2 * (128 + 4) + 4
    assert set(result.images["ip"]) == set(ip["passes"])


@pytest.mark.slow  # over 10 s
def test_same_seeds_for_every_method_through_the_command_line(world, tmp_path, capsys):
    out = tmp_path / "seeds"
    argv = ["--model", str(world / "sd"), "--data", str(world / "refs"), "--references", "2", "--samples", "2",
            "--steps", "2", "--clip-model", str(world / "clip"), "--output-dir", str(out), "--scales", "0",
            "--scales", "0.5", "--save-images", "--no-progress",
            "--method", "text:text_only", "--method", "again:text_only",
            "--method", f"ip:ip_adapter:adapter={world / 'ip.safetensors'},image_encoder={world / 'encoder'}"]
    assert main(argv) == 0
    folder = out / "images"

    def pixels(method: str, step: str) -> np.ndarray:
        return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted((folder / method / step).glob("*.png"))])

    first, second = pixels("text", "image_prompt"), pixels("again", "image_prompt")
    assert first.shape == (4, 32, 32, 3) and np.array_equal(first, second)
    # The adapter at scale 0 is no adapter (the core's invariant), so with the same seeds and text the
    # sweep's scale-0 generations are text_only's image + text generations.
    assert np.abs(pixels("ip", "sweep-0") - pixels("text", "multimodal")).max() <= 1
    assert not np.array_equal(pixels("ip", "sweep-0.5"), pixels("text", "multimodal"))
    report = (out / "report.md").read_text()
    assert "Attributes of the generation" not in report  # no toy tables for a folder of images
    assert [r[0] for r in table_rows(report, "Image prompt alone")] == ["text", "again", "ip"]


def test_config_from_yaml_and_flags(tmp_path):
    yaml_file = tmp_path / "eval.yaml"
    yaml_file.write_text("model: sd\nclip_model: clip\nsamples: 3\nscales: [0, 0.5]\nmethods:\n"
                         "  - {name: ip, kind: ip_adapter, adapter: ip.safetensors, scale: 0.6}\n"
                         "  - name: i2i\n    kind: img2img\n    strength: 0.4\n"
                         "  - text:text_only\n")
    cfg = load_config(yaml_file)
    assert [m.name for m in cfg.methods] == ["ip", "i2i", "text"]
    assert cfg.methods[0] == MethodSpec("ip", "ip_adapter", adapter="ip.safetensors", scale=0.6)
    assert cfg.methods[1].init_strength == 0.4 and cfg.methods[2].kind == "text_only"
    assert cfg.samples == 3 and cfg.scales == [0.0, 0.5] and cfg.steps == 30
    cfg.check()

    from imprompt.evaluation.cli import build_parser

    namespace = build_parser().parse_args([str(yaml_file), "--samples", "2", "--method", "u:unconditional",
                                           "--methods", "x:img2img:strength=0.9", "--no-multimodal", "--scales", "1"])
    fields = set(EvalConfig.__dataclass_fields__)
    cfg = load_config(namespace.config, {k: v for k, v in vars(namespace).items() if k in fields})
    assert cfg.samples == 2 and cfg.model == "sd" and cfg.multimodal is False and cfg.scales == [1.0]
    assert cfg.methods == [MethodSpec("u", "unconditional"), MethodSpec("x", "img2img", strength=0.9)]  # flags replace the list
    assert parse_method("a:ip_adapter:adapter=models/ip.safetensors, scale=0.5") == MethodSpec(
        "a", "ip_adapter", adapter="models/ip.safetensors", scale=0.5)
    text = "b:ip_adapter:adapter=ip.safetensors,layers=up_blocks=1;default=0.3,guidance=6,image_guidance=4"
    assert parse_method(text) == MethodSpec("b", "ip_adapter", adapter="ip.safetensors", layers="up_blocks=1;default=0.3",
                                            guidance=6.0, image_guidance=4.0)


@pytest.mark.parametrize("methods, message", [
    (["x:diffusion"], r"method 'x': unknown kind 'diffusion'; expected one of ip_adapter, shared, text_only"),
    (["x:ip_adapter"], r"method 'x' \(kind ip_adapter\) needs an adapter file: adapter=PATH"),
    (["x:text_only:adapter=a.safetensors"], r"kind text_only takes no adapter"),
    (["x:img2img:scale=0.5"], r"scale applies to ip_adapter methods only"),
    (["x:shared:adapter=s.safetensors,scale=0.5"], r"the shared adapter has no scale"),
    (["x:img2img:strength=1.5"], r"strength must be in \(0, 1\], got 1.5"),
    (["x:text_only", "x:unconditional"], r"method names must be unique; \['x'\]"),
    (["x:text_only:steps=3"], r"unknown method option\(s\) \['steps'\]"),
    (["x"], r"expected NAME:KIND\[:key=value,...\]"),
    (["x:img2img:strength=lots"], r"strength must be a number, got 'lots'"),
    (["x:text_only:image_guidance=2"], r"image_guidance applies to ip_adapter methods only"),
    (["x:img2img:layers=up_blocks=1"], r"layers applies to ip_adapter methods only"),
    ([], r"give at least one method"),
])
def test_bad_configs_say_what_is_wrong(methods, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, {"model": "sd", "clip_model": "clip", "methods": methods}).check()


def test_bad_files_are_reported_before_the_model_loads(world, tmp_path, capsys):
    with pytest.raises(ModelNotFoundError, match=r"method 'ip': adapter file .*missing.safetensors' does not exist"):
        evaluate(config(world, tmp_path, ["ip:ip_adapter:adapter={w}/missing.safetensors"]))
    with pytest.raises(CheckpointError, match=r"holds only image_proj weights, as a shared \(simple\) adapter does; use kind: shared"):
        evaluate(config(world, tmp_path, ["ip:ip_adapter:adapter={w}/shared.safetensors,image_encoder={w}/encoder"]))
    with pytest.raises(CheckpointError, match=r"it is an IP-Adapter, not a shared adapter; use kind: ip_adapter"):
        evaluate(config(world, tmp_path, ["s:shared:adapter={w}/ip.safetensors,image_encoder={w}/encoder"]))
    with pytest.raises(ValueError, match=r"has 3 images, fewer than references=5"):
        evaluate(config(world, tmp_path, ["t:text_only"], references=5))
    with pytest.raises(ValueError, match=r"lacks preprocessor_config.json, tokenizer_config.json"):
        evaluate(config(world, tmp_path, ["t:text_only"], clip_model=str(world / "encoder")))
    assert main(["--model", "sd", "--clip-model", "c", "--method", "x:diffusion"]) == 2
    assert "imprompt eval: error: method 'x': unknown kind 'diffusion'" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_bad_inputs_give_one_line_before_the_model_loads(world, tmp_path, capsys):
    refs = tmp_path / "refs"
    refs.mkdir()
    bomb = bytearray((world / "refs" / "ref0.png").read_bytes())
    bomb[16:24] = struct.pack(">II", 50000, 50000)  # the PNG header now declares 2500 MP
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    (refs / "bomb.png").write_bytes(bytes(bomb))
    (refs / "bomb.txt").write_text("a bomb")
    base = ["--model", str(world / "sd"), "--clip-model", str(world / "clip"), "--references", "1",
            "--method", "t:text_only", "--no-progress"]
    # A bomb (and a caption that is a FIFO) are skipped and counted, never decoded or read; with
    # nothing else usable, the run stops in one line before any model loads.
    os.mkfifo(refs / "fifo.txt")
    (refs / "fifo.png").write_bytes((world / "refs" / "ref0.png").read_bytes())
    assert main([*base, "--data", str(refs), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "skipped 2 unusable reference(s)" in err and "bomb.png declares" in err and "over the" in err, err
    assert "has 0 usable images (2 skipped), fewer than references=1" in err and err.count("\n") == 2, err
    assert not (tmp_path / "out").exists()
    # A usable reference after them takes their place.
    (refs / "zgood.png").write_bytes((world / "refs" / "ref0.png").read_bytes())
    (refs / "zgood.txt").write_text("a good reference")
    from imprompt.evaluation.references import folder_references

    assert [r.name for r in folder_references(refs, 1)] == ["zgood"]
    assert "skipped 2" in capsys.readouterr().err
    (tmp_path / "file").write_text("not a folder")
    assert main([*base, "--data", str(world / "refs"), "--output-dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "is a file" in err and err.count("\n") == 1, err


def test_no_model_outside_the_toy_sets_names_the_real_fix(world, capsys):
    # Without --model, only toy: sets get the shipped defaults; the adapter method is not to blame.
    assert main(["--data", str(world / "refs"), "--method", "ip:ip_adapter", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "evaluation needs --model" in err and "defaults only for --data toy:test" in err and "needs an adapter" not in err
    with pytest.raises(ValueError, match=r"needs an adapter file: adapter=PATH \(the toy defaults fill adapters in only "
                                         r"when --model is not given\)"):
        EvalConfig(model="mine", clip_model="c", methods=[MethodSpec("ip", "ip_adapter")]).check()


def test_toy_defaults(tmp_path, monkeypatch):
    import imprompt.toy

    monkeypatch.setattr(imprompt.toy, "PACKAGE_DIR", tmp_path)
    methods = [MethodSpec("ip", "ip_adapter"), MethodSpec("t", "text_only"), MethodSpec("s", "shared")]
    with pytest.raises(ValueError, match="shipped toy models are missing"):
        with_toy_defaults(EvalConfig(methods=methods))
    (tmp_path / "ip_adapter.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="ships no scoring CLIP"):
        with_toy_defaults(EvalConfig(methods=methods))
    cfg = with_toy_defaults(EvalConfig(methods=methods, clip_model="clip"))
    assert cfg.model == str(tmp_path / "pipeline") and cfg.methods[0].adapter == str(tmp_path / "ip_adapter.safetensors")
    assert cfg.methods[0].image_encoder == str(imprompt.toy.toy_paths(tmp_path)["image_encoder"]) and cfg.methods[1].adapter == ""
    assert cfg.methods[2].adapter == str(tmp_path / "simple_adapter.safetensors")
    given = EvalConfig(model="mine", methods=methods, data="toy:heldout")
    assert with_toy_defaults(given) is given  # an explicit model gets no toy defaults


def test_shared_adapter_appends_its_tokens_to_the_text_tokens(world):
    from imprompt.encoding import ImageEncoder
    from imprompt.generation.pipelines import load_pipeline

    pipe = load_pipeline(world / "sd")
    adapter = load_shared_adapter(world / "shared.safetensors")
    encoder = ImageEncoder.from_pretrained(world / "encoder")
    reference = tm.reference_images(1)[0]
    embeds = shared_prompt_embeds(pipe, adapter, encoder, reference, "a cat")
    text, negative = pipe.encode_prompt("a cat", "cpu", 1, True, None)
    assert embeds["prompt_embeds"].shape == (1, 77 + 4, 32)
    assert torch.equal(embeds["prompt_embeds"][:, :77], text) and torch.equal(embeds["negative_prompt_embeds"][:, :77], negative)
    features = encoder.features(encoder.pixels([reference]), "image_embeds")
    assert torch.allclose(embeds["prompt_embeds"][:, 77:], adapter.project(features), atol=1e-6)
    # The negative side gets the unconditional (all-zero) image embedding, as training's image dropout.
    assert torch.allclose(embeds["negative_prompt_embeds"][:, 77:], adapter.project(torch.zeros_like(features)), atol=1e-6)


def test_attribute_and_edit_hits():
    ref = Attributes("circle", "red", "white", "solid", "large", "center")
    read = Attributes("circle", "red", "blue", "solid", "small", "left")
    hits = attribute_hits(read, ref)
    assert hits == {"shape": True, "color": True, "background": False, "style": True, "size": False, "position": False,
                    "all": False}
    expected = Attributes("circle", "red", "blue", "solid", "large", "center")
    edit = edit_hits(read, ref, "background", expected)
    assert edit["follows_text"] and edit["keeps_reference"] and edit["both"]  # size/position are not content
    assert not edit_hits(ref, ref, "background", expected)["follows_text"]


def test_clip_intervals_are_over_references():
    records = [{"reference": r, "sample": s, "clip_i": v, "clip_t": 0.5, "hits": {"all": v > 0.5}}
               for r, values in enumerate([(0.2, 0.4), (0.6, 0.8), (1.0, 1.0)]) for s, v in enumerate(values)]
    summary = summarize_samples(records)
    expected = metrics.summarize([0.3, 0.7, 1.0])
    assert summary["clip_i"]["mean"] == pytest.approx(expected.mean) and summary["clip_i"]["n"] == 3
    assert summary["clip_i"]["high"] == pytest.approx(expected.high)
    assert summary["hits"]["all"]["n"] == 6 and summary["hits"]["all"]["mean"] == pytest.approx(4 / 6)


def test_names_in_a_comfyui_tree_give_the_folder_results(world, tmp_path):
    """--models-dir: the model as a single-file checkpoint, the adapter and its encoder (found by pairing,
    not named) as ComfyUI keeps them; the same scores as with the diffusers folders."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from imprompt.models.ldm import pipeline_to_ldm

    comfy = tmp_path / "comfy" / "models"
    for sub in ("checkpoints", "ipadapter", "clip_vision"):
        (comfy / sub).mkdir(parents=True)
    pipe = StableDiffusionPipeline.from_pretrained(world / "sd")
    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(pipe, "sd15").items()}, comfy / "checkpoints" / "Tiny.safetensors")
    (comfy / "ipadapter" / "ip-adapter_sd15.safetensors").write_bytes((world / "ip.safetensors").read_bytes())
    CLIPVisionModelWithProjection.from_pretrained(world / "encoder").save_pretrained(comfy / "clip_vision" / "tiny-vit")
    small = dict(references=1, samples=1, steps=1, scale_sweep=False, multimodal=False, progress=False)
    paths = evaluate(config(world, tmp_path / "paths", ["ip:ip_adapter:adapter={w}/ip.safetensors,image_encoder={w}/encoder"],
                           **small), log=lambda m: None)
    named = evaluate(config(world, tmp_path / "named", ["ip:ip_adapter:adapter=ip-adapter_sd15"], **small,
                            model="tiny", models_dir=[str(tmp_path / "comfy")], model_config=str(world / "sd")),
                     log=lambda m: None)
    def scores(result):  # the per-sample scores, not the timings
        return result.results["methods"]["ip"]["passes"]["image_prompt"]["samples"]

    assert scores(named) == scores(paths) and scores(paths)[0]["clip_i"] > 0
    assert named.results["methods"]["ip"]["image_encoder_dir"].endswith("tiny-vit")
