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
