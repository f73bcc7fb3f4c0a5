"""MM-SeR's training forward against its inference passes, and the fixes review asked for.

The tiny checkpoint (conftest) has random weights and an OPT-style tokenizer (BOS = EOS =
`</s>`, id 2, prepended to every text). Tests compare numbers between code paths; nothing
here is about caption quality.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from captioner.base import CODE_VERSIONS, captioner_identity
from captioner.mmser import build
from captioner.sequence import caption_mask, encode_captions, label_mask
from captioner.settings import CaptionerSettings
from captioner.training import CaptionCollator, RefineCollator, set_trainable

NEW_TOKENS = 8


def settings(**mmser) -> CaptionerSettings:
    s = CaptionerSettings(device="cpu", dtype="float32")
    s.generation.max_new_tokens = NEW_TOKENS
    s.mmser = dataclasses.replace(s.mmser, **mmser)
    return s


@pytest.fixture(scope="module")
def mmser(tiny_dir):
    return build(settings(), "mmser", checkpoint=tiny_dir)


@pytest.fixture(scope="module")
def inputs(mmser, frames):
    pixels = mmser.processor(images=frames, return_tensors="pt")["pixel_values"]
    ids = mmser.prompt_ids[None].expand(len(frames), -1)
    return pixels, ids


def _with_logits(generation):
    generation = copy.deepcopy(generation)
    generation.output_logits = True
    return generation


def _label_positions(tokens, eos):
    return label_mask(tokens, eos).bool()


def test_training_forward_logits_equal_inference_logits(mmser, inputs):
    """The one sequence builder: teacher-forcing the coarse and the refined captions the
    inference passes wrote gives the logits those passes decoded with."""
    model, eos = mmser.model, mmser.layout.eos_token_id
    pixels, ids = inputs
    generation = _with_logits(mmser.generation)
    with torch.inference_mode():
        features = model.encode_images(pixels)
        coarse = model.caption_pass(ids, torch.ones_like(ids), features, generation,
                                    keep_state=True)
        refined = model.refine_pass(coarse, features, mmser.instruction_ids, generation,
                                    keep_state=False)
        prompt, image_pos = model.embed_prompt(ids, features)
        train_coarse = model.caption_forward(prompt, coarse.tokens, eos)
        train_refined = model.refinement_forward(
            features, prompt, image_pos, coarse.tokens, refined.tokens, mmser.instruction_ids,
            eos,
        )
    at = _label_positions(coarse.tokens, eos)
    torch.testing.assert_close(train_coarse[at], coarse.logits[at], atol=1e-4, rtol=1e-4)
    at = _label_positions(refined.tokens, eos)
    assert int(at.sum()) > len(ids)  # more than one token per row is compared
    torch.testing.assert_close(train_refined[at], refined.logits[at], atol=1e-4, rtol=1e-4)


def test_training_forward_through_forward_gives_both_losses(mmser, inputs, tiny_dir):
    """The Trainer (and DDP around it) reach the training code through `forward`."""
    model = mmser.model
    pixels, ids = inputs
    tok = mmser.tokenizer
    collate = RefineCollator(tok, mmser.layout, max_tokens=12)
    items = [{"pixel_values": p, "caption": c, "coarse": k} for p, c, k in zip(
        pixels, ["a red cup on a table", "two dogs"] * 3, ["a blue cup on a table", "two dogs"] * 3,
        strict=True)]
    batch = collate(items)
    out = model(**batch, caption_weight=0.5)
    assert out.caption_loss is not None and out.refine_loss is not None
    torch.testing.assert_close(out.loss, out.refine_loss + 0.5 * out.caption_loss)
    only_caption = model(**CaptionCollator(tok, mmser.layout, 12)(items))
    assert only_caption.refine_loss is None and torch.isfinite(only_caption.loss)
    # Plain inference calls still go to LLaVA's forward (what generate uses).
    assert model(input_ids=ids, pixel_values=pixels).logits.shape[:2] == ids.shape


def test_opt_tokenizer_convention(mmser):
    """OPT prepends `</s>` (id 2) to every text and ends captions with the same id: a
    caption encoded with special tokens would read as empty. The sequence builder puts the
    BOS before the image tokens only and encodes captions without it."""
    tok, layout = mmser.tokenizer, mmser.layout
    assert tok.bos_token_id == tok.eos_token_id == 2
    assert tok("a cat")["input_ids"][0] == 2  # the BOS really is prepended
    with_bos = torch.tensor([tok("a cat on a mat")["input_ids"]])
    assert int(caption_mask(with_bos, 2).sum()) == 0  # the hazard: an empty caption mask
    assert layout.prompt_ids[0] == 2
    assert layout.prompt_ids[1] == mmser.model.config.image_token_index
    block = encode_captions(tok, ["a cat on a mat", "a dog"], 32, layout)
    assert block[:, 0].ne(2).all()
    lengths = caption_mask(block, 2).sum(1).tolist()
    assert lengths == [len(tok("a cat on a mat", add_special_tokens=False)["input_ids"]),
                       len(tok("a dog", add_special_tokens=False)["input_ids"])]


def test_targets_end_with_eos(mmser):
    tok, layout = mmser.tokenizer, mmser.layout
    long = "a very long caption " * 10
    batch = CaptionCollator(tok, layout, max_tokens=8).captions(["a red cup", long])
    assert batch.shape[1] == 8
    for row in batch:
        labelled = row[label_mask(row[None], 2)[0].bool()]
        assert labelled[-1] == 2 and (labelled[:-1] != 2).all()  # exactly one EOS, last
    assert label_mask(batch, 2)[1].sum() == 8  # the cut caption still ends with EOS


def test_conditioning_reads_the_last_caption_token(mmser, inputs):
    """The connector's caption states include the one that has read the last token: two
    captions differing only in their last word give different refinement tokens, and the
    states recorded while decoding equal a teacher-forced pass over what was written."""
    model, tok, layout = mmser.model, mmser.tokenizer, mmser.layout
    pixels, ids = inputs
    ones = torch.ones_like(ids)
    with torch.inference_mode():
        features = model.encode_images(pixels)
        decoded = model.caption_pass(ids, ones, features, mmser.generation, keep_state=True)
        forced = model.given_caption_pass(ids, ones, features, decoded.tokens, 2)
        real = decoded.token_mask.bool()  # after EOS, decoding fed padding unmasked
        assert int(real.sum()) > len(ids)
        torch.testing.assert_close(decoded.cond[real], forced.cond[real], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(decoded.saliency, forced.saliency, atol=1e-5, rtol=1e-4)
        a = encode_captions(tok, ["a red cup on a table"] * len(ids), 16, layout)
        b = encode_captions(tok, ["a red cup on a chair"] * len(ids), 16, layout)
        assert (a != b).sum() == len(ids)  # one token apart per row: the last word
        state_a = model.given_caption_pass(ids, ones, features, a, 2)
        state_b = model.given_caption_pass(ids, ones, features, b, 2)
        last = int(caption_mask(a, 2)[0].sum()) - 1
        assert not torch.allclose(state_a.cond[:, last], state_b.cond[:, last])
        tokens_a = model.refinement_tokens(state_a, features)
        tokens_b = model.refinement_tokens(state_b, features)
    assert (tokens_a - tokens_b).abs().max() > 1e-4


def test_saliency_strength_is_learned(mmser, inputs):
    model = copy.deepcopy(mmser.model)
    scales = [block.saliency_scale for block in model.ser_connector.blocks]
    assert all(s.shape == (model.config.connector_num_heads,) for s in scales)
    assert all(bool((s == 1).all()) for s in scales)  # starts as the fixed-strength bias
    set_trainable(model, ["connector", "language_model"])
    model.train()
    pixels, ids = inputs
    batch = RefineCollator(mmser.tokenizer, mmser.layout, 12)(
        [{"pixel_values": p, "caption": "a red cup", "coarse": "a blue cup"} for p in pixels])
    model(**batch).loss.backward()
    assert all(s.grad is not None and bool(s.grad.abs().sum() > 0) for s in scales)
    # With the scale at 0 the connector ignores the saliency map.
    model.eval()
    with torch.no_grad():
        for s in scales:
            s.zero_()
        conn, B, N = model.ser_connector, len(ids), model.config.image_seq_length
        multi = torch.randn(B, len(model.config.connector_layers), N,
                            model.config.vision_config.hidden_size)
        cond, cmask = torch.randn(B, 5, model.config.text_config.hidden_size), torch.ones(B, 5)
        peaked = torch.softmax(torch.randn(B, N) * 5, -1)
        torch.testing.assert_close(conn(multi, peaked, cond, cmask),
                                   conn(multi, torch.full((B, N), 1 / N), cond, cmask))


def test_confidence_stop_applies_before_every_pass(tiny_dir, mmser, inputs, frames):
    """With refine_steps 2, a row whose first refinement is confident enough stops there."""
    model = mmser.model
    pixels, ids = inputs
    two = build(settings(refine_steps=2), "mmser", checkpoint=tiny_dir)
    with torch.inference_mode():
        features = model.encode_images(pixels)
        coarse = model.caption_pass(ids, torch.ones_like(ids), features, two.generation,
                                    keep_state=True)
        first = model.refine_pass(coarse, features, two.instruction_ids, two.generation,
                                  keep_state=True)
    tok = two.tokenizer
    changed = [a != b for a, b in zip(tok.batch_decode(first.tokens, skip_special_tokens=True),
                                      tok.batch_decode(coarse.tokens, skip_special_tokens=True),
                                      strict=True)]
    c0, c1 = coarse.confidence.tolist(), first.confidence.tolist()

    def expected(t: float) -> list[int]:
        return [0 if c0[r] >= t else 1 + int(changed[r] and c1[r] < t) for r in range(len(c0))]

    # A threshold at which some row is refined once and then stopped by its confidence,
    # halfway between two confidences: the captioner's cache layout may round a confidence
    # differently in the last bits, which must not move it across the threshold.
    values = sorted(set(c0) | set(c1))
    halfway = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
    stops = [t for t in halfway if any(
        c0[r] < t <= c1[r] and changed[r] for r in range(len(c0)))]
    assert stops, (c0, c1, changed)
    t = stops[0]
    got = build(settings(refine_steps=2, confidence_threshold=t), "mmser",
                checkpoint=tiny_dir).caption_batch(frames)
    assert [r.refine_passes for r in got.results] == expected(t)


def test_code_version_keys_the_cache(tiny_dir, tmp_path):
    from pipeline.cache import CaptionCache, sampling_identity
    from pipeline.config import SamplingSettings
    from pipeline.synth import write_indexed_video

    ident = captioner_identity(settings(checkpoint=str(tiny_dir)), "mmser")
    assert ident["code_version"] == CODE_VERSIONS["mmser"] >= 2
    older = {**ident, "code_version": ident["code_version"] - 1}
    video = write_indexed_video(tmp_path / "v.mp4", 10)
    cache = CaptionCache(tmp_path / "cache")
    sampling = sampling_identity(SamplingSettings())
    assert cache.key_for(video, sampling, ident) != cache.key_for(video, sampling, older)


def test_erased_pairs_train_only_the_refinement(mmser, inputs):
    """Random erasing hides part of the image; the caption loss leaves those rows out."""
    import random as random_

    from captioner.training import erase_box

    pixels = torch.full((3, 40, 60), 0.5)
    erased = erase_box(pixels, random_.Random(0), [0.2, 0.2])
    changed = (erased != pixels).any(0).numpy()
    assert 0.1 < changed.mean() <= 0.21 and bool((pixels == 0.5).all())  # a copy, one box
    ys, xs = changed.nonzero()
    assert changed[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() > 0.95  # a box
    pixels, _ = inputs
    items = [{"pixel_values": p, "caption": "a red cup", "coarse": "a blue cup",
              "erased": i % 2 == 0} for i, p in enumerate(pixels)]
    batch = RefineCollator(mmser.tokenizer, mmser.layout, 12)(items)
    assert batch["caption_rows"].tolist() == [i % 2 == 1 for i in range(len(items))]
    model = mmser.model
    with torch.no_grad():
        kept = model(**batch).caption_loss
        every = model(**{**batch, "caption_rows": None}).caption_loss
        odd = model(**{k: v[1::2] for k, v in batch.items() if k != "caption_rows"}).caption_loss
    torch.testing.assert_close(kept, odd)  # only the rows that were not erased
    assert not torch.isclose(kept, every)


def test_vision_blocks_that_train_are_the_ones_feeding_the_lm(mmser):
    """train.vision_trainable_blocks unfreezes the last blocks that the projector or the
    connector read; later blocks and the post-layernorm would get no gradient (DDP fails)."""
    from captioner.training import deepest_vision_layer

    model = copy.deepcopy(mmser.model)
    layers = model.model.vision_tower.encoder.layers
    deepest = deepest_vision_layer(model)
    set_trainable(model, ["projector"], vision_blocks=1)
    trains = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
    assert trains == [i == deepest - 1 for i in range(len(layers))]
    set_trainable(model, ["vision_tower", "connector"])
    assert not any(p.requires_grad for p in model.model.vision_tower.post_layernorm.parameters())
    pixels = torch.randn(2, 3, 32, 32)
    batch = RefineCollator(mmser.tokenizer, mmser.layout, 12)(
        [{"pixel_values": p, "caption": "a cat", "coarse": "a dog"} for p in pixels])
    model.train()
    model(**batch).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
