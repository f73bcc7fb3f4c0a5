"""Import EgoSchema from the layouts users have into the product's own layout.

The product reads one layout (see `pipeline.datasets.load_egoschema`):

    target/questions.json        [{"q_uid", "question", "option 0" .. "option 4",
                                   optional "google_drive_id"}, ...]
    target/subset_answers.json   {q_uid: 0-4}  (only the answers that are public)
    target/videos/{q_uid}.mp4

`import_egoschema(source, target)` builds it from any of these sources, detected by what
the files hold, not by their exact names:

1. "hf-hub": a local copy of the Hugging Face dataset `lmms-lab/egoschema`: parquet tables
   (one folder per config: GENERATION, MC, MC_PPL = the full set, Subset = the 500 questions
   with public answers) and the videos in zips (`videos_chunked_01.zip` ...).
2. "official": the official repository's `questions.json` and `subset_answers.json` with the
   videos in a folder of any name (`videos/`, `good_clips_git/`, ...), named `{q_uid}.mp4`.
3. "folder": a folder of `{q_uid}.mp4` files with those two JSON files beside them.

Usage:

    from pipeline.egoschema_import import import_egoschema
    report = import_egoschema(Path("~/hf/egoschema"), Path("data/egoschema"), remove_zips=True)
    print(report.summary())
    if not report.ok:  # the tables disagree with each other
        raise SystemExit(1)

or, with network, `download_and_import("lmms-lab/egoschema", cache_dir, target, videos=True)`.

Videos are streamed out of the zips member by member (resumable: a video already in the
target with the zip member's size is skipped), already-extracted videos are hard-linked
(else symlinked, else copied). Everything that went wrong but did not stop the import
(refused or broken zip members, tables that disagree, ...) is listed in `report.problems`.
"""

# Where the layout facts come from (checked before writing this module):
#
# * Hub configs and files -- huggingface.co/datasets/lmms-lab/egoschema (file tree and dataset
#   viewer, as stored in the search index): folders GENERATION/, MC/, MC_PPL/, Subset/, each
#   with `test-00000-of-00001.parquet` (the parquet converter's copy is `MC/test/0000.parquet`);
#   the viewer lists GENERATION, MC and MC_PPL with 5.03k rows and Subset with 500 rows, split
#   "test". Videos: `videos_chunked_01.zip` .. `videos_chunked_05.zip` (about 21 GB each).
# * Config names -- EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/egoschema/egoschema.yaml
#   (dataset_name "GENERATION"), egoschema_mc.yaml ("MC"), egoschema_mcppl.yaml ("MC_PPL"),
#   egoschema_subset.yaml ("Subset"); _default_template_yaml: dataset_path lmms-lab/egoschema,
#   cache_dir egoschema.
# * Columns -- lmms_eval/tasks/egoschema/utils.py: `doc["question"]`; `doc["option"]` is a list
#   already lettered ("A. ...": egoschema_doc_to_choice does `op.split(".")[1]`, and the
#   generation scorer splits each option at ". " into letter and sentence); `doc["answer"]` is
#   compared as `str(ground_truth) == str(pred)` with pred an index 0-4; `doc["video_idx"]` names
#   the video (`video_idx + ".mp4"`, or ".MP4") and keys the submission file sent to the official
#   server, which is keyed by q_uid -- so video_idx is the q_uid. `question_idx` is a column too
#   (seen in third-party loaders that read these parquet files, e.g. one whose docstring lists
#   "question_idx, question, video_idx, option (list of 'A. ...'), answer (int 0-4)").
# * Zip members -- a third-party extraction script (scripts/datasets/egoschema_extract_videos.sh,
#   found by the code index without its repository name) says "zip contains videos/<uuid>.mp4";
#   lmms-eval joins the unzipped cache dir with "videos" too.
# * Official layout -- egoschema/EgoSchema: questions.json holds {"q_uid", "google_drive_id",
#   "question", "option 0".."option 4"} (commit 617b469; an older commit lacked "question"),
#   subset_answers.json holds 500 {q_uid: int 0-4}; README.md: videos are saved in `videos/`,
#   named by q_uid; issue #2: the Google Drive tarball unpacks to `good_clips_git/`.
#   lmms-eval's utils.py comments that the full set has 5031 questions.
#
# Not confirmed, so both forms are handled:
# * the type of `answer`: the brief and lmms-eval's str() comparison suggest a string index
#   ("2"), a third-party loader says int 0-4; a third-party README says the GENERATION/MC
#   configs ship every answer as None. Ints, digit strings, letters ("C") are all read;
#   None, "", NaN and -1 mean hidden.
# * the option prefix: "A. x" per lmms-eval; "(A) x" and "A: x" / "A) x" are stripped too, but
#   only when all five options carry their own letter in order (else they are kept as they are).
# * question_idx's form (index or uid) is unknown: q_uid is taken from `q_uid`, else
#   `video_idx`, else `question_idx`.
# * the folder inside the zips: any folder is accepted; a member is taken by its file name.

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.egoschema_tables import (
    _MAX_LISTED,
    FULL_SET_SIZE,
    HUB_REPO_ID,
    LAYOUT_FOLDER,
    LAYOUT_HUB,
    LAYOUT_NAMES,
    LAYOUT_OFFICIAL,
    SUBSET_SIZE,
    _Answers,
    _is_answers_table,
    _listing,
    _read_json_tables,
    _read_parquet_tables,
    _Row,
    _Table,
    parse_answer,
    strip_option_letters,
)
from pipeline.egoschema_videos import (
    _existing_ancestor,
    _extract,
    _gib,
    _Member,
    _place,
    _remove_zips,
    _scan,
    _unsafe_member,
    _write_json_atomic,
)
from pipeline.errors import DatasetError

__all__ = ["ImportReport", "download_and_import", "import_egoschema", "parse_answer",
           "snapshot_patterns", "strip_option_letters"]



# ----------------------------------------------------------------------------------------
# Report


@dataclass
class ImportReport:
    """What `import_egoschema` found and did. `ok` is False when the tables disagree."""

    source: Path
    target: Path
    layout: str  # one of LAYOUT_NAMES
    tables: dict[str, int] = field(default_factory=dict)  # table name -> rows
    questions: int = 0
    answers: int = 0  # answers written to subset_answers.json
    hidden_answers: int = 0  # questions without a public answer
    videos_present: int = 0
    videos_missing: list[str] = field(default_factory=list)  # q_uids, in question order
    videos_extracted: int = 0  # from zips, this run
    videos_linked: int = 0  # hard- or symlinked, this run
    videos_copied: int = 0  # copied, this run (link=False, or linking failed)
    videos_skipped: int = 0  # already in the target with the right size
    ignored: int = 0  # .mp4 files / zip members not taken (unknown name or not .mp4)
    problems: list[str] = field(default_factory=list)  # everything worth a look
    disagreements: list[str] = field(default_factory=list)  # the subset of problems that fail
    zips_removed: list[Path] = field(default_factory=list)
    zips_kept_reason: str | None = None  # set when remove_zips was asked and not done

    @property
    def ok(self) -> bool:
        """False when tables disagree with each other (or hold answers out of range)."""
        return not self.disagreements

    def summary(self, max_listed: int = _MAX_LISTED) -> str:
        """A few lines for people: counts, missing videos (capped), problems."""
        lines = [
            f"EgoSchema import: {self.source} -> {self.target}",
            f"layout: {LAYOUT_NAMES.get(self.layout, self.layout)}",
        ]
        if self.tables:
            listed = (f"{name} ({rows:,} rows)" for name, rows in self.tables.items())
            lines.append("tables: " + ", ".join(listed))
        lines.append(
            f"questions: {self.questions:,} (the full EgoSchema set has {FULL_SET_SIZE:,})"
        )
        lines.append(
            f"answers: {self.answers:,} (public: {SUBSET_SIZE:,}); "
            f"{self.hidden_answers:,} questions without a public answer"
        )
        done = [
            f"{n:,} {what}"
            for n, what in (
                (self.videos_extracted, "extracted"),
                (self.videos_linked, "linked"),
                (self.videos_copied, "copied"),
                (self.videos_skipped, "already there"),
            )
            if n
        ]
        lines.append(
            f"videos: {self.videos_present:,} present"
            + (f" ({', '.join(done)})" if done else "")
            + f", {len(self.videos_missing):,} missing"
        )
        if self.videos_missing:
            lines.append("  missing: " + _listing(self.videos_missing, max_listed))
        if self.ignored:
            lines.append(f"ignored: {self.ignored:,} videos / zip members (not .mp4 or unknown id)")
        if self.zips_removed:
            lines.append(f"zips removed: {', '.join(p.name for p in self.zips_removed)}")
        if self.zips_kept_reason:
            lines.append(f"zips kept: {self.zips_kept_reason}")
        if self.problems:
            lines.append(f"problems ({len(self.problems):,}):")
            lines.extend(f"  - {p}" for p in self.problems[:max_listed])
            if len(self.problems) > max_listed:
                lines.append(f"  ... and {len(self.problems) - max_listed:,} more")
        lines.append("status: OK" if self.ok else "status: FAILED (the tables disagree)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------
# Merging tables


def _merge(
    tables: list[_Table], answer_tables: list[_Answers], report: ImportReport, problems: list[str]
) -> tuple[dict[str, _Row], dict[str, int]]:
    """Questions (from the full-set tables, else the subset tables) and the answers all
    tables agree on. Every disagreement is reported; a conflicting answer is dropped."""

    def disagree(message: str) -> None:
        report.disagreements.append(message)
        report.problems.append(message)

    for message in problems:
        disagree(message)
    full = [t for t in tables if not t.subset]
    base = full or tables
    questions: dict[str, _Row] = {}
    origin: dict[str, str] = {}
    for table in base:
        for q_uid, row in table.rows.items():
            if q_uid not in questions:
                questions[q_uid] = row
                origin[q_uid] = table.name
    # Full-set tables (GENERATION, MC, MC_PPL, questions.json) must hold the same q_uids.
    for table in full[1:]:
        lacking = [q for q in full[0].rows if q not in table.rows]
        extra = [q for q in table.rows if q not in full[0].rows]
        if lacking:
            disagree(f"{table.name} lacks {len(lacking):,} q_uids of {full[0].name}: "
                     + _listing(lacking))
        if extra:
            disagree(f"{table.name} has {len(extra):,} q_uids not in {full[0].name}: "
                     + _listing(extra))
    # Every row must match the question it repeats (the subset against the full set, ...).
    for table in tables:
        unknown: list[str] = []
        differ: dict[str, list[str]] = {}
        for q_uid, row in table.rows.items():
            ref = questions.get(q_uid)
            if ref is None:
                unknown.append(q_uid)
            elif origin[q_uid] != table.name:
                if row.question != ref.question:
                    differ.setdefault(origin[q_uid] + "|question", []).append(q_uid)
                elif row.options != ref.options:
                    differ.setdefault(origin[q_uid] + "|options", []).append(q_uid)
        if unknown:
            names = ", ".join(t.name for t in base)
            disagree(f"{table.name}: {len(unknown):,} q_uids are not in the full set ({names}): "
                     + _listing(unknown))
        for key, ids in differ.items():
            other, what = key.split("|")
            disagree(f"{table.name} and {other} give a different {what} for {len(ids):,} "
                     f"q_uids: " + _listing(ids))
    # Answers: every table that has one must agree.
    seen: dict[str, dict[int, list[str]]] = {}
    for table in tables:
        for q_uid, row in table.rows.items():
            if row.answer is not None and q_uid in questions:
                seen.setdefault(q_uid, {}).setdefault(row.answer, []).append(table.name)
    for table in answer_tables:
        unknown = []
        for q_uid, raw in table.answers.items():
            try:
                answer = parse_answer(raw)
            except ValueError as exc:
                disagree(f"{table.name}: q_uid {q_uid}: answer {exc}")
                continue
            if q_uid not in questions:
                unknown.append(q_uid)
            elif answer is not None:
                seen.setdefault(q_uid, {}).setdefault(answer, []).append(table.name)
        if unknown:
            disagree(f"{table.name}: {len(unknown):,} answered q_uids are not among the "
                     f"questions: " + _listing(unknown))
    answers: dict[str, int] = {}
    for q_uid in questions:  # question order
        votes = seen.get(q_uid)
        if not votes:
            continue
        if len(votes) == 1:
            answers[q_uid] = next(iter(votes))
        else:
            given = "; ".join(f"{', '.join(names)}: {a}" for a, names in sorted(votes.items()))
            disagree(f"q_uid {q_uid}: the tables give different answers ({given}); "
                     "no answer written")
    return questions, answers


# ----------------------------------------------------------------------------------------
# Import


def import_egoschema(
    source: str | Path,
    target: str | Path,
    *,
    remove_zips: bool = False,
    progress: bool = True,
    link: bool = True,
) -> ImportReport:
    """Build the product's EgoSchema layout in `target` from `source` (see the module doc).

    remove_zips: delete the video zips once every question's video is in the target and has
        its zip member's size (otherwise they are kept and `zips_kept_reason` says why).
    progress: show a tqdm bar while extracting.
    link: hard-link (else symlink) videos that are already extracted instead of copying.

    Raises DatasetError for unreadable or malformed tables (naming the file), for a source
    with no recognisable layout, and when the disk lacks room for the videos to extract.
    """
    source, target = Path(source).expanduser(), Path(target).expanduser()
    if not source.is_dir():
        raise DatasetError(f"{source}: source folder does not exist")
    src_abs, tgt_abs = source.resolve(), target.resolve()
    exclude = tgt_abs if tgt_abs != src_abs and tgt_abs.is_relative_to(src_abs) else None
    found = _scan(src_abs, exclude)

    answer_problems: list[str] = []
    tables = _read_parquet_tables(found.parquet, src_abs, answer_problems)
    json_tables, answer_tables = _read_json_tables(found.json, answer_problems)
    if tables:
        layout = LAYOUT_HUB
    elif json_tables:
        beside = {t.path.parent for t in json_tables}
        layout = LAYOUT_FOLDER if any(v.parent in beside for v in found.videos) else LAYOUT_OFFICIAL
    else:
        seen = f"; found answers in {', '.join(a.name for a in answer_tables)} but no questions" \
            if answer_tables else ""
        raise DatasetError(
            f"{source}: no EgoSchema layout found{seen}. Looked for: parquet tables with "
            "'question', 'option' and 'video_idx'/'q_uid' columns (a Hugging Face copy of "
            f"{HUB_REPO_ID}, with videos_chunked_*.zip); a questions JSON (a list of "
            "{q_uid, question, option 0..option 4}) with a subset answers JSON ({q_uid: 0-4}) "
            "and the videos {q_uid}.mp4 in a folder (official repository), or beside them"
        )
    tables += json_tables
    known = {q for t in tables for q in t.rows}
    answer_tables = [a for a in answer_tables if _is_answers_table(a, known)]

    report = ImportReport(source=source, target=target, layout=layout)
    report.tables = {t.name: len(t.rows) for t in tables}
    report.tables.update({a.name: len(a.answers) for a in answer_tables})
    questions, answers = _merge(tables, answer_tables, report, answer_problems)
    if not questions:
        raise DatasetError(f"{source}: the tables hold no questions")

    # Where each video comes from: an extracted file (linked), else a zip member.
    files: dict[str, Path] = {}
    for path in found.videos:
        if path.stem in questions:
            files.setdefault(path.stem, path)
        else:
            report.ignored += 1
    members: dict[str, _Member] = {}
    video_zips: list[Path] = []
    for zip_path in found.zips:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            report.problems.append(f"{zip_path.name}: not a readable zip ({exc}); skipped")
            continue
        holds_videos = False
        for info in infos:
            if info.is_dir():
                continue
            if _unsafe_member(info.filename):
                report.problems.append(
                    f"{zip_path.name}: refused member {info.filename!r}: its path would land "
                    "outside the target folder"
                )
                continue
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.suffix.lower() != ".mp4" or name.stem not in questions:
                report.ignored += 1
                continue
            holds_videos = True
            members.setdefault(name.stem, _Member(zip_path, info))
        if holds_videos:
            video_zips.append(zip_path)

    videos_dir = target / "videos"
    to_place: list[tuple[str, Path]] = []
    to_extract: list[tuple[str, _Member]] = []
    for q_uid in questions:
        dst = videos_dir / f"{q_uid}.mp4"
        present = dst.is_file()
        if q_uid in files:
            src = files[q_uid]
            if present and (os.path.samefile(src, dst) or dst.stat().st_size == src.stat().st_size):
                report.videos_skipped += 1
            else:
                to_place.append((q_uid, src))
        elif q_uid in members:
            if present and dst.stat().st_size == members[q_uid].info.file_size:
                report.videos_skipped += 1
            else:
                to_extract.append((q_uid, members[q_uid]))

    # Check the room before writing anything: links need none, copies and extraction do.
    needed = sum(m.info.file_size for _, m in to_extract)
    if not link:
        needed += sum(src.stat().st_size for _, src in to_place)
    free = shutil.disk_usage(_existing_ancestor(videos_dir)).free
    if needed > free:
        raise DatasetError(
            f"{videos_dir}: not enough free disk space: {len(to_extract) + len(to_place):,} "
            f"videos need {_gib(needed)} ({needed:,} bytes) but only {_gib(free)} "
            f"({free:,} bytes) are free"
        )

    videos_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for row in questions.values():
        entry: dict[str, str] = {"q_uid": row.q_uid, "question": row.question}
        entry.update({f"option {j}": o for j, o in enumerate(row.options)})
        if row.google_drive_id:
            entry["google_drive_id"] = row.google_drive_id
        entries.append(entry)
    _write_json_atomic(target / "questions.json", entries)
    _write_json_atomic(target / "subset_answers.json", answers)
    report.questions, report.answers = len(questions), len(answers)
    report.hidden_answers = len(questions) - len(answers)

    for q_uid, src in to_place:
        if _place(src, videos_dir / f"{q_uid}.mp4", link) == "linked":
            report.videos_linked += 1
        else:
            report.videos_copied += 1
    _extract(to_extract, videos_dir, progress, report)

    report.videos_missing = [q for q in questions if not (videos_dir / f"{q}.mp4").is_file()]
    report.videos_present = len(questions) - len(report.videos_missing)
    if remove_zips:
        _remove_zips(video_zips, members, videos_dir, report)
    return report


# ----------------------------------------------------------------------------------------
# Hugging Face hub


def snapshot_patterns(videos: bool) -> list[str]:
    """`allow_patterns` for `huggingface_hub.snapshot_download` of the hub repo: the card and
    the parquet tables first (small), the video zips (about 105 GB) only when asked.
    huggingface_hub matches `*` across folders, so "*.parquet" takes every config."""
    patterns = ["README.md", "*.parquet"]
    return patterns + ["*.zip"] if videos else patterns


def download_and_import(
    repo_id: str,
    cache_dir: str | Path,
    target: str | Path,
    videos: bool = False,
    *,
    remove_zips: bool = False,
    progress: bool = True,
    link: bool = True,
) -> ImportReport:
    """Download the hub repo into `cache_dir` (resumable, needs network), then import it:
    the tables first (small: a wrong repo fails in seconds), the video zips after, if asked."""
    from huggingface_hub import snapshot_download

    for patterns in ([snapshot_patterns(False)] + ([["*.zip"]] if videos else [])):
        local = snapshot_download(
            repo_id=repo_id,
            repo_type="dataset",
            allow_patterns=patterns,
            local_dir=str(cache_dir),
        )
    return import_egoschema(
        Path(local), target, remove_zips=remove_zips, progress=progress, link=link
    )
