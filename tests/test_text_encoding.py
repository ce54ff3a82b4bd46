"""Prompts encoded as A1111 encodes them: parity with diffusers for plain prompts, and each rule against
embeddings computed by hand from single-chunk encodings."""

import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from imprompt.generation.text_encoding import EmbeddingLibrary, PromptEncoder, TextSchedule

PROMPT = "a red cat, on a mat"


@pytest.fixture(scope="module")
def sd():
    return tm.sd15_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tm.sdxl_pipeline()


def diffusers_embeds(pipe, prompt, negative):
    out = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                             negative_prompt=negative or None)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, out))


@pytest.mark.parametrize("which", ["sd", "sdxl"])
@pytest.mark.parametrize("negative", ["", "blurry, lowres"])
def test_plain_prompts_equal_diffusers(request, which, negative):
    pipe = request.getfixturevalue(which)
    ours = TextSchedule.build(pipe, PROMPT, negative, steps=10).call_arguments()
    theirs = diffusers_embeds(pipe, PROMPT, negative)
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def plain(pipe, text):
    """The pipeline's own encoding of a text that fits one chunk."""
    return diffusers_embeds(pipe, text, "x")["prompt_embeds"]


def token_weights(pipe, text_runs):
    """Per-position weights of a chunk: start token, each run's tokens with its weight, end and padding 1."""
    weights = [1.0]
    for text, w in text_runs:
        weights += [w] * len(pipe.tokenizer.tokenize(text))
    return torch.tensor(weights + [1.0] * (77 - len(weights)))


@pytest.fixture(scope="module")
def biased():
    """A pipeline whose text states have a clear mean, as real CLIP's do (its final layer norm has a bias)."""
    pipe = tm.sd15_pipeline()
    with torch.no_grad():
        pipe.text_encoder.final_layer_norm.bias.fill_(0.3)
    return pipe


def test_emphasis_scales_tokens_and_restores_the_mean(biased):
    got = PromptEncoder(biased).encode("a (red:1.5) [cat]").hidden
    base = plain(biased, "a red cat")  # the same tokens, unweighted
    weights = token_weights(biased, [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1 / 1.1)])
    by_hand = base * weights[None, :, None]
    by_hand = by_hand * (base.mean() / by_hand.mean())
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert torch.allclose(got.mean(), base.mean(), atol=1e-6)
    assert not torch.allclose(got, base, atol=1e-3)


def test_emphasis_without_a_mean_to_restore_only_weights(sd):
    base = plain(sd, "a red cat")
    assert base.mean().abs() < 0.01 * base.std()  # the random tiny encoder: layer norm bias 0
    got = PromptEncoder(sd).encode("a (red:1.5) [cat]").hidden
    weights = token_weights(sd, [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1 / 1.1)])
    assert torch.allclose(got, base * weights[None, :, None], atol=1e-6)


def test_break_and_long_prompts_make_chunks(sd, sdxl):
    for pipe in (sd, sdxl):
        encoder = PromptEncoder(pipe)
        got = encoder.encode("a red cat BREAK on a mat").hidden
        assert torch.equal(got, torch.cat([plain(pipe, "a red cat"), plain(pipe, "on a mat")], dim=1))
    # 80 one-character tokens: 75 in the first chunk, 5 in the second (no comma to move back to).
    long = " ".join("x" * 80)  # the character tokenizer: "x</w>" per word
    got = PromptEncoder(sd).encode(long).hidden
    assert got.shape == (1, 154, 32)
    assert torch.equal(got, torch.cat([plain(sd, " ".join("x" * 75)), plain(sd, " ".join("x" * 5))], dim=1))


def test_negative_prompt_is_padded_with_empty_chunks(sd):
    args = TextSchedule.build(sd, "a BREAK b BREAK c", "", steps=4).call_arguments()
    assert args["prompt_embeds"].shape[1] == args["negative_prompt_embeds"].shape[1] == 231
    empty = plain(sd, "")
    assert torch.equal(args["negative_prompt_embeds"], torch.cat([empty] * 3, dim=1))


def test_sdxl_empty_negative_is_zeros_and_pooled_from_the_first_chunk(sdxl):
    args = TextSchedule.build(sdxl, "a red cat BREAK on a mat", "", steps=4).call_arguments()
    assert not args["negative_prompt_embeds"].any() and not args["negative_pooled_prompt_embeds"].any()
    assert torch.equal(args["pooled_prompt_embeds"], diffusers_embeds(sdxl, "a red cat", "x")["pooled_prompt_embeds"])


def test_textual_inversion_vectors_stand_for_their_name(sd, tmp_path):
    # An embedding whose vectors are the token embeddings of "cat": "a zq" must encode as "a cat".
    ids = sd.tokenizer.convert_tokens_to_ids(sd.tokenizer.tokenize("cat"))
    vectors = sd.text_encoder.get_input_embeddings().weight[ids].detach().clone()
    save_file({"emb_params": vectors}, str(tmp_path / "zq.safetensors"))
    library = EmbeddingLibrary({"zq": tmp_path / "zq.safetensors"})
    encoder = PromptEncoder(sd, library)
    assert torch.equal(encoder.encode("a zq").hidden, plain(sd, "a cat"))
    assert encoder.used_embeddings == {"zq"}
    assert not torch.equal(PromptEncoder(sd).encode("a zq").hidden, plain(sd, "a cat"))  # without: just letters
    # the encoder's own embedding table is untouched (the vectors went in through a one-call hook)
    assert not sd.text_encoder.get_input_embeddings()._forward_hooks


def test_sdxl_embedding_gives_each_encoder_its_own_vectors(sdxl, tmp_path):
    ids = sdxl.tokenizer.convert_tokens_to_ids(sdxl.tokenizer.tokenize("cat"))
    save_file({"clip_l": sdxl.text_encoder.get_input_embeddings().weight[ids].detach().clone(),
               "clip_g": sdxl.text_encoder_2.get_input_embeddings().weight[ids].detach().clone()},
              str(tmp_path / "zq.safetensors"))
    encoder = PromptEncoder(sdxl, EmbeddingLibrary({"zq": tmp_path / "zq.safetensors"}))
    assert torch.equal(encoder.encode("a zq").hidden, plain(sdxl, "a cat"))


def test_embedding_of_the_wrong_width_is_refused(sd, tmp_path):
    save_file({"emb_params": torch.zeros(2, 768)}, str(tmp_path / "zq.safetensors"))
    with pytest.raises(ValueError, match="768 wide.*32 wide"):
        PromptEncoder(sd, EmbeddingLibrary({"zq": tmp_path / "zq.safetensors"})).encode("a zq")


def test_schedule_switches_the_embeddings_in_the_loop(sd):
    schedule = TextSchedule.build(sd, "a [red:blue:0.5] cat", "", steps=4)
    assert schedule.changes
    red, blue, empty = plain(sd, "a red cat"), plain(sd, "a blue cat"), plain(sd, "")
    for step, colour in [(0, red), (2, red), (3, blue)]:
        loop = schedule.in_loop(step, images=2, guided=True)["prompt_embeds"]
        assert torch.equal(loop, torch.cat([empty, empty, colour, colour]))
    assert not TextSchedule.build(sd, "a (red) cat", "", steps=4).changes
