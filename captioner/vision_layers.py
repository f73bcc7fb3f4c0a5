"""A CLIP vision tower's hidden states, running only the layers that are read.

LLaVA-1.5 reads layer -2 and MM-SeR's connector reads layers up to it, so the tower's last
layer (1/24 of ViT-L/14-336's work) computes an output nobody reads; transformers' CLIP
forward always runs every layer. vLLM truncates the tower for the same reason. This runs
the same modules (embeddings, pre-LayerNorm, encoder layers) in the same order and stops
after the deepest layer asked for, so the states it returns are the ones the full forward
returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from captioner.errors import CaptionerError


def layer_index(index: int, num_layers: int, name: str = "hidden-state index") -> int:
    """A `hidden_states` index (0 = the embeddings after pre-LayerNorm, i = output of layer
    i, negative from the end) as a non-negative one; `name` says what it is in the error."""
    if not -(num_layers + 1) <= index <= num_layers:
        raise CaptionerError(
            f"{name} {index} out of range for a vision tower with {num_layers} "
            f"layers (allowed {-(num_layers + 1)}..{num_layers})"
        )
    return index % (num_layers + 1)


def vision_hidden_states(
    vision: nn.Module, pixel_values: torch.Tensor, indices: Sequence[int]
) -> dict[int, torch.Tensor]:
    """pixel_values (B, 3, H, W) -> {index: (B, 1 + N, D)} for each `hidden_states` index
    asked for (as given, negative ones included); the layers after the deepest are skipped.
    `vision`: transformers' CLIPVisionModel (embeddings, pre_layrnorm, encoder.layers)."""
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if layers is None or not hasattr(vision, "embeddings") or not hasattr(vision, "pre_layrnorm"):
        raise CaptionerError(
            f"vision tower {type(vision).__name__} lacks CLIP's embeddings / pre_layrnorm / "
            "encoder.layers; MM-SeR's vision tower is a CLIPVisionModel"
        )
    depths = {i: layer_index(i, len(layers)) for i in indices}
    keep = set(depths.values())
    state = vision.pre_layrnorm(vision.embeddings(pixel_values))
    kept = {0: state} if 0 in keep else {}
    for depth, layer in enumerate(layers[: max(keep, default=0)], start=1):
        state = layer(state, None)  # no attention mask: every patch sees every patch
        if depth in keep:  # only the states asked for stay alive
            kept[depth] = state
    return {i: kept[depth] for i, depth in depths.items()}
