"""Accuracy (strict and LLoVi's), submission files and the resumable answer JSONL."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.errors import ReaderError
from qa.evaluate import (
    AnswerRecord,
    AnswerWriter,
    accuracy,
    done_ids,
    read_answers,
    write_submission,
)


def rec(q_uid: str, prediction: int | None, answer: int | None, error: str | None = None):
    return AnswerRecord(
        q_uid=q_uid,
        video_id="v" + q_uid,
        prediction=prediction,
        letter=None if prediction is None else "ABCDE"[prediction],
        option_probs=None,
        raw_output="x",
        answer=answer,
        error=error,
    )


FIXED = [
    rec("q1", 0, 0),  # correct
    rec("q2", 1, 1),  # correct
    rec("q3", 2, 4),  # wrong
    rec("q4", None, 3),  # invalid (unparseable)
    rec("q5", None, 2, error="APIConnectionError: refused"),  # failed
    rec("q6", 4, None),  # no known answer: not scored
]


def test_accuracy_strict_and_llovi() -> None:
    acc = accuracy(FIXED)
    assert (acc.total, acc.correct, acc.invalid, acc.failed) == (5, 2, 1, 1)
    assert acc.strict == pytest.approx(2 / 5)
    assert acc.llovi == pytest.approx((2 + 0.2 * 2) / 5)


def test_accuracy_without_known_answers_is_zero_not_an_error() -> None:
    acc = accuracy([rec("q", 1, None)])
    assert acc.total == 0 and acc.strict == 0.0


def test_submission_files(tmp_path: Path) -> None:
    csv_path, json_path = write_submission(list(reversed(FIXED)), tmp_path / "sub")
    with csv_path.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["q_uid", "answer"]
    assert rows[1:] == [
        ["q1", "0"],
        ["q2", "1"],
        ["q3", "2"],
        ["q4", "-1"],
        ["q5", "-1"],
        ["q6", "4"],
    ]
    assert json.loads(json_path.read_text()) == {
        "q1": 0, "q2": 1, "q3": 2, "q4": -1, "q5": -1, "q6": 4,
    }  # fmt: skip


def test_jsonl_round_trip_and_resume_ids(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    with AnswerWriter(path) as writer:
        for r in FIXED:
            writer.write(r)
    back = read_answers(path)
    assert list(back) == [r.q_uid for r in FIXED]
    assert back["q3"] == FIXED[2]
    # Failed requests are not done: a resumed run asks them again.
    assert done_ids(path) == {"q1", "q2", "q3", "q4", "q6"}
    # A later line for the same id (the retry) replaces the failed one.
    with AnswerWriter(path) as writer:
        writer.write(rec("q5", 2, 2))
    assert done_ids(path) == {"q1", "q2", "q3", "q4", "q5", "q6"}
    assert accuracy(read_answers(path).values()).correct == 3


def test_torn_last_line_is_ignored_then_cut(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_text(rec("q1", 0, 0).to_json() + "\n" + '{"q_uid": "q2", "pred')
    assert list(read_answers(path)) == ["q1"]
    with AnswerWriter(path) as writer:
        writer.write(rec("q2", 1, 1))
    assert list(read_answers(path)) == ["q1", "q2"]
    assert len(path.read_text().splitlines()) == 2


def test_corrupt_middle_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_text("not json\n" + rec("q1", 0, 0).to_json() + "\n")
    with pytest.raises(ReaderError, match=r"answers.jsonl:1: not an answer record"):
        read_answers(path)
