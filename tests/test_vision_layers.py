"""Running a CLIP vision tower only up to the layers read (captioner/vision_layers.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from captioner.errors import CaptionerError
from captioner.vision_layers import vision_hidden_states

LAYERS = 4


@pytest.fixture(scope="module")
def tower() -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                              num_attention_heads=4, image_size=28, patch_size=14)
    return CLIPVisionModel(config).eval()


def test_states_equal_the_full_forward(tower):
    pixels = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        full = tower(pixels, output_hidden_states=True).hidden_states
        asked = [-2, 0, 1, 3, -1, LAYERS]
        got = vision_hidden_states(tower, pixels, asked)
    assert list(got) == asked
    for index in asked:
        assert torch.equal(got[index], full[index]), index


def test_layers_after_the_deepest_read_do_not_run(tower):
    calls = [0] * LAYERS
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(tower.encoder.layers)]
    try:
        with torch.inference_mode():
            vision_hidden_states(tower, torch.randn(1, 3, 28, 28), [-2, 1])  # -2 = layer 3
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [1, 1, 1, 0]


def test_gradients_reach_the_layers_run(tower):
    pixels = torch.randn(1, 3, 28, 28)
    vision_hidden_states(tower, pixels, [2])[2].sum().backward()
    grads = [layer.mlp.fc1.weight.grad for layer in tower.encoder.layers]
    assert grads[0] is not None and grads[1] is not None and grads[0].abs().sum() > 0
    assert grads[2] is None and grads[3] is None
    tower.zero_grad(set_to_none=True)


def test_bad_indices_and_towers_are_refused(tower):
    with pytest.raises(CaptionerError, match="out of range"):
        vision_hidden_states(tower, torch.randn(1, 3, 28, 28), [LAYERS + 1])
    with pytest.raises(CaptionerError, match="CLIPVisionModel"):
        vision_hidden_states(torch.nn.Linear(2, 2), torch.randn(1, 2), [0])


def test_config_refuses_a_vision_feature_layer_the_tower_lacks():
    from captioner.configuration_mmser import MMSeRConfig, real_config

    real = real_config(image_token_index=5)  # CLIP ViT-L/14-336: 24 layers
    parts = {"vision_config": real.vision_config.to_dict(),
             "text_config": real.text_config.to_dict(), "image_token_index": 5}
    # The ends of the range are accepted: -25 is the embeddings, 24 the last layer.
    assert MMSeRConfig(**parts, vision_feature_layer=24).connector_layers == [6, 12, 18, 24]
    assert MMSeRConfig(**parts, vision_feature_layer=-25).connector_layers == [1]
    with pytest.raises(CaptionerError, match="vision_feature_layer -26 out of range"):
        MMSeRConfig(**parts, vision_feature_layer=-26)
    with pytest.raises(CaptionerError, match="vision_feature_layer 25 out of range"):
        MMSeRConfig(**parts, vision_feature_layer=25)
