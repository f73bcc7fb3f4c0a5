"""Draft-verified refinement (captioner/draft_decoding.py) on a tiny random checkpoint.

A random model's refined caption does not repeat its coarse one, so these tests also feed
drafts with a known agreement (the plain-greedy refined caption itself, or a perturbed
copy) in place of the coarse caption: the output must be plain greedy's whatever the draft,
and an agreeing draft must be kept and save LM calls.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from captioner.draft_decoding import _realign, draft_lengths
from captioner.mmser import build
from captioner.settings import CaptionerSettings

NEW_TOKENS = 12


def settings(min_new_tokens: int = 0, **mmser) -> CaptionerSettings:
    s = CaptionerSettings(device="cpu", dtype="float32")
    s.generation.max_new_tokens = NEW_TOKENS
    s.generation.min_new_tokens = min_new_tokens
    s.mmser = dataclasses.replace(s.mmser, **mmser)
    return s


def results(batch) -> list[tuple[str, str | None, int]]:
    return [(r.caption, r.coarse_caption, r.refine_passes) for r in batch.results]


@pytest.mark.parametrize("min_new_tokens", [0, NEW_TOKENS])
def test_drafted_refinement_equals_plain_greedy(tiny_dir, frames, min_new_tokens):
    plain = build(settings(min_new_tokens, draft_tokens=0), "mmser", checkpoint=tiny_dir)
    drafted = build(settings(min_new_tokens, draft_tokens=4), "mmser", checkpoint=tiny_dir)
    got_plain, got_drafted = plain.caption_batch(frames), drafted.caption_batch(frames)
    assert results(got_drafted) == results(got_plain)
    assert got_plain.counters == {}
    assert got_drafted.counters["draft_calls"] >= 1
    assert 0 <= got_drafted.counters["draft_accepted"] <= got_drafted.counters["draft_proposed"]
    if min_new_tokens:
        lengths = {len(plain.tokenizer(r.caption)["input_ids"]) for r in got_drafted.results}
        assert max(lengths) >= NEW_TOKENS - 2  # no early stop (allowing re-tokenisation)


def test_iterative_refinement_drafts_its_last_pass_only(tiny_dir, frames):
    """refine_steps 2: the first refinement records saliency for the next one (generate),
    the last verifies its draft; captions and pass counts match plain greedy."""
    plain = build(settings(refine_steps=2, draft_tokens=0), "mmser", checkpoint=tiny_dir)
    drafted = build(settings(refine_steps=2, draft_tokens=4), "mmser", checkpoint=tiny_dir)
    got_plain, got_drafted = plain.caption_batch(frames), drafted.caption_batch(frames)
    assert results(got_drafted) == results(got_plain)
    assert max(r.refine_passes for r in got_plain.results) == 2
    assert got_drafted.counters["draft_calls"] >= 1


def refine_with_draft(
    captioner, frames, draft_of, max_draft: int, slack: int = NEW_TOKENS, refine_room=None
):
    """One coarse pass, then one refinement pass whose draft is draft_of(state).
    `refine_room` (default: enough) shrinks the cache the coarse pass allocates."""
    model = captioner.model
    pixels = captioner.processor(images=frames, return_tensors="pt")["pixel_values"]
    features = model.encode_images(pixels)
    ids = captioner.prompt_ids[None].expand(len(frames), -1)
    room = model.cache_room(NEW_TOKENS, 1, len(captioner.instruction_ids), slack)
    if refine_room is not None:
        room -= NEW_TOKENS - refine_room
    state = model.caption_pass(
        ids, torch.ones_like(ids), features, captioner.generation, keep_state=True,
        cache_room=room,
    )
    state.tokens = draft_of(state)  # the draft only; the LM still saw the coarse caption
    return model.refine_pass(
        state, features, captioner.instruction_ids, captioner.generation, keep_state=False,
        cache_room=NEW_TOKENS, max_draft=max_draft,
    )


@pytest.fixture(scope="module")
def captioner(tiny_dir):
    return build(settings(), "mmser", checkpoint=tiny_dir)


@pytest.fixture(scope="module")
def reference(captioner, frames):
    """The plain greedy refined tokens (b, L), EOS then padding where a row ended early."""
    return refine_with_draft(captioner, frames, lambda s: s.tokens, max_draft=0).tokens


def test_agreeing_draft_is_kept_and_saves_calls(captioner, frames, reference):
    refined = refine_with_draft(captioner, frames, lambda s: reference.clone(), max_draft=4)
    torch.testing.assert_close(refined.tokens, reference, rtol=0, atol=0)
    stats = refined.draft_stats
    assert stats["accepted"] == stats["proposed"] > 0
    # Plain greedy needs one LM call per token after the first; here 5 tokens per call.
    longest = int(draft_lengths(reference, captioner.generation.eos_token_id).max())
    assert stats["calls"] < longest - 1
    assert stats["calls"] <= -(-(longest - 1) // 5) + 1


def test_perturbed_draft_still_gives_greedy_output(captioner, frames, reference):
    vocab = captioner.model.config.text_config.vocab_size

    def perturbed(state):
        draft = reference.clone()
        draft[:, 2::4] = (draft[:, 2::4] + 7) % vocab  # every 4th token wrong, from the 3rd
        return draft

    refined = refine_with_draft(captioner, frames, perturbed, max_draft=4)
    torch.testing.assert_close(refined.tokens, reference, rtol=0, atol=0)
    stats = refined.draft_stats
    assert 0 < stats["accepted"] < stats["proposed"]


def test_full_static_cache_shrinks_drafts_not_output(captioner, frames, reference):
    """No slack for rejected tokens: drafts shrink to fit, the captions stay greedy's."""
    def useless(state):
        return (reference + 1) % captioner.model.config.text_config.vocab_size

    refined = refine_with_draft(captioner, frames, useless, max_draft=4, slack=0)
    torch.testing.assert_close(refined.tokens, reference, rtol=0, atol=0)
    assert refined.draft_stats["accepted"] == 0


def test_realign_after_substitution_and_deletion():
    # One row per case, batched as draft_greedy calls it; the last row's draft is shorter.
    draft = torch.tensor([[10, 11, 12, 13, 14]] * 4)
    draft_len = torch.tensor([5, 5, 5, 3])
    expected = torch.tensor([1, 1, 5, 1])
    token = torch.tensor([99, 13, 99, 13])
    # 11 replaced by 99: go on from 12; 11 and 12 dropped: go on after 13; past the end:
    # no more draft; 13 lies beyond a 3-token draft: a substitution.
    assert _realign(draft, draft_len, expected, token).tolist() == [2, 4, 6, 2]


def test_draft_lengths_stop_after_eos():
    tokens = torch.tensor([[5, 6, 2, 1, 1], [5, 6, 7, 8, 9]])
    assert draft_lengths(tokens, eos_token_id=2).tolist() == [3, 5]


def test_negative_draft_tokens_is_an_error(tiny_dir):
    from pipeline.errors import CaptionerError

    with pytest.raises(CaptionerError, match="draft_tokens"):
        build(settings(draft_tokens=-1), "mmser", checkpoint=tiny_dir)


def test_null_draft_tokens_means_no_drafts_on_cpu(tiny_dir, frames):
    """On CPU a (k+1)-token call costs several single steps, so drafts are off by default."""
    auto = build(settings(), "mmser", checkpoint=tiny_dir)
    assert auto.settings.mmser.draft_tokens is None and auto.max_draft == 0
    assert auto.caption_batch(frames[:2]).counters == {}
    assert build(settings(draft_tokens=3), "mmser", checkpoint=tiny_dir).max_draft == 3


@pytest.mark.parametrize("option", [{"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.5}])
def test_checkpoint_decoding_options_fall_back_to_generate(tiny_dir, frames, option):
    """generate() fills unset options from the checkpoint's generation_config.json; drafts
    implement only plain greedy, so such options send the pass back to generate()."""
    plain = build(settings(draft_tokens=0), "mmser", checkpoint=tiny_dir)
    drafted = build(settings(draft_tokens=4), "mmser", checkpoint=tiny_dir)
    for captioner in (plain, drafted):
        for key, value in option.items():
            setattr(captioner.model.generation_config, key, value)
    got_plain, got_drafted = plain.caption_batch(frames), drafted.caption_batch(frames)
    assert results(got_drafted) == results(got_plain)
    assert got_drafted.counters == {}  # no draft was verified


def test_too_small_cache_is_a_clear_error(captioner, frames, reference):
    from pipeline.errors import CaptionerError

    with pytest.raises(CaptionerError, match="KV cache too small"):
        refine_with_draft(captioner, frames, lambda s: reference.clone(), max_draft=4, slack=0,
                          refine_room=NEW_TOKENS - 5)


def test_generate_is_never_auto_compiled(captioner, frames, monkeypatch):
    """generate() compiles (CUDA graphs) by itself for a static cache on CUDA; the passes
    turn that off, as the hooks keep step outputs that CUDA graphs would overwrite."""
    seen = []
    real = captioner.model.generate

    def spy(*args, generation_config, **kwargs):
        seen.append(generation_config.disable_compile)
        return real(*args, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(captioner.model, "generate", spy)
    captioner.caption_batch(frames[:2])
    assert seen and all(seen)
