"""The simple and MM-SeR captioners on tiny random-weights checkpoints built here.

Random weights: captions are gibberish, so tests compare captions between code paths
(batched vs single, saved vs loaded, ...) and check structure, never quality.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from captioner.base import build_captioner, captioner_identity, parameter_counts
from captioner.mmser import build
from captioner.random_weights import build_tiny_checkpoint
from captioner.settings import CaptionerSettings
from pipeline.errors import CaptionerError

NEW_TOKENS = 10


@pytest.fixture(scope="session")
def tiny_simple_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-simple"), refine=False, seed=1)


def settings(**mmser) -> CaptionerSettings:
    s = CaptionerSettings(device="cpu", dtype="float32")
    s.generation.max_new_tokens = NEW_TOKENS
    s.mmser = dataclasses.replace(s.mmser, **mmser)
    return s


@pytest.fixture(scope="session")
def mmser(tiny_dir):
    return build(settings(), "mmser", checkpoint=tiny_dir)


def captions(batch) -> list[tuple[str, str | None, int]]:
    return [(r.caption, r.coarse_caption, r.refine_passes) for r in batch.results]


def test_results_and_timings(mmser, frames):
    batch = mmser.caption_batch(frames)
    assert len(batch.results) == len(frames)
    assert all(r.refine_passes == 1 and r.coarse_caption is not None for r in batch.results)
    assert set(batch.timings) == {"preprocess", "vision", "coarse", "refine"}
    assert all(t >= 0 for t in batch.timings.values())


def test_round_trip_gives_identical_captions(mmser, frames, tmp_path):
    mmser.model.save_pretrained(tmp_path)
    mmser.processor.save_pretrained(tmp_path)
    mmser.tokenizer.save_pretrained(tmp_path)
    reloaded = build(settings(), "mmser", checkpoint=tmp_path)
    assert captions(reloaded.caption_batch(frames)) == captions(mmser.caption_batch(frames))


def test_auto_class_loads_checkpoint(tiny_dir):
    from transformers import AutoModelForImageTextToText

    from captioner.modeling_mmser import MMSeRForConditionalGeneration, register_auto_classes

    register_auto_classes()  # explicit: importing the module registers nothing
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert isinstance(model, MMSeRForConditionalGeneration)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in OPT


def test_batched_equals_one_by_one(mmser, frames):
    batch = mmser.caption_batch(frames)
    single = [mmser.caption_batch([f]).results[0] for f in frames]
    assert captions(batch) == [(r.caption, r.coarse_caption, r.refine_passes) for r in single]


def test_batch_exercises_padding(mmser, frames):
    """The refine pass continues rows whose coarse captions end at different lengths
    (holes in the attention mask); the tiny checkpoint must produce such a batch."""
    pixels = mmser.processor(images=frames, return_tensors="pt")["pixel_values"]
    features = mmser.model.encode_images(pixels)
    ids = mmser.prompt_ids[None].expand(len(frames), -1)
    state = mmser.model.caption_pass(
        ids, torch.ones_like(ids), features, mmser.generation, keep_state=True
    )
    refined = mmser.model.refine_pass(
        state, features, mmser.instruction_ids, mmser.generation, keep_state=False
    )
    lengths = refined.token_mask.sum(1).tolist() + state.token_mask.sum(1).tolist()
    assert len(set(lengths)) > 1, lengths


def test_refine_steps_zero_equals_simple(tiny_dir, frames):
    simple = build(settings(), "simple", checkpoint=tiny_dir)
    zero = build(settings(refine_steps=0), "mmser", checkpoint=tiny_dir)
    got_simple, got_zero = simple.caption_batch(frames), zero.caption_batch(frames)
    assert [r.caption for r in got_zero.results] == [r.caption for r in got_simple.results]
    assert all(r.refine_passes == 0 and r.coarse_caption is None for r in got_zero.results)
    assert "refine" not in got_simple.timings


def test_refined_differs_from_coarse_path(mmser, tiny_dir, frames):
    """The refinement pass really feeds the connector's tokens to the LM: its caption is
    not the coarse caption's continuation without them."""
    batch = mmser.caption_batch(frames)
    assert any(r.caption != r.coarse_caption for r in batch.results)


def vision_calls(captioner, frames) -> tuple[list[int], int, object]:
    """Captions `frames`: (the batch size of each vision pass, how often the tower's last
    layer ran, the batch)."""
    tower = captioner.model.model.vision_tower
    seen: list[int] = []
    last: list[int] = []
    hooks = [
        tower.embeddings.register_forward_hook(lambda m, a, o: seen.append(len(a[0]))),
        tower.encoder.layers[-1].register_forward_hook(lambda m, a, o: last.append(1)),
    ]
    try:
        batch = captioner.caption_batch(frames)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, len(last), batch


def test_vision_tower_runs_once_per_image(tiny_dir, frames):
    """One vision pass per batch, however many refinement passes; the tower runs only up
    to the deepest layer read: the simple model (layer -2 only) never runs the last."""
    seen, last, batch = vision_calls(build(settings(refine_steps=3), "mmser",
                                           checkpoint=tiny_dir), frames)
    assert seen == [len(frames)]
    assert last == 1  # the tiny connector reads every layer
    assert max(r.refine_passes for r in batch.results) >= 2
    seen, last, _ = vision_calls(build(settings(), "simple", checkpoint=tiny_dir), frames)
    assert seen == [len(frames)] and last == 0


def test_saliency_shape_and_normalised(mmser, frames):
    pixels = mmser.processor(images=frames, return_tensors="pt")["pixel_values"]
    features = mmser.model.encode_images(pixels)
    ids = mmser.prompt_ids[None].expand(len(frames), -1)
    state = mmser.model.caption_pass(
        ids, torch.ones_like(ids), features, mmser.generation, keep_state=True
    )
    n_image = mmser.model.config.image_seq_length
    assert state.saliency.shape == (len(frames), n_image)
    assert bool((state.saliency >= 0).all())
    torch.testing.assert_close(state.saliency.sum(-1), torch.ones(len(frames)))
    # The LM's attention is not uniform over image tokens.
    assert float(state.saliency.std(-1).min()) > 0
    assert state.cond.shape == (*state.tokens.shape, mmser.model.config.text_config.hidden_size)


def test_saliency_is_the_lms_own_attention_to_the_image(tiny_dir, frames):
    """The saliency map equals the attention weights transformers' eager attention returns
    for the written caption, read at the image tokens and averaged over the saliency
    layers, heads and real caption tokens (then normalised)."""
    captioner = build(settings(), "mmser", checkpoint=tiny_dir)
    model = captioner.model
    pixels = captioner.processor(images=frames, return_tensors="pt")["pixel_values"]
    features = model.encode_images(pixels)
    ids = captioner.prompt_ids[None].expand(len(frames), -1)
    state = model.caption_pass(
        ids, torch.ones_like(ids), features, captioner.generation, keep_state=True,
        cache_room=NEW_TOKENS,
    )
    P, T = ids.shape[1], state.tokens.shape[1]
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        out = model.model.language_model(
            inputs_embeds=state.embeds[:, : P + T], attention_mask=state.mask[:, : P + T],
            output_attentions=True,
        )
    expected = torch.zeros_like(state.saliency)
    weight = state.token_mask.float()
    assert bool((weight.sum(1) > 0).all())
    for layer in model.config.saliency_layers:
        attn = out.attentions[layer][:, :, P : P + T]  # (B, H, T, P + T): caption queries
        at_image = attn.gather(-1, state.image_pos[:, None, None, :].expand(
            -1, attn.shape[1], T, -1)).mean(1)  # (B, T, N)
        expected += (at_image * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)
    expected /= expected.sum(-1, keepdim=True)
    torch.testing.assert_close(state.saliency, expected, atol=1e-6, rtol=1e-4)


def test_reused_cache_equals_full_prefill(tiny_dir, frames):
    reuse = build(settings(reuse_cache=True), "mmser", checkpoint=tiny_dir)
    full = build(settings(reuse_cache=False), "mmser", checkpoint=tiny_dir)
    assert captions(reuse.caption_batch(frames)) == captions(full.caption_batch(frames))


def test_iterative_passes_in_one_arena_equal_full_prefill(tiny_dir, frames):
    """Three refinement passes continuing one KVArena (rows dropped between passes when a
    caption stops changing) write what re-prefilling every pass writes."""
    for threshold in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        chosen = settings(refine_steps=3, confidence_threshold=threshold)
        got = captions(build(chosen, "mmser", checkpoint=tiny_dir).caption_batch(frames))
        passes = {p for *_, p in got}
        if max(passes) >= 2 and len(passes) > 1:  # rows dropped after a refinement pass
            break
    else:
        pytest.fail("no confidence threshold drops rows between refinement passes")
    full = build(dataclasses.replace(chosen, mmser=dataclasses.replace(
        chosen.mmser, reuse_cache=False)), "mmser", checkpoint=tiny_dir)
    assert got == captions(full.caption_batch(frames))


def test_coarse_pass_attends_over_the_simple_models_length(mmser, frames):
    """MM-SeR's coarse pass views only the positions it writes (the simple model's cache
    length); the refinement pass continues the same arena with a longer view."""
    model, T = mmser.model, NEW_TOKENS
    pixels = mmser.processor(images=frames, return_tensors="pt")["pixel_values"]
    features = model.encode_images(pixels)
    ids = mmser.prompt_ids[None].expand(len(frames), -1)
    n_instr = len(mmser.instruction_ids)
    state = model.caption_pass(
        ids, torch.ones_like(ids), features, mmser.generation, keep_state=True,
        cache_room=T, arena_room=model.cache_room(T, 1, n_instr),
    )
    P = ids.shape[1]
    assert state.cache.get_max_length() == P + T
    assert state.arena.max_len == P + T + model.config.num_refine_tokens + n_instr + T
    arena_keys = state.arena.keys[0]
    assert state.cache.layers[0].keys.data_ptr() == arena_keys.data_ptr()  # a view, no copy
    refined = model.refine_pass(
        state, features, mmser.instruction_ids, mmser.generation, keep_state=False,
        cache_room=T,
    )
    full = mmser.caption_batch(frames).results
    texts = mmser.tokenizer.batch_decode(refined.tokens, skip_special_tokens=True)
    assert [t.strip() for t in texts] == [r.caption for r in full]


def test_state_recorded_after_decoding_equals_during(tiny_dir, mmser, frames):
    """One teacher-forced forward after decoding records the state that hooks during
    decoding record: the same saliency and conditioning, so the same refined captions."""
    after = build(settings(record_state="after"), "mmser", checkpoint=tiny_dir)
    assert after.record_after and not mmser.record_after
    states = []
    for captioner in (mmser, after):
        pixels = captioner.processor(images=frames, return_tensors="pt")["pixel_values"]
        features = captioner.model.encode_images(pixels)
        ids = captioner.prompt_ids[None].expand(len(frames), -1)
        states.append(captioner.model.caption_pass(
            ids, torch.ones_like(ids), features, captioner.generation, keep_state=True,
            cache_room=NEW_TOKENS, record_after=captioner.record_after,
        ))
    during, teacher_forced = states
    assert torch.equal(during.tokens, teacher_forced.tokens)
    torch.testing.assert_close(teacher_forced.saliency, during.saliency, atol=1e-5, rtol=1e-4)
    # At real caption tokens (the connector reads no other; past EOS the two feed the
    # last token under different masks).
    real = during.token_mask.bool()
    torch.testing.assert_close(teacher_forced.cond[real], during.cond[real], atol=1e-5, rtol=1e-4)
    assert captions(after.caption_batch(frames)) == captions(mmser.caption_batch(frames))


def test_compiled_decode_equals_eager(tiny_dir, mmser, frames):
    """compile_decode runs generate's decode steps through torch.compile (inductor on CPU,
    CUDA graphs on a GPU) and writes the eager path's captions."""
    compiled = build(settings(compile_decode=True), "mmser", checkpoint=tiny_dir)
    assert compiled.generation.compile_config is not None
    assert captions(compiled.caption_batch(frames)) == captions(mmser.caption_batch(frames))
    assert hasattr(compiled.model, "_compiled_call")  # generate did compile its step


def test_confidence_threshold_skips_refinement(tiny_dir, frames):
    never = build(settings(confidence_threshold=0.0), "mmser", checkpoint=tiny_dir)
    always = build(settings(confidence_threshold=1.01), "mmser", checkpoint=tiny_dir)
    skipped = never.caption_batch(frames).results
    assert all(r.refine_passes == 0 and r.caption == r.coarse_caption for r in skipped)
    assert all(r.refine_passes == 1 for r in always.caption_batch(frames).results)


def test_partial_confidence_rows_match_full_batch(tiny_dir, mmser, frames):
    """Refining only some rows (cache rows selected) gives those rows the same captions."""
    pixels = mmser.processor(images=frames, return_tensors="pt")["pixel_values"]
    features = mmser.model.encode_images(pixels)
    ids = mmser.prompt_ids[None].expand(len(frames), -1)
    state = mmser.model.caption_pass(
        ids, torch.ones_like(ids), features, mmser.generation, keep_state=True
    )
    threshold = float(state.confidence.median())
    some = build(settings(confidence_threshold=threshold), "mmser", checkpoint=tiny_dir)
    got = some.caption_batch(frames).results
    full = mmser.caption_batch(frames).results
    refined = [i for i, r in enumerate(got) if r.refine_passes]
    assert 0 < len(refined) < len(frames)
    assert all(got[i].caption == full[i].caption for i in refined)


def test_beam_search_captions(tiny_dir, frames):
    s = settings()
    s.generation.num_beams = 2
    batch = build(s, "mmser", checkpoint=tiny_dir).caption_batch(frames[:3])
    assert len(batch.results) == 3 and all(r.refine_passes == 1 for r in batch.results)


def test_min_new_tokens_fixes_length(tiny_dir, frames):
    s = settings()
    s.generation.min_new_tokens = NEW_TOKENS
    captioner = build(s, "simple", checkpoint=tiny_dir)
    pixels = captioner.processor(images=frames, return_tensors="pt")["pixel_values"]
    features = captioner.model.encode_images(pixels)
    ids = captioner.prompt_ids[None].expand(len(frames), -1)
    state = captioner.model.caption_pass(
        ids, torch.ones_like(ids), features, captioner.generation, keep_state=False
    )
    assert state.token_mask.sum(1).tolist() == [NEW_TOKENS] * len(frames)


def test_training_step_lowers_loss_through_connector(tiny_dir):
    from captioner.training import RefineCollator

    captioner = build(settings(), "mmser", checkpoint=tiny_dir)
    model = captioner.model
    torch.manual_seed(0)
    items = [
        {"pixel_values": torch.randn(3, 32, 32), "caption": target, "coarse": coarse}
        for coarse, target in (("a red cup on a table", "a blue cup on a table"),
                               ("two dogs", "two cats"),
                               ("a man rides a bike", "a woman rides a bike"))
    ]
    batch = RefineCollator(captioner.tokenizer, captioner.layout, max_tokens=16)(items)
    lm_before = model.lm_head.weight.detach().clone()
    # Plain SGD with a small step: the tiny model's wide random init makes the loss curved.
    optimiser = torch.optim.SGD(model.ser_connector.parameters(), lr=1e-4)
    loss = model(**batch).refine_loss
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0)
               for p in model.ser_connector.parameters())
    optimiser.step()
    with torch.no_grad():
        after = model(**batch).refine_loss
    assert float(after) < float(loss.detach())
    assert torch.equal(model.lm_head.weight, lm_before)


def test_bad_input_errors(mmser):
    with pytest.raises(CaptionerError, match="empty batch"):
        mmser.caption_batch([])
    with pytest.raises(CaptionerError, match="dtype uint8"):
        mmser.caption_batch([np.zeros((32, 32, 3), dtype=np.float32)])
    with pytest.raises(CaptionerError, match=r"shape \(H, W, 3\)"):
        mmser.caption_batch([np.zeros((32, 32, 5), dtype=np.uint8)])
    with pytest.raises(CaptionerError, match="wrap a single frame"):
        mmser.caption_batch(np.zeros((32, 32, 3), dtype=np.uint8))


def test_grayscale_and_rgba_are_converted(mmser, frames):
    gray = frames[0][:, :, 0]
    rgba = np.concatenate([frames[1], np.full(frames[1].shape[:2] + (1,), 7, np.uint8)], 2)
    got = mmser.caption_batch([gray, gray[:, :, None], rgba]).results
    want = mmser.caption_batch([np.repeat(gray[:, :, None], 3, 2), frames[1]]).results
    assert got[0].caption == got[1].caption == want[0].caption
    assert got[2].caption == want[1].caption


def test_simple_checkpoint_cannot_refine(tiny_simple_dir, frames):
    assert build(settings(), "simple", checkpoint=tiny_simple_dir).caption_batch(frames[:2])
    with pytest.raises(CaptionerError, match="no SeR-Connector|simple model"):
        build(settings(), "mmser", checkpoint=tiny_simple_dir)


def test_build_errors(tmp_path, tiny_dir):
    with pytest.raises(CaptionerError, match="not a checkpoint directory"):
        build(settings(), "mmser", checkpoint=tmp_path)
    with pytest.raises(CaptionerError, match="refine_steps"):
        build(settings(refine_steps=-1), "mmser", checkpoint=tiny_dir)
    with pytest.raises(CaptionerError, match="unknown build options"):
        build(settings(), "mmser", checkpoint=tiny_dir, bogus=1)


def test_identity_names_everything_that_changes_output(tiny_dir, mmser):
    ident = mmser.identity()
    assert ident["name"] == "mmser" and ident["settings"]["checkpoint"].startswith("dir-")
    assert ident["generation"]["max_new_tokens"] == NEW_TOKENS
    # The run computes the cache key without building: the same dict.
    assert ident == captioner_identity(settings(checkpoint=str(tiny_dir)), "mmser")
    for change in (
        {"refine_steps": 2},
        {"confidence_threshold": 0.5},
        {"refine_prompt": "Fix it."},
    ):
        other = build(settings(**change), "mmser", checkpoint=tiny_dir).identity()
        assert other != ident, change
        assert other["settings"] == {**ident["settings"], **change}
    # Speed-only knobs do not change captions, so they stay out of the cache key.
    same = settings(reuse_cache=False, draft_tokens=0)
    same.batch_size, same.device = 1, "cpu:0"
    assert build(same, "mmser", checkpoint=tiny_dir).identity() == ident
    assert build_captioner(settings(), "simple", checkpoint=tiny_dir).identity()["name"] == "simple"


def test_identity_fingerprints_checkpoint_content(tiny_dir, mmser, tmp_path):
    """A copied checkpoint keeps the identity; one changed weight file changes it."""
    import shutil

    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    assert build(settings(), "mmser", checkpoint=copy).identity() == mmser.identity()
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = captioner_identity(settings(checkpoint=str(copy)), "mmser")
    assert changed["settings"]["checkpoint"] != mmser.identity()["settings"]["checkpoint"]


def test_checkpoint_without_safetensors_is_refused(tiny_dir, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    for weights in copy.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CaptionerError, match="no .safetensors weights"):
        build(settings(), "mmser", checkpoint=copy)


def test_parameter_counts_at_real_size():
    mm = parameter_counts(CaptionerSettings(), "mmser")
    simple = parameter_counts(CaptionerSettings(), "simple")
    assert abs(mm["vision_tower"] - 303.5e6) < 0.1e6
    assert abs(mm["language_model"] - 125.2e6) < 0.1e6
    assert 45e6 <= mm["ser_connector"] <= 55e6
    assert 480e6 <= mm["total"] <= 520e6
    assert simple["ser_connector"] == 0 and abs(simple["total"] - 430.1e6) < 0.1e6
