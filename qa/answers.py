"""The reader's per-question record and its JSONL file (one line per question, resumable).

A record with `error` set is a request that failed after its retries: it is kept in the
file (nothing is lost) but is not "done", so a resumed run asks that question again. A
record with `prediction is None` and no error is an answer the parser could not read
(invalid, raw text kept).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qa.errors import ReaderError

T = TypeVar("T")


@dataclass
class AnswerRecord:
    q_uid: str
    video_id: str
    prediction: int | None  # option index 0-4; None: invalid or failed
    letter: str | None  # "A".."E" as the model wrote it (None when unparsed/failed)
    option_probs: list[float] | None  # 5 probabilities summing to 1 (structured choice only)
    raw_output: str  # the last stage's reply, verbatim
    stage_outputs: list[str] = field(default_factory=list)  # every stage's reply
    prompt_tokens: int = 0  # summed over stages (from the server's usage)
    completion_tokens: int = 0
    latency_s: float = 0.0  # wall-clock of all stages, retries included
    attempts: int = 0  # requests sent, retries included
    template: str = ""
    budget: dict[str, Any] = field(default_factory=dict)  # qa.transcript.BudgetReport
    answer: int | None = None  # the known correct index (EgoSchema's public 500), if any
    error: str | None = None  # why the request failed after all retries
    finish_reasons: list[str | None] = field(default_factory=list)  # the server's, per request
    truncated: bool = False  # a free-text stage stopped at max_tokens
    invalid_reason: str | None = None  # why a reply gave no answer (unreadable, tie, truncated)
    # Option-order debiasing: each shift's probabilities, in the original option order.
    shift_probs: list[list[float]] | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def valid(self) -> bool:
        return self.prediction is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnswerRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def read_jsonl(
    path: Path, parse: Callable[[dict[str, Any]], T], what: str,
    error: type[Exception] = ReaderError,
) -> list[T]:
    """Every line of a JSONL file (as `JsonlWriter` appends them) parsed by `parse`; [] when
    the file is absent. A torn last line (killed mid-write) is ignored; any other bad line
    raises `error` naming the file, the line and `what` it should be."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[T] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(parse(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if number == len(lines):
                break  # torn final write
            raise error(f"{path}:{number}: not {what} ({exc})") from exc
    return out


def read_answers(path: Path) -> dict[str, AnswerRecord]:
    """Records by q_uid; a later line for the same q_uid replaces an earlier one. A torn
    last line is ignored; any other bad line raises ReaderError naming the file and line."""
    return {r.q_uid: r for r in read_jsonl(path, AnswerRecord.from_dict, "an answer record")}


def done_ids(path: Path) -> set[str]:
    """q_uids with a finished (not failed) record: a resumed run skips these."""
    return {q for q, r in read_answers(path).items() if not r.failed}


def drop_torn_tail(path: Path) -> None:
    """Cut a final line without its newline (a killed write) so appends start clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class JsonlWriter:
    """Appends records (anything with `to_json()`) to a JSONL file, one flushed line each
    (safe to kill at any time); a torn last line of a killed run is cut first."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: Any) -> None:
        self._fh.write(record.to_json() + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


AnswerWriter = JsonlWriter  # the reader's answers.jsonl
