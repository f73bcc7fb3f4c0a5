"""The FLOP counter behind bench-captioner's machine-independent refinement ratio."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.flops import caption_flops
from captioner.mmser import MMSeRCaptioner, build
from captioner.settings import CaptionerSettings

NEW_TOKENS = 4


def fixed_length(name: str, checkpoint) -> MMSeRCaptioner:
    s = CaptionerSettings(device="cpu", dtype="float32")
    s.generation.max_new_tokens = s.generation.min_new_tokens = NEW_TOKENS
    s.mmser = dataclasses.replace(s.mmser, refine_steps=1, draft_tokens=0)
    return build(s, name, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def simple(tiny_dir) -> MMSeRCaptioner:
    return fixed_length("simple", tiny_dir)


@pytest.fixture(scope="module")
def counts(tiny_dir, simple) -> dict[str, dict[str, float]]:
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    captioners = {"simple": simple, "mmser": fixed_length("mmser", tiny_dir)}
    return {name: caption_flops(c, frames) for name, c in captioners.items()}


def test_lm_head_counted_once_per_written_token(simple, counts) -> None:
    text = simple.model.config.text_config
    per_pass = 2 * 2 * NEW_TOKENS * text.hidden_size * text.vocab_size  # 2 frames, 2 FLOPs/MAC
    assert counts["simple"]["lm_head"] == per_pass
    assert counts["mmser"]["lm_head"] == 2 * per_pass  # the refinement writes as many tokens


def test_refinement_costs_connector_and_a_second_pass(counts) -> None:
    simple, mmser = counts["simple"], counts["mmser"]
    assert simple["connector"] == 0 < mmser["connector"]
    extra = mmser["total"] - simple["total"]
    assert extra > mmser["connector"] + simple["lm_head"]
    assert mmser["per_frame"] == mmser["total"] / 2


def test_cpu_attention_kernel_is_counted(counts) -> None:
    # torch has no formula for the CPU flash kernel; caption_flops registers one.
    assert counts["simple"]["attention"] > 0
    assert counts["mmser"]["attention"] > counts["simple"]["attention"]
