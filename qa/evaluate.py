"""Accuracy over answer records, and EgoSchema submission files.

One accuracy definition, two conventions, both over the questions with a known answer:
  strict: correct / total (invalid and failed answers score 0);
  llovi:  (correct + 0.2 * (invalid + failed)) / total, LLoVi's convention that an
          unreadable answer is worth a random guess among 5 options.
The JSONL reading/writing with resume lives in `qa.answers` and is re-exported here.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from qa.answers import AnswerRecord, AnswerWriter, done_ids, read_answers
from qa.records import OPTION_LETTERS

__all__ = [
    "Accuracy", "AnswerRecord", "AnswerWriter", "accuracy", "done_ids", "read_answers",
    "write_submission",
]  # fmt: skip

INVALID_CREDIT = 1.0 / len(OPTION_LETTERS)  # LLoVi: 0.2


@dataclass(frozen=True)
class Accuracy:
    total: int  # questions with a known answer
    correct: int
    invalid: int  # answered, but unparseable
    failed: int  # the request failed after its retries
    strict: float  # correct / total (0.0 when total is 0)
    llovi: float  # (correct + 0.2 * (invalid + failed)) / total

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def accuracy(records: Iterable[AnswerRecord]) -> Accuracy:
    """Accuracy over the records whose `answer` is known (the others are ignored)."""
    known = [r for r in records if r.answer is not None]
    correct = sum(r.prediction == r.answer for r in known)
    failed = sum(r.failed for r in known)
    invalid = sum(r.prediction is None and not r.failed for r in known)
    total = len(known)
    if total == 0:
        return Accuracy(0, 0, 0, 0, 0.0, 0.0)
    return Accuracy(
        total=total,
        correct=correct,
        invalid=invalid,
        failed=failed,
        strict=correct / total,
        llovi=(correct + INVALID_CREDIT * (invalid + failed)) / total,
    )


def write_submission(records: Iterable[AnswerRecord], out_dir: Path) -> tuple[Path, Path]:
    """EgoSchema submission files: `submission.csv` (q_uid,answer) and `submission.json`.

    Every record gets a row, in q_uid order. An invalid or failed answer is written as -1
    (no invented guess); the grader scores it wrong. Returns (csv_path, json_path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted((r.q_uid, -1 if r.prediction is None else int(r.prediction)) for r in records)
    csv_path, json_path = out_dir / "submission.csv", out_dir / "submission.json"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["q_uid", "answer"])
        writer.writerows(rows)
    json_path.write_text(json.dumps(dict(rows), indent=1) + "\n", encoding="utf-8")
    return csv_path, json_path
