"""EgoSchema's tables as users have them (the hub's parquet, the official JSON) -> rows:
option letters stripped, answers as integers, hidden answers told apart (see
pipeline/egoschema_import.py for the layouts and where each fact comes from)."""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.datasets import NUM_OPTIONS, is_plain_name, parse_egoschema_questions
from pipeline.errors import DatasetError

HUB_REPO_ID = "lmms-lab/egoschema"
FULL_SET_SIZE = 5031  # questions in the released full set
SUBSET_SIZE = 500  # questions whose answers are public

LAYOUT_HUB = "hf-hub"
LAYOUT_OFFICIAL = "official"
LAYOUT_FOLDER = "folder"
LAYOUT_NAMES = {
    LAYOUT_HUB: "Hugging Face hub copy (lmms-lab/egoschema: parquet tables, video zips)",
    LAYOUT_OFFICIAL: "official repository (questions.json, subset_answers.json, video folder)",
    LAYOUT_FOLDER: "folder of .mp4 files with the question/answer JSON beside them",
}

LETTERS = "ABCDE"
_MAX_LISTED = 20  # items listed in one message or summary section
_MAX_JSON_BYTES = 256 << 20  # bigger .json files are not EgoSchema tables
_ID_COLUMNS = ("q_uid", "video_idx", "question_idx")  # first one present names the question
_OPTION_PREFIX = re.compile(r"^\s*(?:\(\s*([A-E])\s*\)|([A-E])\s*[.:)])\s*(\S.*)$", re.DOTALL)
_ANSWER_LETTER = re.compile(r"\(?\s*([A-Ea-e])\s*\)?[.:]?")



# Options and answers


def strip_option_letters(options: Sequence[str]) -> list[str]:
    """Drop "A. ", "(A) ", "A: ", "A) " prefixes, but only when every option carries its own
    letter in order (A..E); otherwise the options are returned unchanged (stripped of
    surrounding space), so a text that merely starts with a capital letter is kept."""
    matches = [_OPTION_PREFIX.match(o) for o in options]
    lettered = all(
        m is not None and (m.group(1) or m.group(2)) == LETTERS[i] for i, m in enumerate(matches)
    )
    if lettered and len(options) == len(LETTERS):
        return [m.group(3).strip() for m in matches if m is not None]
    return [o.strip() for o in options]


def parse_answer(value: Any) -> int | None:
    """An answer as an index 0-4; None when hidden (None, "", NaN, -1).

    Accepts ints, integral floats (pandas turns int columns with nulls into floats), digit
    strings ("2") and letters ("C", "(C)", "C."). Raises ValueError for anything else or an
    index out of range.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an option index")
    if isinstance(value, numbers.Integral):
        index = int(value)
    elif isinstance(value, numbers.Real):
        if math.isnan(value):
            return None
        if not float(value).is_integer():
            raise ValueError(f"{value!r} is not an option index")
        index = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "nan", "null"):
            return None
        letter = _ANSWER_LETTER.fullmatch(text)
        if letter:
            return LETTERS.index(letter.group(1).upper())
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"{value!r} is neither an option index 0-4 nor a letter A-E")
        index = int(text)
    else:
        raise ValueError(f"{value!r} ({type(value).__name__}) is not an option index")
    if index == -1:
        return None
    if not 0 <= index < NUM_OPTIONS:
        raise ValueError(f"{value!r} is out of range 0-{NUM_OPTIONS - 1}")
    return index


# ----------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class _Row:
    q_uid: str
    question: str
    options: tuple[str, ...]
    answer: int | None
    google_drive_id: str | None = None


@dataclass
class _Table:
    name: str
    path: Path
    subset: bool  # a subset table: its q_uids must be in the full set
    rows: dict[str, _Row]  # q_uid -> row, in table order


@dataclass
class _Answers:
    name: str
    path: Path
    answers: dict[str, Any]  # raw values


def _raise_listing(path: Path, problems: list[str]) -> None:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise DatasetError(f"{path}: {len(problems)} invalid row(s):\n  " + "\n  ".join(shown) + more)


def _as_list(value: Any) -> list[Any] | None:
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from pyarrow
        out = value.tolist()
        return out if isinstance(out, list) else None
    return None


def _is_question_columns(columns: Iterable[str]) -> bool:
    cols = set(columns)
    has_options = bool({"option", "options"} & cols) or "option 0" in cols
    return "question" in cols and has_options


def _rows_from_records(
    path: Path, records: list[dict[str, Any]], answer_problems: list[str], table: str
) -> dict[str, _Row]:
    """Validate table rows (raising DatasetError for malformed ones); answers that cannot be
    read go to `answer_problems` instead, as they are a disagreement, not a broken file."""
    if not records:
        return {}
    id_column = next((c for c in _ID_COLUMNS if c in records[0]), None)
    if id_column is None:
        raise DatasetError(
            f"{path}: has question and option columns but no id column "
            f"(looked for {', '.join(_ID_COLUMNS)})"
        )
    errors: list[str] = []
    rows: dict[str, _Row] = {}
    for i, rec in enumerate(records):
        raw_id = rec.get(id_column)
        q_uid = str(raw_id).strip() if raw_id is not None else ""
        where = f"row {i} ({id_column} {q_uid!r})"
        if not q_uid or not is_plain_name(q_uid):
            errors.append(f"{where}: missing or not a plain name (no path separators, not '..')")
            continue
        question = rec.get("question")
        if not isinstance(question, str) or not question.strip():
            errors.append(f"{where}: missing or empty 'question'")
            continue
        raw = rec.get("option", rec.get("options"))
        options = _as_list(raw) if raw is not None else [
            rec.get(f"option {j}") for j in range(NUM_OPTIONS)
        ]
        if options is None or len(options) != NUM_OPTIONS:
            got = "no list" if options is None else f"{len(options)}"
            errors.append(f"{where}: expected {NUM_OPTIONS} options, got {got}")
            continue
        if not all(isinstance(o, str) and o.strip() for o in options):
            errors.append(f"{where}: empty or non-text options")
            continue
        stripped = strip_option_letters(options)
        if not all(stripped):
            errors.append(f"{where}: an option is empty once its letter is removed")
            continue
        answer = None
        if "answer" in rec:
            try:
                answer = parse_answer(rec["answer"])
            except ValueError as exc:
                answer_problems.append(f"{table}: q_uid {q_uid}: answer {exc}")
        drive = rec.get("google_drive_id")
        row = _Row(
            q_uid, question.strip(), tuple(stripped), answer,
            drive if isinstance(drive, str) and drive else None,
        )
        if q_uid in rows and (rows[q_uid].question, rows[q_uid].options) != (
            row.question, row.options,
        ):
            errors.append(f"{where}: duplicate q_uid with a different question or options")
            continue
        rows.setdefault(q_uid, row)
    if errors:
        _raise_listing(path, errors)
    return rows


def _read_parquet_tables(
    files: list[Path], source: Path, answer_problems: list[str]
) -> list[_Table]:
    """Parquet files grouped by config (first folder under the source, else the file stem);
    shards of one config are concatenated. Files without EgoSchema columns are skipped."""
    import pandas as pd

    groups: dict[str, list[Path]] = {}
    for path in files:
        rel = path.relative_to(source)
        groups.setdefault(rel.parts[0] if len(rel.parts) > 1 else path.stem, []).append(path)
    tables = []
    for name, paths in groups.items():
        records: list[dict[str, Any]] = []
        first: Path | None = None
        for path in sorted(paths):
            try:
                frame = pd.read_parquet(path)
            except Exception as exc:  # pyarrow raises several types for a broken file
                raise DatasetError(f"{path}: not a readable parquet table: {exc}") from exc
            if not _is_question_columns(frame.columns):
                continue
            first = first or path
            records.extend(frame.to_dict("records"))
        if first is None:
            continue
        rows = _rows_from_records(first, records, answer_problems, name)
        tables.append(_Table(name, first, "subset" in name.lower(), rows))
    return tables


def _read_json(path: Path) -> Any:
    """The JSON in `path`; None when it is not JSON and not named like an EgoSchema table."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if re.search(r"question|answer", path.name, re.IGNORECASE):
            raise DatasetError(f"{path}: malformed JSON: {exc}") from exc
        return None


def _answer_like(value: Any) -> bool:
    """A value an answers file could hold: an index, a short string ("2", "C"), or null."""
    if isinstance(value, bool):
        return False
    return value is None or isinstance(value, int) or (
        isinstance(value, str) and len(value.strip()) <= 3
    )


def _is_answers_table(table: _Answers, known: set[str]) -> bool:
    """A {key: small value} JSON is an answers table when it is named so, or when most of its
    keys are question q_uids (a config such as {"size_option": 5} is not)."""
    if "answer" in table.path.name.lower():
        return True
    return sum(k in known for k in table.answers) * 2 >= len(table.answers)


def _read_json_tables(
    files: list[Path], answer_problems: list[str]
) -> tuple[list[_Table], list[_Answers]]:
    """Question tables (a list of objects with q_uid) and answer tables ({q_uid: 0-4});
    other JSON files (uid_to_ego4d.json, configs, ...) are not EgoSchema tables and skipped."""
    tables: list[_Table] = []
    answers: list[_Answers] = []
    for path in files:
        data = _read_json(path)
        if isinstance(data, list) and data and all(isinstance(e, dict) for e in data) and any(
            "q_uid" in e for e in data
        ):
            entries = parse_egoschema_questions(path)  # the product's own validation
            rows = _rows_from_records(path, entries, answer_problems, path.name)
            tables.append(_Table(path.name, path, "subset" in path.stem.lower(), rows))
        elif (
            isinstance(data, dict)
            and data
            and all(isinstance(k, str) for k in data)
            and all(_answer_like(v) for v in data.values())
        ):
            answers.append(_Answers(path.name, path, data))
    return tables, answers


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit:,} more" if len(items) > limit else "")
