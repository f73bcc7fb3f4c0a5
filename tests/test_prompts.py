"""Transcript formatting, the context-budget policy, named templates and the answer parser."""

from __future__ import annotations

import pytest

from pipeline.errors import ReaderError
from pipeline.records import FrameCaption, Question, Transcript
from qa.parsing import parse_answer
from qa.prompts import TEMPLATES, fill, first_char_answer, get_template, prompt_fields
from qa.transcript import (
    digest,
    even_subsample,
    fit_transcript,
    format_captions,
    render_lines,
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


def test_digest_merges_consecutive_identical_captions_into_time_ranges() -> None:
    caps = [
        FrameCaption(12, "a red circle on a grey background"),
        FrameCaption(13, "A red circle on a grey background."),  # same after normalisation
        FrameCaption(14, "a red  circle on a grey background"),
        FrameCaption(15, "a blue square"),
        FrameCaption(16, "a red circle on a grey background"),  # not consecutive: its own line
    ]
    lines = digest(caps)
    assert render_lines(lines) == (
        "12-14: a red circle on a grey background\n15: a blue square\n"
        "16: a red circle on a grey background"
    )
    assert [line.count for line in lines] == [3, 1, 1]
    # At similarity 1.0 every distinct caption (after normalisation) is still there.
    assert {c.caption.lower().rstrip(".").replace("  ", " ") for c in caps} == {
        line.text for line in lines}
    # A lower similarity merges near-duplicates too, keeping the run's first caption.
    near = [FrameCaption(0, "a man cuts an onion"), FrameCaption(1, "a man cuts the onion")]
    assert len(digest(near)) == 2 and render_lines(digest(near, 0.6)) == "0-1: a man cuts an onion"


def test_llovi_lines_are_captions_joined_untimed() -> None:
    caps = [FrameCaption(1, "b two"), FrameCaption(0, "a  one")]
    assert render_lines(digest(caps), "llovi") == "a one. b two"


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
    kept, report = fit_transcript(_transcript(["a b c", "d e f", "g h i"]), 100, words)
    assert report.policy == "none" and report.captions_kept == 3 and len(kept) == 3


def test_budget_fast_path_skips_tokenizing_when_bytes_fit() -> None:
    calls = []

    def counting(text: str) -> int:
        calls.append(text)
        return words(text)

    transcript = _transcript(["a man cuts an onion"] * 3)  # 3 lines of 22 bytes + newline
    kept, report = fit_transcript(transcript, 100, counting, digest_similarity=None)
    assert len(kept) == 3 and report.policy == "none" and not report.exact
    assert calls == []  # bytes bound tokens for byte-level BPE: nothing to count
    assert report.tokens_in == 3 * 23
    # Over budget by bytes but not by tokens: counted exactly, still kept whole.
    kept, report = fit_transcript(transcript, 30, counting, digest_similarity=None)
    assert len(kept) == 3 and report.policy == "none" and report.exact
    assert report.tokens_in == 3 * (6 + 1) and calls


def test_digest_is_recorded_and_shortens_the_prompt() -> None:
    texts = ["a man cuts an onion"] * 10 + ["a woman opens the door", "he walks out now"]
    kept, report = fit_transcript(_transcript(texts), 1000, words)
    assert report.policy == "none" and report.digest
    assert (report.captions_in, report.lines_in, report.lines_out) == (12, 3, 3)
    assert render_lines(kept).splitlines()[0] == "0-9: a man cuts an onion"
    kept, report = fit_transcript(_transcript(texts), 1000, words, digest_similarity=None)
    assert report.lines_out == 12 and not report.digest


def test_budget_merges_near_duplicates_first() -> None:
    # Near-duplicates (not identical) merge only when over budget, at dedup_threshold.
    texts = [f"a man cuts an onion slowly {'now' if i % 2 else 'here'}" for i in range(10)]
    texts += ["a woman opens the door", "he walks out now"]
    kept, report = fit_transcript(_transcript(texts), 30, words, dedup_threshold=0.7)
    assert report.policy == "digest" and report.lines_in == 12
    assert [line.start for line in kept] == [0.0, 10.0, 11.0]
    assert report.tokens_kept <= 30 < report.tokens_in and report.captions_kept == 12


def test_budget_subsample_after_dedup_and_recorded() -> None:
    texts = [f"caption number {i} here" for i in range(100)]  # 5 tokens/line incl. "t:"
    kept, report = fit_transcript(_transcript(texts), 60, words, dedup_threshold=0.9)
    assert report.policy == "digest+subsample"
    assert report.captions_in == 100 and report.captions_kept == len(kept) == 10
    assert report.tokens_kept <= 60
    assert kept[0].start == 0.0 and kept[-1].start == 99.0  # spans the video
    _, report = fit_transcript(_transcript(texts), 60, words, digest_similarity=None)
    assert report.policy == "subsample"  # LLoVi's templates: no digest, even over budget


def test_budget_too_small_keeps_nothing_without_crashing() -> None:
    kept, report = fit_transcript(_transcript(["a b c d"] * 2 + ["x y z w"]), 2, words)
    assert kept == [] and report.captions_kept == 0 and report.policy == "digest+subsample"


def test_budget_unbounded_without_limit() -> None:
    _, report = fit_transcript(_transcript(["a"] * 5), None, words)
    assert report.policy == "unbounded" and report.captions_kept == 5


# --- templates ---------------------------------------------------------------------------


def _question() -> Question:
    return Question("q1", "v1", "What does the man do?", OPTIONS, answer=0)


def test_templates_registered_and_unknown_name_lists_known() -> None:
    assert set(TEMPLATES) == {"standard", "summarize_then_answer", "cot", "llovi_standard",
                              "llovi_sum_q", "llovi_zs_cot"}
    with pytest.raises(ReaderError, match="known: cot, llovi_standard, llovi_sum_q"):
        get_template("nope")


TRANSCRIPT = "0-2: a man\n3: a door"


def _rendered(name: str, transcript: str = TRANSCRIPT) -> list[str]:
    template = get_template(name)
    fields = prompt_fields(_question(), transcript, 180.0, 180, 500)
    fields["summary"] = "SUMMARY TEXT"  # the output a later stage uses
    assert set(template.fields()) <= set(fields)
    return [fill(s.user, fields, name) for s in template.stages]


def _in_order(text: str, *parts: str) -> None:
    """Every part is in `text`, in this order."""
    at = 0
    for part in parts:
        found = text.find(part, at)
        assert found >= 0, f"{part!r} missing (or out of order) in {text!r}"
        at = found + len(part)


OURS_OPTIONS = "A. the man cuts onions\nB. the man washes dishes"
LLOVI_OPTIONS = " A: the man cuts onions\n B: the man washes dishes"


def test_ours_standard_structure() -> None:
    (text,) = _rendered("standard")
    template = get_template("standard")
    assert template.family == "ours" and template.digest and template.lines == "timed"
    _in_order(text, "`a-b: description`", "180 seconds", "about 1 seconds", '"C" is the camera',
              TRANSCRIPT, "Question: What does the man do?", OURS_OPTIONS,
              "E. nobody is in the kitchen", "single letter")
    assert template.stages[0].answer == "choice"


def test_ours_multi_stage_flows_end_in_the_constrained_choice() -> None:
    summary, answer = _rendered("summarize_then_answer")
    _in_order(summary, TRANSCRIPT, "Question: What does the man do?", "about 500 words")
    assert "A. the man" not in summary  # the summary is asked without the options
    _in_order(answer, "SUMMARY TEXT", '"C" is the camera wearer', OURS_OPTIONS, "single letter")
    reasoning, letter = _rendered("cot")
    _in_order(reasoning, TRANSCRIPT, "Question:", OURS_OPTIONS, "step by step")
    assert "single letter" in letter and get_template("cot").conversation
    for name in ("summarize_then_answer", "cot"):
        assert get_template(name).stages[-1].answer == "choice"


def test_llovi_standard_structure() -> None:
    """qa_standard: the letter rule, descriptions (duration, clip length, captions joined
    untimed), the question, the choices as " A: ..."; the first character is the answer."""
    joined = "a man. a door"
    (text,) = _rendered("llovi_standard", joined)
    template = get_template("llovi_standard")
    assert (template.family, template.lines, template.digest, template.reading) == (
        "llovi", "llovi", False, "first_char")
    _in_order(text, "exactly one of the letters A, B, C, D, E", "180 seconds", "1 seconds",
              f"Descriptions: {joined}.", "Question: What does the man do?.", "Choices:",
              LLOVI_OPTIONS, " E: nobody is in the kitchen")
    assert '"C" is the camera' not in text and "a-b:" not in text  # no extra notes


def test_llovi_sum_q_structure() -> None:
    """sum_q (summary of summary_words words, with the question, no choices), then qa_sum
    (the letter rule, the summary as descriptions, question, choices) as a new request."""
    summary, answer = _rendered("llovi_sum_q", "a man. a door")
    template = get_template("llovi_sum_q")
    assert not template.conversation and template.stages[0].sampling == "summary"
    _in_order(summary, "180 seconds", "Descriptions: a man. a door.", "500 words",
              "What does the man do?")
    assert "A: the man" not in summary
    _in_order(answer, "exactly one of the letters", "180 seconds", "Descriptions: SUMMARY TEXT.",
              "Question: What does the man do?.", LLOVI_OPTIONS)
    assert "each one for" not in answer  # LLoVi's qa_sum has no clip length


def test_llovi_zs_cot_structure() -> None:
    """qa_zs-cot: descriptions, question, choices and "step by step"; then, in the same
    conversation, a turn asking for the letter only."""
    reasoning, letter = _rendered("llovi_zs_cot", "a man. a door")
    assert get_template("llovi_zs_cot").conversation
    _in_order(reasoning, "Descriptions: a man. a door.", "Question:", LLOVI_OPTIONS,
              "step by step")
    assert "exactly one of the letters A, B, C, D, E and nothing else" in letter
    assert "Descriptions" not in letter


def test_llovi_reads_the_first_character_only() -> None:
    assert first_char_answer("C") == 2 and first_char_answer("B) the man") == 1
    for reply in (" C", "c", "The answer is C", "", None, "(C)"):
        assert first_char_answer(reply) is None, reply


def test_option_order_shifts_the_shown_options() -> None:
    fields = prompt_fields(_question(), "", 10.0, 10, 50, order=[2, 3, 4, 0, 1])
    assert fields["options"].splitlines()[0] == "A. the woman reads a book"
    assert fields["option_d"] == "the man cuts onions"


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
    "option c": 2,
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
    # Options are labelled A-E: a bare number is ambiguous (tests/test_parsing.py reads
    # numbers in a prompt's own numbering).
    "Option 3",
    "Choice: 5",
    "The correct option is 4.",
]


@pytest.mark.parametrize(("reply", "expected"), list(SHAPES.items()))
def test_parser_reads_answer_shapes(reply: str, expected: int) -> None:
    assert parse_answer(reply, OPTIONS) == expected


@pytest.mark.parametrize("reply", INVALID)
def test_parser_returns_none_rather_than_guessing(reply: str) -> None:
    assert parse_answer(reply, OPTIONS) is None
