"""Saved image features (embeds): encode -> save -> load -> generate is generating from the images;
diffusers' and ComfyUI's layouts load; pickles never run; a mismatch is refused with the fix."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from imprompt import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate
from imprompt.adapter.checkpoint import nest
from imprompt.cli import main
from imprompt.generation.embeds import (EmbedsError, ImageFeatures, check_features, embeds_file_bytes,
                                        embeds_from_bytes, encode_references, from_diffusers, load_embeds, save_embeds)
from imprompt.generation.negative_noise import NegativeNoise
from imprompt.generation.prompts import BatchLayout, encode_image_prompts, prepare_image_prompt
from imprompt.generation.tiles import TileOptions


@pytest.fixture(scope="module")
def world():
    pipe = tm.sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    encoder = tm.image_encoder()
    adapters = {kind: tm.random_adapter(pipe.unet, kind, seed=i, encoder=encoder)
                for i, kind in enumerate(("linear", "plus"))}
    return pipe, adapters, ImageEncoder(encoder)


def _generate(pipe, attachment, prompt, encoder):
    settings = GenerationSettings(prompt="a star", steps=2, seed=0)
    return generate(pipe, attachment, settings, [prompt], [encoder], output_type="np")


def _prepared(world, kind, prompt):
    pipe, adapters, encoder = world
    with attach(pipe.unet, adapters[kind]) as attachment:
        return prepare_image_prompt(prompt, attachment, encoder, BatchLayout(True, 1), (8, 8))


def _same_kv(a, b) -> bool:
    assert len(a) == len(b)
    return all(list(x) == list(y) and all(torch.equal(x[k].key, y[k].key) and torch.equal(x[k].value, y[k].value)
                                          for k in x) for x, y in zip(a, b))


def test_encode_save_load_generate_gives_the_same_pixels_as_the_images(world, tmp_path):
    pipe, adapters, encoder = world
    refs = tm.reference_images(2)
    features = encode_references(refs, encoder, "image_embeds")
    path = save_embeds(tmp_path / "refs.ipadpt", features)
    with attach(pipe.unet, adapters["linear"]) as attachment:
        expected = _generate(pipe, attachment, ImagePrompt(refs, scale=0.8), encoder)
        got = _generate(pipe, attachment, ImagePrompt(embeds=load_embeds(path), scale=0.8), encoder)
    assert np.array_equal(got, expected)
    # The .safetensors form holds the same tensors (and so gives the same keys and values).
    loaded = load_embeds(save_embeds(tmp_path / "refs.safetensors", features))
    assert torch.equal(loaded.conditional, features.conditional)
    assert torch.equal(loaded.unconditional, features.unconditional)


@pytest.mark.parametrize("kind", ["linear", "plus"])
def test_prompts_encoded_up_front_give_the_same_pixels_without_the_encoder(world, kind):
    # What `imprompt generate` does to release the image encoder before the denoising loop: the
    # prompts' features (negative image, noise negative, tiles folded in) computed first; the
    # encoder then comes back as None and the generation reads the features alone.
    pipe, adapters, encoder = world
    refs = tm.reference_images(3)
    prompts = [ImagePrompt(refs[:2], scale=0.8, negative_images=refs[2:], negative_noise=NegativeNoise("dissolve", 0.5),
                           tiles=TileOptions(enhance=True), combine="weighted", weights=[2, 1]),
               ImagePrompt(embeds=ImageFeatures(encode_references(refs[2:], encoder, "image_embeds").conditional,
                                                None, "image_embeds"))]
    if kind == "plus":
        prompts = prompts[:1]
    encoded, encoders = encode_image_prompts(prompts, [adapters[kind]], [encoder])
    assert encoders == [None]
    assert all(p.embeds is not None and p.embeds.unconditional is not None and not p.images and p.tiles is None
               and p.negative_images is None and p.negative_noise is None for p in encoded)
    settings = GenerationSettings(prompt="a star", steps=2, seed=0)
    with attach(pipe.unet, adapters[kind]) as attachment:
        for prompt, up_front in zip(prompts, encoded):
            expected = generate(pipe, attachment, settings, [prompt], [encoder], output_type="np")
            got = generate(pipe, attachment, settings, [up_front], encoders, output_type="np")
            assert np.array_equal(got, expected)
        # Bare positive embeds need the encoder for their unconditional half: refused by name without it.
        with pytest.raises(ValueError, match="adapter 0 has no image encoder"):
            generate(pipe, attachment, settings, [ImagePrompt(refs[:1])], encoders, output_type="np")


@pytest.mark.parametrize("kind", ["linear", "plus"])
def test_round_trip_keeps_tiles_negatives_weights_and_metadata(world, tmp_path, kind):
    _, adapters, encoder = world
    output = adapters[kind].variant.encoder_output
    refs = tm.reference_images(3)
    tiles = TileOptions(masks=True, enhance=True)
    # Masked tiles with negative images: each reference is the whole image + 2 tiles (48x56 -> 32x37).
    features = encode_references(refs[:2], encoder, output, negative_images=refs[2:], tiles=tiles)
    assert features.units_per_reference == (3, 3) and features.unconditional.shape[0] == 1
    loaded = load_embeds(save_embeds(tmp_path / "x.ipadpt", features))
    assert loaded.output == output and loaded.units_per_reference == (3, 3) and loaded.regions == features.regions
    assert loaded.image_size == tm.IMAGE_SIZE and loaded.encoder == encoder.describe(output)
    assert torch.equal(loaded.conditional, features.conditional)
    assert torch.equal(loaded.unconditional, features.unconditional)  # shared: one row again
    direct = _prepared(world, kind, ImagePrompt(refs[:2], negative_images=refs[2:], tiles=tiles))
    assert _same_kv(_prepared(world, kind, ImagePrompt(embeds=loaded)), direct)
    with pytest.raises(ValueError, match="masked tiles, which act each on its part of the output; use combine='concat'"):
        _prepared(world, kind, ImagePrompt(embeds=loaded, combine="average"))
    # Weighted combination counts references, not tiles.
    weighted = ImagePrompt(embeds=dataclasses.replace(loaded, regions=None), combine="weighted", weights=[1, 0])
    assert _same_kv(_prepared(world, kind, weighted),
                    _prepared(world, kind, ImagePrompt(refs[:2], negative_images=refs[2:], combine="weighted",
                                                       weights=[1, 0], tiles=TileOptions(enhance=True))))


@pytest.mark.parametrize("kind", ["linear", "plus"])
def test_diffusers_prepare_ip_adapter_image_embeds_loads_and_matches(world, tmp_path, kind):
    _, adapters, encoder = world
    theirs = tm.sd15_pipeline()
    theirs.image_encoder = copy.deepcopy(encoder.model)
    theirs.load_ip_adapter(nest({k: v.clone() for k, v in adapters[kind].state_dict().items()}),
                           subfolder="", weight_name="", image_encoder_folder=None)
    refs = tm.reference_images(2)
    # Two images per prompt: diffusers repeats the embeds per image; one set is read back.
    (embeds,) = theirs.prepare_ip_adapter_image_embeds([refs], None, "cpu", 2, True)
    assert embeds.shape[:2] == (4, 2)
    save_file({"embeds": embeds.contiguous()}, tmp_path / "d.safetensors")
    torch.save(embeds, tmp_path / "d.ipadpt")
    torch.save([embeds], tmp_path / "list.ipadpt")  # the whole ip_adapter_image_embeds list of one adapter
    output = adapters[kind].variant.encoder_output
    ours = encode_references(refs, encoder, output)
    for name in ("d.safetensors", "d.ipadpt", "list.ipadpt"):
        loaded = load_embeds(tmp_path / name).for_output(output)
        assert loaded.output == output
        assert torch.equal(loaded.conditional, ours.conditional)
        assert torch.equal(loaded.unconditional, ours.unconditional)
    assert _same_kv(_prepared(world, kind, ImagePrompt(embeds=load_embeds(tmp_path / "d.ipadpt"))),
                    _prepared(world, kind, ImagePrompt(refs)))


@pytest.mark.parametrize("kind", ["linear", "plus"])
def test_comfyui_bare_positive_embeds_get_the_encoders_unconditional(world, tmp_path, kind):
    _, adapters, encoder = world
    output = adapters[kind].variant.encoder_output
    refs = tm.reference_images(2)
    # ComfyUI's IPAdapterEncoder pos_embed, saved by IPAdapterSaveEmbeds: torch.save(tensor).
    torch.save(encode_references(refs, encoder, output).conditional, tmp_path / "IP_embeds_00001.ipadpt")
    loaded = load_embeds(tmp_path / "IP_embeds_00001.ipadpt")
    assert loaded.unconditional is None
    assert _same_kv(_prepared(world, kind, ImagePrompt(embeds=loaded)), _prepared(world, kind, ImagePrompt(refs)))


class Payload:
    """Creates the marker file if unpickled, i.e. if the pickle's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("form", ["our-dict", "bare", "pickle"])
def test_pickles_that_would_run_code_are_refused(tmp_path, form):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ipadpt"
    if form == "our-dict":
        torch.save({"image_embeds": torch.zeros(2, 1, 4), "metadata": Payload(marker)}, path)
    elif form == "bare":
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps({"image_embeds": Payload(marker)}))
    with pytest.raises(ValueError, match="evil.ipadpt holds more than tensors and was refused without running it"):
        load_embeds(path)
    assert not marker.exists()


def test_mismatches_are_refused_naming_expected_found_and_fix(world, tmp_path):
    _, adapters, encoder = world
    refs = tm.reference_images(1)
    base = encode_references(refs, encoder, "image_embeds")
    base.adapter = adapters["linear"].variant.name
    plus_variant = adapters["plus"].variant
    with pytest.raises(EmbedsError, match=r"the embeds hold image_embeds \(the pooled embedding base adapters read\) "
                                          r"\(made for the base .*\), but the plus adapter reads penultimate hidden "
                                          r"states .*; re-encode the references for this adapter: `imprompt encode"):
        check_features(base, plus_variant)
    hidden = encode_references(refs, encoder, "penultimate_hidden")
    with pytest.raises(EmbedsError, match="hold penultimate hidden states .* but the base adapter reads image_embeds"):
        check_features(hidden, adapters["linear"].variant)
    narrow = ImageEncoder(tm.image_encoder(projection=16))
    with pytest.raises(EmbedsError, match=r"have width 16 \(an image encoder with image_embeds width 16\), but the "
                                          r"base \(.*\) adapter reads width 24"):
        check_features(encode_references(refs, narrow, "image_embeds"), adapters["linear"].variant)
    short = ImageFeatures(hidden.conditional[:, :10], hidden.unconditional[:, :10], "penultimate_hidden")
    with pytest.raises(EmbedsError, match="have 10 tokens per image .* the image encoder gives 17"):
        check_features(short, plus_variant, encoder)
    # Through generation: refused before anything runs.
    save_embeds(tmp_path / "base.safetensors", base)
    with pytest.raises(EmbedsError, match="but the plus adapter reads penultimate hidden states"):
        _prepared(world, "plus", ImagePrompt(embeds=load_embeds(tmp_path / "base.safetensors")))
    with pytest.raises(ValueError, match="give either images or embeds"):
        ImagePrompt(refs, embeds=base).check(1)


def test_malformed_files_give_one_clear_line(tmp_path):
    torch.save({"a": torch.zeros(2, 1, 4), "b": torch.zeros(2, 1, 4)}, tmp_path / "two.ipadpt")
    with pytest.raises(EmbedsError, match="should hold one tensor of image embeds"):
        load_embeds(tmp_path / "two.ipadpt")
    torch.save(torch.zeros(3, 1, 4, 5), tmp_path / "odd.ipadpt")
    with pytest.raises(EmbedsError, match=r"torch.cat\(\[negative, positive\]\) \(an even first dimension\)"):
        load_embeds(tmp_path / "odd.ipadpt")
    swapped = torch.stack([torch.randn(1, 4), torch.zeros(1, 4)])  # old ComfyUI: stack((positive, zeros))
    torch.save(swapped, tmp_path / "swapped.ipadpt")
    with pytest.raises(EmbedsError, match="halves look swapped .*tensor.flip\\(0\\)"):
        load_embeds(tmp_path / "swapped.ipadpt").for_output("image_embeds")
    assert torch.equal(from_diffusers(swapped.flip(0)).conditional, swapped[0])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EmbedsError, match="not a safetensors file"):
        load_embeds(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors or \.ipadpt"):
        save_embeds(tmp_path / "x.bin", ImageFeatures(torch.zeros(1, 4), torch.zeros(1, 4), "image_embeds"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    # The official layout: models/ip-adapter_*.safetensors beside models/image_encoder/.
    return tm.official_tree(tmp_path_factory.mktemp("world"))


@pytest.mark.slow
def test_cli_encode_then_generate_with_embeds_equals_generate_with_images(files, tmp_path, capsys):
    from PIL import Image

    base = str(files / "models" / "ip-base.safetensors")
    embeds = tmp_path / "refs.ipadpt"
    assert main(["encode", str(files / "ref0.png"), str(files / "ref1.png"), "--adapter", base, "-o", str(embeds)]) == 0
    assert "2 reference(s)" in capsys.readouterr().out
    common = ["generate", "--model", str(files / "sd"), "--adapter", base, "--prompt", "a star", "--steps", "2",
              "--seed", "3"]
    assert main([*common, "--image", str(files / "ref0.png"), "--image", str(files / "ref1.png"),
                 "--output", str(tmp_path / "a")]) == 0
    assert main([*common, "--embeds", str(embeds), "--output", str(tmp_path / "b")]) == 0
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in "ab")
    assert np.array_equal(a, b)
    # Embeds made for the base adapter, given to the plus one: one line naming the mismatch and the fix.
    capsys.readouterr()
    assert main(["generate", "--model", str(files / "sd"), "--adapter", str(files / "models" / "ip-plus.bin"),
                 "--embeds", str(embeds), "--steps", "2", "--output", str(tmp_path / "c")]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "but the plus adapter reads penultimate hidden states" in err and "imprompt encode" in err


def test_cli_flags_are_checked_before_anything_loads(files, tmp_path, capsys):
    base = str(files / "models" / "ip-base.safetensors")
    assert main(["encode", str(files / "ref0.png"), "--adapter", base, "-o", str(tmp_path / "x.bin")]) != 0
    assert ".safetensors or .ipadpt" in capsys.readouterr().err
    assert main(["encode", str(files / "ref0.png"), "--image-encoder", str(files / "models" / "image_encoder"),
                 "-o", str(tmp_path / "x.ipadpt")]) != 0
    assert "--encoder-output image_embeds" in capsys.readouterr().err
    common = ["generate", "--model", str(files / "sd"), "--adapter", base, "--output", str(tmp_path / "o")]
    assert main([*common, "--embeds", str(tmp_path / "x.ipadpt"), "--image", str(files / "ref0.png")]) != 0
    assert "give one or the other" in capsys.readouterr().err
    assert main([*common, "--image", str(files / "ref0.png"), "--tiles", "sideways"]) != 0
    assert "unknown tiling word 'sideways'" in capsys.readouterr().err
    assert main([*common, "--image", str(files / "ref0.png"), "--tile-overlap", "0.5"]) != 0
    assert "need --tiles" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".safetensors", ".ipadpt"])
def test_bytes_round_trip_as_the_file_does_and_bad_bytes_are_refused(world, tmp_path, suffix):
    _, _, encoder = world
    features = encode_references(tm.reference_images(2), encoder, "penultimate_hidden")
    path = save_embeds(tmp_path / f"refs{suffix}", features)
    # What a server receives: the file's bytes, whichever of the two formats.
    got = embeds_from_bytes(path.read_bytes(), "upload")
    assert torch.equal(got.conditional, features.conditional) and torch.equal(got.unconditional, features.unconditional)
    assert got.output == "penultimate_hidden"
    again = embeds_from_bytes(embeds_file_bytes(got))  # and what it sends back
    assert torch.equal(again.conditional, features.conditional)
    with pytest.raises(EmbedsError, match=r"image_prompts\[0\]\.embeds: neither a \.safetensors file nor a torch"):
        embeds_from_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64), "image_prompts[0].embeds")
    evil = tmp_path / "evil.ipadpt"
    torch.save({"image_embeds": torch.zeros(2, 1, 4), "metadata": Payload(tmp_path / "ran")}, evil)
    with pytest.raises(EmbedsError, match="embeds file upload holds more than tensors and was refused without running"):
        embeds_from_bytes(evil.read_bytes(), "upload")
    assert not (tmp_path / "ran").exists()
