"""Transcript formatting, the context-budget policy, named templates and the answer parser."""

from __future__ import annotations

import pytest

from pipeline.errors import ReaderError
from pipeline.records import FrameCaption, Question, Transcript
from qa.parsing import parse_answer
from qa.prompts import TEMPLATES, fill, get_template, prompt_fields
from qa.transcript import (
    drop_near_duplicates,
    even_subsample,
    fit_transcript,
    format_captions,
)

OPTIONS = (
    "the man cuts onions",
    "the man washes dishes",
    "the woman reads a book",
    "the man cooks rice",
    "nobody is in the kitchen",
)


def words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace word."""
    return len(text.split())


# --- transcript --------------------------------------------------------------------------


def test_transcript_lines_are_llovi_form_in_time_order() -> None:
    caps = [FrameCaption(2.0, "c  two"), FrameCaption(0.0, "a zero"), FrameCaption(1.5, "b")]
    assert format_captions(caps) == "0: a zero\n1.5: b\n2: c two"


def test_near_duplicates_dropped_only_when_consecutive() -> None:
    caps = [
        FrameCaption(0, "a man cuts an onion"),
        FrameCaption(1, "A man cuts an onion."),  # same words: dropped
        FrameCaption(2, "a woman opens the door"),
        FrameCaption(3, "a man cuts an onion"),  # not consecutive to the first: kept
    ]
    kept = drop_near_duplicates(caps, threshold=0.9)
    assert [c.timestamp for c in kept] == [0, 2, 3]


def test_even_subsample_spans_the_whole_video() -> None:
    caps = [FrameCaption(float(t), str(t)) for t in range(100)]
    picked = even_subsample(caps, 5)
    assert [c.timestamp for c in picked] == [0.0, 25.0, 50.0, 74.0, 99.0]
    assert even_subsample(caps, 0) == [] and len(even_subsample(caps, 500)) == 100


def _transcript(texts: list[str]) -> Transcript:
    return Transcript(
        "v", float(len(texts)), [FrameCaption(float(i), t) for i, t in enumerate(texts)]
    )


def test_budget_none_when_it_fits() -> None:
    kept, report = fit_transcript(_transcript(["a b c"] * 3), 100, words)
    assert report.policy == "none" and report.captions_kept == 3 and len(kept) == 3


def test_budget_fast_path_skips_tokenizing_when_bytes_fit() -> None:
    calls = []

    def counting(text: str) -> int:
        calls.append(text)
        return words(text)

    transcript = _transcript(["a man cuts an onion"] * 3)  # 3 lines of 22 bytes + newline
    kept, report = fit_transcript(transcript, 100, counting)
    assert len(kept) == 3 and report.policy == "none" and not report.exact
    assert calls == []  # bytes bound tokens for byte-level BPE: nothing to count
    assert report.tokens_in == 3 * 23
    # Over budget by bytes but not by tokens: counted exactly, still kept whole.
    kept, report = fit_transcript(transcript, 30, counting)
    assert len(kept) == 3 and report.policy == "none" and report.exact
    assert report.tokens_in == 3 * (6 + 1) and calls


def test_budget_dedup_first() -> None:
    # 10 copies of one caption + 2 distinct: dedup alone fits (3 lines * 5 tokens).
    texts = ["a man cuts an onion"] * 10 + ["a woman opens the door", "he walks out now"]
    kept, report = fit_transcript(_transcript(texts), 20, words)
    assert report.policy == "dedup"
    assert [c.timestamp for c in kept] == [0.0, 10.0, 11.0]
    assert report.tokens_kept <= 20 < report.tokens_in


def test_budget_subsample_after_dedup_and_recorded() -> None:
    texts = [f"caption number {i} here" for i in range(100)]  # 5 tokens/line incl. "t:"
    kept, report = fit_transcript(_transcript(texts), 60, words, dedup_threshold=0.9)
    assert report.policy == "dedup+subsample"
    assert report.captions_in == 100 and report.captions_kept == len(kept) == 10
    assert report.tokens_kept <= 60
    assert kept[0].timestamp == 0.0 and kept[-1].timestamp == 99.0  # spans the video


def test_budget_too_small_keeps_nothing_without_crashing() -> None:
    kept, report = fit_transcript(_transcript(["a b c d"] * 2 + ["x y z w"]), 2, words)
    assert kept == [] and report.captions_kept == 0 and report.policy == "dedup+subsample"


def test_budget_unbounded_without_limit() -> None:
    _, report = fit_transcript(_transcript(["a"] * 5), None, words)
    assert report.policy == "unbounded" and report.captions_kept == 5


# --- templates ---------------------------------------------------------------------------


def _question() -> Question:
    return Question("q1", "v1", "What does the man do?", OPTIONS, answer=0)


def test_templates_registered_and_unknown_name_lists_known() -> None:
    assert {"standard", "summarize_then_answer", "cot"} <= set(TEMPLATES)
    with pytest.raises(ReaderError, match="known: cot, standard, summarize_then_answer"):
        get_template("nope")


@pytest.mark.parametrize("name", ["standard", "summarize_then_answer", "cot"])
def test_every_template_fills_from_prompt_fields(name: str) -> None:
    template = get_template(name)
    fields = prompt_fields(_question(), "0: a man\n1: a door", 180.0, 180, 100)
    fields["summary"] = "SUMMARY TEXT"  # stage outputs a later stage may use
    texts = [fill(s.user, fields, name) for s in template.stages]
    first = texts[0]
    assert "0: a man\n1: a door" in first or "SUMMARY" in first
    assert "180 seconds" in first and "1 seconds" in first  # length and seconds per caption
    assert "What does the man do?" in texts[-1]
    assert "E. nobody is in the kitchen" in texts[-1]
    assert set(template.fields()) <= set(fields)


def test_fill_is_strict() -> None:
    with pytest.raises(ReaderError, match=r"placeholder \{summary\} has no value"):
        fill("Summary: {summary}", {"question": "q"}, "test")


def test_prompt_fields_rejects_wrong_option_count() -> None:
    with pytest.raises(ReaderError, match="q2: expected 5 options, got 2"):
        prompt_fields(Question("q2", "v", "?", ("a", "b")), "", 1.0, 1, 10)


# --- parser ------------------------------------------------------------------------------

SHAPES = {
    "C": 2,
    "c": 2,
    "(C)": 2,
    "C.": 2,
    "C)": 2,
    "[D]": 3,
    "Answer: C": 2,
    "answer: c": 2,
    "**Answer: E**": 4,
    "The answer is (C)": 2,
    "The answer is: c": 2,
    "The answer is C because the woman is reading.": 2,
    "The best answer would be B": 1,
    "Option 3": 2,
    "option c": 2,
    "Choice: 5": 4,
    "The correct option is 4.": 3,
    "C) the woman reads a book": 2,
    "c. the woman reads": 2,
    "(B) because he is at the sink": 1,
    "The woman reads a book.": 2,  # restated in words
    "the man washes dishes": 1,
    "I think the man is cooking rice here": 3,  # close paraphrase
    "A seems wrong. B too. Therefore, the answer is D.": 3,  # the last statement wins
    "Let's think step by step.\nThe man is at the sink.\nThe answer is (B)": 1,
}
INVALID = [
    "",
    "   ",
    "I cannot tell from the descriptions.",
    "A or B",
    "the answer is a man cooking",  # "a" is an article, not option A
    "the man cuts onions and then the man washes dishes",  # two options restated
    "Option 9",
]


@pytest.mark.parametrize(("reply", "expected"), list(SHAPES.items()))
def test_parser_reads_answer_shapes(reply: str, expected: int) -> None:
    assert parse_answer(reply, OPTIONS) == expected


@pytest.mark.parametrize("reply", INVALID)
def test_parser_returns_none_rather_than_guessing(reply: str) -> None:
    assert parse_answer(reply, OPTIONS) is None
