"""Decode-step linears on prepacked oneDNN weights (captioner/packed_linear.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioner.base import captioner_identity
from captioner.mmser import DECODER_LINEARS, build
from captioner.packed_linear import (
    MAX_PACKED_ROWS,
    PackedDecodeLinear,
    pack_decode_linears,
    packing_applies,
    packing_available,
)
from captioner.settings import CaptionerSettings

pytestmark = pytest.mark.skipif(
    not packing_available(), reason="this torch build has no oneDNN packed-linear operators"
)


def packed_copy(seed: int = 0) -> tuple[nn.Linear, PackedDecodeLinear]:
    torch.manual_seed(seed)
    plain = nn.Linear(64, 96)
    return plain, PackedDecodeLinear.from_linear(plain)


def test_few_rows_take_the_packed_path_and_agree_with_f_linear():
    plain, packed = packed_copy()
    x = torch.randn(4, 1, 64)  # a decode step: 4 rows
    with torch.inference_mode():
        out = packed(x)
        assert packed._packed is not None and packed._packed.is_mkldnn
        torch.testing.assert_close(out, F.linear(x, plain.weight, plain.bias),
                                   rtol=1e-5, atol=1e-5)
        wide = torch.randn(MAX_PACKED_ROWS + 1, 64)  # a prefill: plain F.linear, bit for bit
        assert torch.equal(packed(wide), F.linear(wide, plain.weight, plain.bias))


def test_gradients_take_f_linear():
    plain, packed = packed_copy()
    x = torch.randn(4, 64)
    out = packed(x)
    assert torch.equal(out, F.linear(x, plain.weight, plain.bias))
    out.sum().backward()
    assert plain.weight.grad is not None  # the same Parameter: the plain module sees it too
    assert packed._packed is None


def test_packed_weight_follows_in_place_updates():
    """An optimizer step changes the weight in place; the packed copy must not lag it."""
    plain, packed = packed_copy()
    x = torch.randn(4, 64)
    with torch.inference_mode():
        before = packed(x)
    with torch.no_grad():
        plain.weight.mul_(2.0)
    with torch.inference_mode():
        after = packed(x)
    torch.testing.assert_close(after, F.linear(x, plain.weight, plain.bias),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


def test_deep_copy_packs_its_own():
    plain, packed = packed_copy()
    x = torch.randn(4, 64)
    with torch.inference_mode():
        expected = packed(x)
    clone = copy.deepcopy(packed)
    assert clone._packed is None and clone.weight is not packed.weight
    with torch.inference_mode():
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


def test_setting_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packing_applies(None, cpu, torch.float32)
    assert not packing_applies(None, cpu, torch.bfloat16)
    assert not packing_applies(None, cuda, torch.float32)
    assert not packing_applies(False, cpu, torch.float32)
    assert packing_applies(True, cuda, torch.bfloat16)  # asked; the forward only packs CPU fp32


def test_packing_is_not_part_of_the_captioner_identity():
    """Speed only: captions cached with packed linears serve a run without, and back."""
    assert captioner_identity(settings(True), "mmser") == captioner_identity(
        settings(False), "mmser"
    )


def settings(packed: bool) -> CaptionerSettings:
    s = CaptionerSettings(device="cpu", dtype="float32", packed_linears=packed)
    s.generation.max_new_tokens = 10
    return s


def test_mmser_captioner_packs_its_decoder_and_writes_the_same_captions(tiny_dir, frames):
    plain = build(settings(False), "mmser", checkpoint=tiny_dir)
    keys = set(plain.model.state_dict())
    linears = [m for m in plain.model.model.language_model.modules() if type(m) is nn.Linear]
    assert not any(isinstance(m, PackedDecodeLinear) for m in plain.model.modules())

    packed = build(settings(True), "mmser", checkpoint=tiny_dir)
    model = packed.model
    swapped = [m for m in model.modules() if isinstance(m, PackedDecodeLinear)]
    assert len(swapped) == len(linears) + 1  # every decoder linear and the LM head
    assert not any(isinstance(m, PackedDecodeLinear) for m in model.model.vision_tower.modules())
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    assert set(model.state_dict()) == keys
    assert pack_decode_linears(model, DECODER_LINEARS) == 0  # already packed: idempotent

    got, expected = packed.caption_batch(frames), plain.caption_batch(frames)
    assert [(r.caption, r.coarse_caption) for r in got.results] == [
        (r.caption, r.coarse_caption) for r in expected.results
    ]
    assert any(m._packed is not None for m in swapped)  # the decode steps did use them
