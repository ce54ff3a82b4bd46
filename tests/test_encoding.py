"""The image encoder's feature paths against transformers' own outputs."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from imprompt.encoding import ImageEncoder, penultimate_hidden_states

torch.set_flush_denormal(True)


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_penultimate_hidden_states_equal_transformers_bit_for_bit(layers):
    torch.manual_seed(layers)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True).hidden_states[-2]
        ours = penultimate_hidden_states(model, pixels)
        through_encoder = ImageEncoder(model).features(pixels, "hidden_states")
    assert ours.shape == (3, 17, 32)
    assert torch.equal(ours, expected)
    assert torch.equal(through_encoder, expected)
    # It is not the last layer's output (that one is skipped), unless the layers do nothing.
    assert not torch.equal(ours, model(pixels).last_hidden_state)


def test_unconditional_hidden_states_are_the_zero_images_encoded_once():
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16)).eval()
    encoder = ImageEncoder(model)
    pixels = torch.randn(3, 3, 32, 32)
    calls = []
    encoder.model.vision_model.embeddings.register_forward_hook(lambda *_: calls.append(1))  # one per encoder pass
    first = encoder.unconditional(pixels, "hidden_states")
    again = encoder.unconditional(pixels * 2, "hidden_states")  # same batch shape: reused
    other = encoder.unconditional(pixels[:2], "hidden_states")  # another batch size: encoded
    with torch.no_grad():
        expected = model(torch.zeros(3, 3, 32, 32), output_hidden_states=True).hidden_states[-2]
    assert first.shape == again.shape == (3, 17, 32) and other.shape == (2, 17, 32)
    assert torch.equal(first, expected) and torch.equal(again, expected)  # bit for bit: the whole batch encoded
    assert len(calls) == 3  # first, other, expected: `again` reused the first
    first.add_(1.0)  # a caller that changes its copy does not change the next one
    assert torch.equal(encoder.unconditional(pixels, "hidden_states"), expected)
    # A bounded cache: batch sizes 1-9 keep at most 8 entries, each still the right features (to float
    # rounding: the CPU kernels round differently at different batch sizes).
    for n in range(1, 10):
        zeros = encoder.unconditional(pixels[:1].expand(n, -1, -1, -1), "hidden_states")
        assert zeros.shape[0] == n and torch.allclose(zeros, expected[:1].expand(n, -1, -1), atol=1e-5)
    assert len(encoder._zero_features) == 8
    # Image embeds have no encoder pass at all: the zero vector.
    assert torch.equal(encoder.unconditional(pixels, "image_embeds"), torch.zeros(3, 16))
