"""LoRAs and embeddings named in prompts, found in an A1111 tree, through the CLI and the library:
PNG info as A1111 writes it, removal bit for bit, early errors, and LoRA extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tiny_models as tm
from imprompt.cli import main
from imprompt.generation.generate import generate
from imprompt.generation.networks import Networks
from imprompt.generation.pnginfo import parse_parameters
from imprompt.generation.settings import GenerationSettings
from imprompt.models.catalog import Catalog
from imprompt.models.hashes import addnet_short_hash, sha256_file
from imprompt.models.lora_extract import ExtractConfig, extract_lora, factor
from test_loras import kohya_sd15


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    torch.set_flush_denormal(True)
    root = tmp_path_factory.mktemp("a1111")
    pipe = tm.sd15_pipeline()
    pipe.save_pretrained(root / "models" / "Stable-diffusion" / "tiny")  # a diffusers folder is a checkpoint too
    (root / "models" / "Lora" / "styles").mkdir(parents=True)
    save_file(kohya_sd15(pipe, seed=4), root / "models" / "Lora" / "styles" / "inky.safetensors")
    ids = pipe.tokenizer.convert_tokens_to_ids(pipe.tokenizer.tokenize("cat"))
    (root / "embeddings").mkdir()
    save_file({"emb_params": pipe.text_encoder.get_input_embeddings().weight[ids].detach().clone()},
              root / "embeddings" / "zq.safetensors")
    return root


def run(tree, out, prompt, negative=""):
    code = main(["generate", "--models-dir", str(tree), "--model", "tiny", "--prompt", prompt, "--negative-prompt",
                 negative, "--steps", "2", "--seed", "5", "--guidance", "5", "--output", str(out)])
    assert code == 0
    (png,) = sorted(out.glob("*.png"))
    image = Image.open(png)
    return np.asarray(image), image.info["parameters"]


def test_cli_lora_and_embedding_with_a1111_png_info(tree, tmp_path):
    plain, _ = run(tree, tmp_path / "plain", "a red cat")
    styled, text = run(tree, tmp_path / "lora", "a red cat <lora:inky:0.8>", negative="zq, blurry")
    assert not np.array_equal(plain, styled)
    info = parse_parameters(text)
    assert info["Prompt"] == "a red cat <lora:inky:0.8>"  # as written, so it pastes back
    lora = tree / "models" / "Lora" / "styles" / "inky.safetensors"
    assert info["Lora hashes"] == f"inky: {addnet_short_hash(lora)}"
    assert info["TI hashes"] == f"zq: {sha256_file(tree / 'embeddings' / 'zq.safetensors')[:12]}"
    zero, text = run(tree, tmp_path / "zero", "a red cat <lora:styles/inky:0>")  # the sub-folder name works too
    assert np.array_equal(zero, plain)
    # the embedding stands for "cat": the same picture as writing the word
    word, _ = run(tree, tmp_path / "word", "a red zq")
    assert np.array_equal(word, plain)


def test_lora_names_are_checked_before_anything_loads(tree, tmp_path, capsys):
    assert main(["generate", "--models-dir", str(tree), "--model", "tiny", "--prompt", "<lora:nope:1>",
                 "--output", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "no lora named 'nope'" in err and "inky" in err
    assert main(["generate", "--model", str(tree / "models" / "Stable-diffusion" / "tiny"),
                 "--prompt", "<lora:inky:1>", "--output", str(tmp_path)]) != 0
    assert "--models-dir" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_library_generation_after_a_lora_is_as_before(tree):
    pipe = tm.sd15_pipeline()
    networks = Networks.from_catalog(Catalog.scan([tree]))

    def image(prompt):
        return generate(pipe, None, GenerationSettings(prompt=prompt, steps=2, seed=1, height=32, width=32),
                        output_type="np", networks=networks)

    before = image("a cat")
    with_lora = image("a cat <lora:inky:1:0.5>")
    assert not np.array_equal(before, with_lora)
    assert np.array_equal(image("a cat"), before)
    with pytest.raises(ValueError, match="no model folders"):
        generate(pipe, None, GenerationSettings(prompt="<lora:inky:1>", steps=1), output_type="np")


def test_factor_recovers_a_low_rank_change():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 3, generator=g) @ torch.randn(3, 20, generator=g)
    up, down, kept = factor(delta, 3)
    assert torch.allclose(up @ down, delta, atol=1e-5) and kept == pytest.approx(1.0)
    up, down, kept = factor(delta, 1)
    assert 0 < kept < 1


def test_extracted_lora_turns_the_base_into_the_tuned_model(tmp_path):
    base = tm.sd15_pipeline()
    tuned = tm.sd15_pipeline()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a rank-2 change of every attention projection: what rank 2 must recover exactly
        for name, module in tuned.unet.named_modules():
            if isinstance(module, torch.nn.Linear) and "attn" in name:
                module.weight += 0.2 * torch.randn(module.out_features, 2, generator=g) @ torch.randn(
                    2, module.in_features, generator=g)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "models" / "Lora" / "diff.safetensors"
    out.parent.mkdir(parents=True)
    assert main(["extract-lora", str(tmp_path / "base"), str(tmp_path / "tuned"), "--rank", "2",
                 "--output", str(out)]) == 0
    extracted = extract_lora(ExtractConfig(base=str(tmp_path / "base"), tuned=str(tmp_path / "tuned"), rank=2,
                                           output=str(tmp_path / "again.safetensors")), log=lambda *_: None)
    assert extracted.kept["unet"] == pytest.approx(1.0, abs=1e-6)
    networks = Networks.from_catalog(Catalog.scan([tmp_path]))

    def image(pipe, prompt):
        return generate(pipe, None, GenerationSettings(prompt=prompt, steps=2, seed=1, height=32, width=32),
                        output_type="np", networks=networks)

    target = image(tuned, "a cat")
    assert not np.allclose(image(base, "a cat"), target, atol=1e-3)
    assert np.allclose(image(base, "a cat <lora:diff:1>"), target, atol=2e-3)  # float16 factors


def test_the_toy_lora_and_embedding_work_by_name_with_the_toy_model(tmp_path):
    """No --models-dir: the bundled toy model finds its own LoRA and embedding."""
    def run_toy(prompt, out):
        assert main(["generate", "--prompt", prompt, "--steps", "2", "--seed", "1", "--output", str(out)]) == 0
        (png,) = sorted(out.glob("*.png"))
        return np.asarray(Image.open(png)), Image.open(png).info["parameters"]

    plain, _ = run_toy("a red circle", tmp_path / "a")
    styled, text = run_toy("a red circle <lora:toy-striped:1> tistripes", tmp_path / "b")
    assert not np.array_equal(plain, styled)
    info = parse_parameters(text)
    assert info["Lora hashes"].startswith("toy-striped: ") and info["TI hashes"].startswith("tistripes: ")
