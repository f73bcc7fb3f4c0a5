"""Datasets: EgoSchema's real layout, and any folder tree of videos (an archive).

EgoSchema layout (as released):
    questions.json        a list of {"q_uid", "question", "option 0" .. "option 4",
                          optionally "google_drive_id"}
    subset_answers.json   {q_uid: 0-4}, the public answers of the 500-question subset
    videos/{q_uid}.mp4    one clip per question

Validation collects every offending item before raising one DatasetError that names the
file and lists them; a missing video is reported (not raised) and the rest go on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import DatasetError
from pipeline.records import Question, VideoItem

if TYPE_CHECKING:
    from pipeline.config import DatasetSettings

log = logging.getLogger(__name__)

NUM_OPTIONS = 5
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
_MAX_LISTED = 20  # offending items listed in one error message


@dataclass
class Dataset:
    """Questions with their videos. `missing_videos` lists q_uids whose video is absent."""

    name: str
    root: Path
    questions: list[Question]
    videos: dict[str, VideoItem]  # video_id -> video
    missing_videos: list[str] = field(default_factory=list)

    def answerable(self) -> list[Question]:
        """Questions whose video exists."""
        return [q for q in self.questions if q.video_id in self.videos]


def _raise_listing(path: Path, problems: list[str]) -> None:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise DatasetError(
        f"{path}: {len(problems)} invalid item(s):\n  " + "\n  ".join(shown) + more
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text: {exc}") from exc


def is_plain_name(name: str) -> bool:
    """An id usable as a file name: no path separators, not '.', '..', nor hidden tricks."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not name.startswith(".")
    )


def parse_egoschema_questions(path: Path) -> list[dict[str, Any]]:
    """Read and validate `questions.json`; returns the raw entries (all valid)."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(data):
        where = f"item {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object, got {type(entry).__name__}")
            continue
        q_uid = entry.get("q_uid")
        if isinstance(q_uid, str):
            where = f"item {i} (q_uid {q_uid!r})"
        if not isinstance(q_uid, str) or not q_uid:
            problems.append(f"{where}: missing or empty 'q_uid'")
        elif not is_plain_name(q_uid):
            problems.append(f"{where}: 'q_uid' is not a plain name (path separators or '..')")
        elif q_uid in seen:
            problems.append(f"{where}: duplicate q_uid, first at item {seen[q_uid]}")
        else:
            seen[q_uid] = i
        if not isinstance(entry.get("question"), str) or not entry["question"].strip():
            problems.append(f"{where}: missing or empty 'question'")
        option_keys = sorted(k for k in entry if k.startswith("option "))
        expected = [f"option {j}" for j in range(NUM_OPTIONS)]
        if option_keys != expected:
            problems.append(
                f"{where}: expected exactly {NUM_OPTIONS} options 'option 0'..'option 4', "
                f"got {len(option_keys)}: {option_keys}"
            )
        else:
            empty = [k for k in expected if not isinstance(entry[k], str) or not entry[k].strip()]
            if empty:
                problems.append(f"{where}: empty or non-text options: {empty}")
    if problems:
        _raise_listing(path, problems)
    return data


def parse_answers(path: Path, known_ids: set[str]) -> dict[str, int]:
    """Read and validate `subset_answers.json` ({q_uid: 0-4})."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object {{q_uid: 0-4}}")
    problems = []
    for q_uid, answer in data.items():
        if q_uid not in known_ids:
            problems.append(f"q_uid {q_uid!r}: not in questions.json")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < NUM_OPTIONS:
            problems.append(f"q_uid {q_uid!r}: answer {answer!r} is not an integer 0-4")
    if problems:
        _raise_listing(path, problems)
    return data


def load_egoschema(root: str | Path, name: str = "egoschema", subset_only: bool = False) -> Dataset:
    """Load an EgoSchema-format folder (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    entries = parse_egoschema_questions(root / "questions.json")
    answers_path = root / "subset_answers.json"
    ids = {e["q_uid"] for e in entries}
    answers = parse_answers(answers_path, ids) if answers_path.exists() else {}
    questions: list[Question] = []
    videos: dict[str, VideoItem] = {}
    missing: list[str] = []
    for entry in entries:
        q_uid = entry["q_uid"]
        if subset_only and q_uid not in answers:
            continue
        questions.append(
            Question(
                q_uid=q_uid,
                video_id=q_uid,
                question=entry["question"].strip(),
                options=tuple(entry[f"option {j}"].strip() for j in range(NUM_OPTIONS)),
                answer=answers.get(q_uid),
            )
        )
        video = root / "videos" / f"{q_uid}.mp4"
        if video.is_file():
            videos[q_uid] = VideoItem(video_id=q_uid, path=video)
        else:
            missing.append(q_uid)
    if missing:
        log.warning(
            "%s: %d of %d videos missing (their questions are skipped): %s%s",
            root / "videos", len(missing), len(questions), ", ".join(missing[:10]),
            " ..." if len(missing) > 10 else "",
        )
    return Dataset(name=name, root=root, questions=questions, videos=videos, missing_videos=missing)


def find_videos(*roots: str | Path) -> list[VideoItem]:
    """Every video under the given files or folders (recursively), sorted by path.

    video_id is the path relative to its root without the extension, '/' kept, so ids are
    unique within one root; across roots a clash raises.
    """
    items: dict[str, VideoItem] = {}
    for root in map(Path, roots):
        if root.is_file():
            candidates = [root]
            base = root.parent
        elif root.is_dir():
            candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
            base = root
        else:
            raise DatasetError(f"{root}: no such file or folder")
        for path in candidates:
            if not path.is_file():
                continue
            video_id = path.relative_to(base).with_suffix("").as_posix()
            if video_id in items and items[video_id].path != path:
                raise DatasetError(
                    f"video id {video_id!r} is used by both {items[video_id].path} and {path}"
                )
            items[video_id] = VideoItem(video_id=video_id, path=path)
    return sorted(items.values(), key=lambda item: str(item.path))


def load_dataset(name_or_path: str, registered: dict[str, DatasetSettings]) -> Dataset:
    """A dataset registered in config.yaml by name, or a path to an EgoSchema-format folder."""
    if name_or_path in registered:
        settings = registered[name_or_path]
        root = Path(settings.root)
        if settings.format == "folder":
            videos = find_videos(root)
            return Dataset(
                name=name_or_path, root=root, questions=[],
                videos={v.video_id: v for v in videos},
            )
        if settings.download and not (root / "questions.json").exists():
            download_egoschema(root, settings.hf_repo, settings.download_videos)
        if not (root / "questions.json").exists():
            hint = (
                " Run `make demo` to generate it." if name_or_path == "demo" else
                f" Place questions.json, subset_answers.json and videos/ there, or set "
                f"datasets.{name_or_path}.download=true (needs network)."
            )
            raise DatasetError(f"dataset {name_or_path!r}: {root}/questions.json not found.{hint}")
        return load_egoschema(root, name=name_or_path, subset_only=settings.subset_only)
    path = Path(name_or_path)
    if path.is_dir():
        return load_egoschema(path, name=path.name)
    raise DatasetError(
        f"unknown dataset {name_or_path!r}: neither a name in config.yaml "
        f"({', '.join(sorted(registered)) or 'none'}) nor a folder"
    )


def download_egoschema(root: Path, hf_repo: str, videos: bool = False) -> None:
    """Fetch EgoSchema with huggingface_hub (needs network; not run in tests) into
    `root/.hub/`, tables first and the video zips when `videos`, then import it into the
    product's layout with `pipeline.egoschema_import` (the import is what the tests run)."""
    from pipeline.egoschema_import import download_and_import

    root.mkdir(parents=True, exist_ok=True)
    report = download_and_import(hf_repo, root / ".hub", root, videos=videos)
    log.info("%s", report.summary())
    if not report.ok:
        raise DatasetError(f"{hf_repo}: the downloaded tables disagree:\n{report.summary()}")
