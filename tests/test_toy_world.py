"""The shipped toy models: they load offline through the standard classes, and image prompts work."""

from __future__ import annotations

import pytest
import torch

from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate, load_adapter, load_pipeline
from imprompt.adapter.checkpoint import load_shared_adapter
from imprompt.evaluation.metrics import proportion
from imprompt.toy import shapes, toy_paths
from imprompt.toy.reader import read


def test_shipped_models_load_with_the_standard_classes():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer, CLIPVisionModelWithProjection

    paths = toy_paths()
    pipe = StableDiffusionPipeline.from_pretrained(paths["model"], local_files_only=True)
    assert pipe.unet.config.sample_size == 8 and pipe.vae_scale_factor == 4
    tokenizer = CLIPTokenizer.from_pretrained(paths["model"] / "tokenizer")
    assert len(tokenizer) > 50 and len(tokenizer("a red circle on a blue background").input_ids) == 9
    assert CLIPVisionModelWithProjection.from_pretrained(paths["image_encoder"]).config.image_size == 32
    assert load_adapter(paths["adapter"]).variant.projection == "linear"
    simple = load_shared_adapter(paths["simple_adapter"])  # the ablation: a projection and no attention layers
    assert simple.variant.num_tokens == 4 and len(simple.ip_adapter) == 0


@pytest.mark.slow  # about 30 s
def test_image_prompts_carry_the_reference_far_above_unconditional():
    torch.set_flush_denormal(True)
    paths = toy_paths()
    pipe = load_pipeline(paths["model"])
    encoder = ImageEncoder.from_pretrained(paths["image_encoder"])
    samples = shapes.sample("test", 24, seed=5)
    ip_hits, uncond_hits = ({a: [] for a in ("shape", "color", "background")} for _ in range(2))
    with attach(pipe.unet, load_adapter(paths["adapter"])) as attachment:
        for i, sample in enumerate(samples):
            settings = GenerationSettings(prompt="", steps=15, guidance=3.0, seed=i, num_images=2)
            with_image = generate(pipe, attachment, settings, [ImagePrompt([sample.image], scale=1.0)], [encoder])
            without = generate(pipe, attachment, settings, [], [encoder])
            for image in with_image:
                got = read(image)
                for a in ip_hits:
                    ip_hits[a].append(getattr(got, a) == getattr(sample.attributes, a))
            for image in without:
                got = read(image)
                for a in uncond_hits:
                    uncond_hits[a].append(getattr(got, a) == getattr(sample.attributes, a))
    for attribute in ip_hits:
        ip, uncond = proportion(ip_hits[attribute]), proportion(uncond_hits[attribute])
        # Measured on 200 test references (toy build, stage quality): shape 94.5% vs 16.5%, colour 90.5% vs 15%,
        # background 99% vs 15%.
        assert ip.low > uncond.high, (attribute, ip, uncond)


def test_shipped_scoring_clip_shares_the_pipeline_towers_and_reads_the_references():
    import json

    from PIL import Image
    from safetensors.torch import load_file

    from imprompt.evaluation.scoring import ClipScorer

    paths = toy_paths()
    assert set(load_file(paths["clip"] / "model.safetensors")) == {"text_projection.weight", "logit_scale"}
    scorer = ClipScorer.from_pretrained(paths["clip"])
    encoder = ImageEncoder.from_pretrained(paths["image_encoder"])
    vision = scorer.model.vision_model.state_dict()
    assert all(torch.equal(vision[k], v.float()) for k, v in encoder.model.vision_model.state_dict().items())
    picked = [p for p in json.loads((paths["references"] / "attributes.json").read_text()) if p["split"] == "test"]
    assert len(picked) >= 4  # (held-out shape/colour pairs are left out: CLIP never saw them captioned)
    images = [Image.open(paths["references"] / p["file"]) for p in picked]
    image_embeds = torch.nn.functional.normalize(scorer.image_embeds(images), dim=-1)
    style_word = {"outline": "outlined"}
    for attribute, values in (("shape", shapes.SHAPES), ("color", shapes.COLORS), ("background", shapes.BACKGROUNDS)):
        for image_embed, p in zip(image_embeds, picked):  # zero-shot: the caption with one attribute varied
            options = [v for v in values if attribute == "shape" or v != p["background" if attribute == "color" else "color"]]
            texts = [" ".join([style_word.get(p["style"], p["style"]), v if attribute == "color" else p["color"],
                               v if attribute == "shape" else p["shape"]])
                     + f", {v if attribute == 'background' else p['background']} background" for v in options]
            text_embeds = torch.nn.functional.normalize(scorer.text_embeds(texts), dim=-1)
            assert options[int((text_embeds @ image_embed).argmax())] == p[attribute], (attribute, p, texts)


@pytest.mark.slow  # about 20 s
def test_toy_evaluation_end_to_end_adapter_beats_unconditional(tmp_path):
    """`imprompt eval` on the shipped toy world: the expected tables, and the adapter far above chance."""
    import json
    import re

    from imprompt.evaluation.cli import main

    torch.set_flush_denormal(True)
    out = tmp_path / "eval"
    code = main(["--data", "toy:test", "--references", "16", "--samples", "2", "--steps", "15", "--guidance", "3",
                 "--method", "ip:ip_adapter", "--method", "uncond:unconditional", "--no-scale-sweep", "--no-multimodal",
                 "--sheet-references", "2", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    report = (out / "report.md").read_text()
    for heading in ("Image prompt alone", "Attributes of the generation"):
        section = report.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
        rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")][2:]
        assert rows == ["ip", "uncond"], heading
    assert re.search(r"wall time: \d+\.\d s", report)
    methods = json.loads((out / "results.json").read_text())["methods"]
    ip, uncond = (methods[m]["passes"]["image_prompt"]["summary"] for m in ("ip", "uncond"))
    assert ip["clip_i"]["low"] > uncond["clip_i"]["high"], (ip["clip_i"], uncond["clip_i"])
    for attribute in ("color", "background"):  # 32 generations each; Wilson intervals must not overlap
        assert ip["hits"][attribute]["low"] > uncond["hits"][attribute]["high"], (attribute, ip["hits"], uncond["hits"])
