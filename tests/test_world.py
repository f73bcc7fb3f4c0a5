"""The synthetic world: one canonical caption per scene, held-out pairs, labels for stage 0."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from captioner.perturb import PerturbSettings, RulePerturber, WordLists
from captioner.stand_in import patch_labels
from pipeline.world import (
    DEMO_WORLD,
    LEARN_WORLD,
    caption,
    parse_caption,
    render,
    sample_scene,
    scene_is_held_out,
    slot_accuracy,
    slots,
    text_corpus,
    write_world,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return write_world(root, LEARN_WORLD, {"train": 300, "val": 40, "test": 300}, seed=3)


def _items(root, split):
    return json.loads((root / f"{split}.json").read_text())


def test_captions_are_canonical_and_parse_back():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, LEARN_WORLD, "include")
        text = caption(scene, LEARN_WORLD)
        assert parse_caption(text, LEARN_WORLD) == slots(scene, LEARN_WORLD)
        first, second = scene.objects
        # The object named first is the left one (side by side) or the upper one (stacked).
        if scene.relation == "to the left of":
            assert first.cx < second.cx and abs(first.cy - second.cy) < 0.1
        else:
            assert first.cy < second.cy and abs(first.cx - second.cx) < 0.1
        assert first.colour != second.colour and first.shape != second.shape
    assert parse_caption("a red circle next to a blue square", LEARN_WORLD) is None
    demo = sample_scene(rng, DEMO_WORLD, "include")
    assert caption(demo, DEMO_WORLD).endswith("background")


def test_slot_accuracy_counts_slots():
    truth = parse_caption("a large red circle to the left of a small blue square", LEARN_WORLD)
    assert slot_accuracy("a large red circle to the left of a small blue square", truth,
                         LEARN_WORLD) == 1.0
    assert slot_accuracy("a large red circle to the left of a small green square", truth,
                         LEARN_WORLD) == pytest.approx(6 / 7)
    assert slot_accuracy("gibberish", truth, LEARN_WORLD) == 0.0


def test_held_out_pairs_only_in_test(world):
    for split in ("train", "val"):
        assert not any(item["held_out"] for item in _items(world, split))
        assert not any((o["colour"], o["shape"]) in LEARN_WORLD.held_out
                       for item in _items(world, split) for o in item["objects"])
    assert 0.15 < np.mean([item["held_out"] for item in _items(world, "test")]) < 0.45


def test_splits_are_different_draws_and_reproducible(world, tmp_path):
    train = {i["conversations"][1]["value"] for i in _items(world, "train")}
    again = write_world(tmp_path / "again", LEARN_WORLD, {"train": 300, "val": 40, "test": 300},
                        seed=3)
    assert (again / "train.json").read_text() == (world / "train.json").read_text()
    assert (again / "images/test/00007.png").read_bytes() == \
        (world / "images/test/00007.png").read_bytes()
    test = [i["conversations"][1]["value"] for i in _items(world, "test")]
    assert len(set(test) - train) > len(test) / 2  # mostly scenes training never showed


def test_drawing_puts_the_colours_where_the_objects_are():
    rng = np.random.default_rng(1)
    scene = sample_scene(rng, LEARN_WORLD, "exclude")
    image = render(scene, LEARN_WORLD, 64, 64)
    for obj in scene.objects:
        x, y = int(obj.cx * 64), int(obj.cy * 64)
        assert tuple(image[y, x]) == LEARN_WORLD.colours[obj.colour]


def test_word_lists_let_the_rules_perturb_every_kind(world):
    perturber = RulePerturber(WordLists.from_json(world / "word_lists.json"),
                              PerturbSettings(max_length_change=0.3, repeatable=["size"]))
    text = "a large red circle to the left of a small blue square"
    for kind in ("entity", "attribute", "relation"):
        made = perturber.perturb(text, random.Random(0), kinds=[kind], n_edits=1)
        assert made is not None and made.perturbed != text
        assert parse_caption(made.perturbed, LEARN_WORLD) is not None  # still the grammar


def test_text_corpus_holds_pairs_no_image_shows():
    corpus = text_corpus(LEARN_WORLD, 400, seed=0)
    pairs = {(s[f"obj{i}_colour"], s[f"obj{i}_shape"]) for text in corpus
             for s in [parse_caption(text, LEARN_WORLD)] for i in (1, 2)}
    assert set(LEARN_WORLD.held_out) & pairs


def test_patch_labels_cover_the_objects(world):
    item = _items(world, "train")[0]
    classes = {"shape": list(LEARN_WORLD.shapes), "colour": list(LEARN_WORLD.colours)}
    labels = patch_labels(item["objects"], 8, classes)  # (2, 64)
    assert labels.shape == (2, 64)
    for obj in item["objects"]:
        cell = int(obj["cy"] * 8) * 8 + int(obj["cx"] * 8)
        assert labels[0, cell] == classes["shape"].index(obj["shape"]) + 1
        assert labels[1, cell] == classes["colour"].index(obj["colour"]) + 1
    assert (labels == 0).float().mean() > 0.3  # background patches are class 0
    assert not scene_is_held_out(sample_scene(np.random.default_rng(0), LEARN_WORLD, "exclude"),
                                 LEARN_WORLD)
