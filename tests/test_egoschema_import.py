"""Tests for the EgoSchema importer: every source layout is built here (tiny PyAV videos,
parquet tables in the hub's column layout, zips), never downloaded or committed."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import egoschema_import
from pipeline.datasets import load_egoschema
from pipeline.egoschema_import import (
    LAYOUT_FOLDER,
    LAYOUT_HUB,
    LAYOUT_OFFICIAL,
    download_and_import,
    import_egoschema,
    parse_answer,
    snapshot_patterns,
    strip_option_letters,
)
from pipeline.errors import DatasetError
from pipeline.synth import write_video

UIDS = [f"{i:08x}-81bd-4cd8-a574-{i:012x}" for i in range(1, 7)]
LETTERS = "ABCDE"


# ----------------------------------------------------------------------------------------
# Fixture builders


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[bytes]:
    """Three distinct tiny H.264 clips (64x48, a few frames) of different sizes."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("clips")
    out = []
    for k in range(3):
        frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2 + 2 * k)]
        out.append(write_video(folder / f"{k}.mp4", frames, fps=5).read_bytes())
    assert len({len(c) for c in out}) == 3
    return out


def clip_for(clips: list[bytes], uid: str) -> bytes:
    return clips[UIDS.index(uid) % len(clips)]


def question(uid: str) -> str:
    return f"What does c do in video {uid[:8]}?"


def plain_options(uid: str) -> list[str]:
    return [f"C does thing {j} in {uid[:8]}." for j in range(5)]


def lettered(options: list[str]) -> list[str]:
    return [f"{letter}. {o}" for letter, o in zip(LETTERS, options, strict=True)]


def hub_rows(uids: list[str], answers: list[object]) -> pd.DataFrame:
    """Rows in the hub's column layout: question_idx, question, video_idx, option (lettered
    "A. ..."), answer."""
    return pd.DataFrame(
        {
            "question_idx": [str(UIDS.index(u)) for u in uids],
            "question": [question(u) for u in uids],
            "video_idx": uids,
            "option": [lettered(plain_options(u)) for u in uids],
            "answer": answers,
        }
    )


def write_parquet(root: Path, config: str, frame: pd.DataFrame) -> Path:
    path = root / config / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)
    return path


def write_zip(path: Path, members: dict[str, bytes], stored: bool = False) -> Path:
    compression = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


SUBSET_ANSWERS = {UIDS[0]: "2", UIDS[1]: "0", UIDS[2]: "4"}  # string indices, as on the hub


def make_hub(
    root: Path,
    clips: list[bytes],
    *,
    uids: list[str] | None = None,
    zipped: list[str] | None = None,
    subset_answers: dict[str, object] | None = None,
) -> Path:
    """A local copy of lmms-lab/egoschema: GENERATION (answers ""), MC (answers None),
    Subset (public answers as strings), README.md, and two video zips with members
    videos/{video_idx}.mp4 plus a non-video and an unknown id."""
    uids = UIDS[:5] if uids is None else uids
    zipped = uids[:4] if zipped is None else zipped
    subset_answers = SUBSET_ANSWERS if subset_answers is None else subset_answers
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    write_parquet(root, "GENERATION", hub_rows(uids, [""] * len(uids)))
    write_parquet(root, "MC", hub_rows(uids, [None] * len(uids)))
    subset = list(subset_answers)
    write_parquet(root, "Subset", hub_rows(subset, list(subset_answers.values())))
    half = len(zipped) // 2
    write_zip(root / "videos_chunked_01.zip",
              {f"videos/{u}.mp4": clip_for(clips, u) for u in zipped[:half]})
    write_zip(
        root / "videos_chunked_02.zip",
        {
            **{f"videos/{u}.mp4": clip_for(clips, u) for u in zipped[half:]},
            "videos/notes.txt": b"not a video",
            "videos/ffffffff-0000-0000-0000-000000000000.mp4": clips[0],
        },
    )
    return root


def make_official(
    root: Path,
    clips: list[bytes],
    *,
    uids: list[str] | None = None,
    answers: dict[str, object] | None = None,
    video_dir: str | None = "good_clips_git",
    questions_name: str = "questions.json",
    answers_name: str = "subset_answers.json",
    with_videos: list[str] | None = None,
) -> Path:
    """The official repository's files: questions.json (with google_drive_id),
    subset_answers.json, an unrelated uid_to_ego4d.json, and the clips {q_uid}.mp4 in
    `video_dir` (None: beside the JSON files)."""
    uids = UIDS[:4] if uids is None else uids
    answers = {UIDS[0]: 3, UIDS[1]: 1} if answers is None else answers
    root.mkdir(parents=True, exist_ok=True)
    entries = [
        {"q_uid": u, "google_drive_id": f"drive-{u[:8]}", "question": question(u),
         **{f"option {j}": o for j, o in enumerate(plain_options(u))}}
        for u in uids
    ]
    (root / questions_name).write_text(json.dumps(entries))
    (root / answers_name).write_text(json.dumps(answers))
    (root / "uid_to_ego4d.json").write_text(
        json.dumps({u: {"video_uid": "x", "starting_sec": 0, "ending_sec": 180} for u in uids})
    )
    folder = root / video_dir if video_dir else root
    folder.mkdir(exist_ok=True)
    for u in uids if with_videos is None else with_videos:
        (folder / f"{u}.mp4").write_bytes(clip_for(clips, u))
    return root


def corrupt_member(zip_path: Path, member: str) -> None:
    """Flip bytes in the middle of a stored member's data (its CRC-32 no longer matches)."""
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(member)
    with open(zip_path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start + info.compress_size // 2)
        chunk = f.read(16)
        f.seek(start + info.compress_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def read_json(path: Path):
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------
# Options and answers


@pytest.mark.parametrize(
    "options",
    [
        [f"{L}. text {L}" for L in LETTERS],
        [f"({L}) text {L}" for L in LETTERS],
        [f"{L}: text {L}" for L in LETTERS],
        [f" {L}.text {L} " for L in LETTERS],
    ],
)
def test_option_letters_are_stripped_when_all_five_carry_theirs(options):
    assert strip_option_letters(options) == [f"text {L}" for L in LETTERS]


@pytest.mark.parametrize(
    "options",
    [
        ["B. one", "A. two", "C. three", "D. four", "E. five"],  # out of order
        ["A. one", "B. two", "three", "D. four", "E. five"],  # one has no letter
        ["C stops scrolling.", "B. two", "C. three", "D. four", "E. five"],
        ["A. one", "B. two", "C. three", "D. four"],  # four options
    ],
)
def test_option_letters_are_kept_unless_consistent(options):
    assert strip_option_letters(options) == [o.strip() for o in options]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2), (" 4 ", 4), ("C", 2), ("(B)", 1), ("e.", 4), (3, 3), (np.int64(0), 0),
        (2.0, 2), ("", None), (None, None), (float("nan"), None), (-1, None), ("-1", None),
        ("None", None),
    ],
)
def test_parse_answer(value, expected):
    assert parse_answer(value) == expected


@pytest.mark.parametrize("value", ["7", 5, -2, "banana", True, 1.5, [1]])
def test_parse_answer_rejects(value):
    with pytest.raises(ValueError):
        parse_answer(value)


# ----------------------------------------------------------------------------------------
# Hub layout


def test_hub_layout_end_to_end(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips)
    target = tmp_path / "out"
    report = import_egoschema(source, target, progress=True)

    assert report.layout == LAYOUT_HUB
    assert report.ok, report.problems
    assert report.tables == {"GENERATION": 5, "MC": 5, "Subset": 3}
    assert (report.questions, report.answers, report.hidden_answers) == (5, 3, 2)
    assert (report.videos_present, report.videos_extracted) == (4, 4)
    assert report.videos_missing == [UIDS[4]]
    assert report.ignored == 2  # notes.txt and the unknown id
    assert report.problems == []

    entries = read_json(target / "questions.json")
    assert [e["q_uid"] for e in entries] == UIDS[:5]
    assert entries[0]["question"] == question(UIDS[0])
    assert [entries[0][f"option {j}"] for j in range(5)] == plain_options(UIDS[0])  # no "A. "
    answers = read_json(target / "subset_answers.json")
    assert answers == {UIDS[0]: 2, UIDS[1]: 0, UIDS[2]: 4}  # ints; hidden ones left out
    for uid in UIDS[:4]:
        assert (target / "videos" / f"{uid}.mp4").read_bytes() == clip_for(clips, uid)
    assert not (target / "videos" / "ffffffff-0000-0000-0000-000000000000.mp4").exists()
    assert not list((target / "videos").glob(".*"))  # no temporary files left

    dataset = load_egoschema(target)
    assert len(dataset.questions) == 5
    assert dataset.questions[0].options == tuple(plain_options(UIDS[0]))
    assert {q.q_uid: q.answer for q in dataset.questions if q.answer is not None} == answers
    assert dataset.missing_videos == [UIDS[4]]
    assert len(dataset.answerable()) == 4

    text = report.summary()
    assert "questions: 5 " in text and "answers: 3 " in text
    assert "4 present (4 extracted), 1 missing" in text
    assert f"missing: {UIDS[4]}" in text
    assert "status: OK" in text


def test_hub_letter_answers_and_parquet_converter_paths(tmp_path, clips):
    """Answers given as letters, tables in the parquet converter's CONFIG/test/0000.parquet."""
    source = tmp_path / "hub"
    for config, frame in (
        ("MC", hub_rows(UIDS[:3], [None, None, None])),
        ("Subset", hub_rows(UIDS[:2], ["D", "A"])),
    ):
        path = source / config / "test" / "0000.parquet"
        path.parent.mkdir(parents=True)
        frame.to_parquet(path)
    report = import_egoschema(source, tmp_path / "out", progress=False)
    assert report.ok and report.tables == {"MC": 3, "Subset": 2}
    assert read_json(tmp_path / "out" / "subset_answers.json") == {UIDS[0]: 3, UIDS[1]: 0}
    assert report.videos_missing == UIDS[:3]


def test_broken_zip_member_is_reported_and_the_rest_extracted(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips, zipped=[])
    broken = f"videos/{UIDS[1]}.mp4"
    zip_path = write_zip(
        source / "videos_chunked_03.zip",
        {f"videos/{u}.mp4": clip_for(clips, u) for u in UIDS[:3]},
        stored=True,
    )
    corrupt_member(zip_path, broken)
    report = import_egoschema(source, tmp_path / "out", progress=False)

    assert report.videos_extracted == 2
    assert report.videos_missing == [UIDS[1], UIDS[3], UIDS[4]]
    assert len(report.problems) == 1 and broken in report.problems[0]
    assert "broken member" in report.problems[0]
    assert report.ok  # a broken member is a problem, not a disagreement between tables
    videos = tmp_path / "out" / "videos"
    assert not (videos / f"{UIDS[1]}.mp4").exists()
    assert not list(videos.glob(".*"))
    for uid in (UIDS[0], UIDS[2]):
        assert (videos / f"{uid}.mp4").read_bytes() == clip_for(clips, uid)


def test_unreadable_zip_is_reported(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips)
    (source / "videos_chunked_09.zip").write_bytes(b"PK\x03\x04 truncated")
    report = import_egoschema(source, tmp_path / "out", progress=False)
    assert report.videos_present == 4
    assert any("videos_chunked_09.zip" in p and "not a readable zip" in p for p in report.problems)


def test_zip_members_outside_the_target_are_refused(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips, zipped=[UIDS[1]])
    evil = ["../evil.mp4", f"../{UIDS[0]}.mp4", "/tmp/abs-evil.mp4", "videos/../../up.mp4",
            "C:\\windows\\drive.mp4"]
    write_zip(source / "videos_chunked_03.zip", {name: clips[0] for name in evil})
    target = tmp_path / "deep" / "out"
    report = import_egoschema(source, target, progress=False)

    refused = [p for p in report.problems if "refused member" in p]
    assert len(refused) == len(evil)
    for name in evil:
        assert any(repr(name) in p for p in refused), name
    assert report.ok
    # UIDS[0] came only through a refused path: it is missing, not extracted anywhere.
    assert UIDS[0] in report.videos_missing
    assert sorted(p.name for p in (target / "videos").iterdir()) == [f"{UIDS[1]}.mp4"]
    stray = [p for p in tmp_path.rglob("*.mp4") if "evil" in p.name or p.name == "up.mp4"]
    assert stray == []
    assert not Path("/tmp/abs-evil.mp4").exists()


def test_reimport_skips_present_videos(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips)
    target = tmp_path / "out"
    first = import_egoschema(source, target, progress=False)
    assert first.videos_extracted == 4
    videos = sorted((target / "videos").glob("*.mp4"))
    stamps = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in videos}

    second = import_egoschema(source, target, progress=False)
    assert (second.videos_extracted, second.videos_skipped, second.videos_present) == (0, 4, 4)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in videos} == stamps

    # A half-written video (wrong size) is extracted again; the others stay untouched.
    (target / "videos" / f"{UIDS[2]}.mp4").write_bytes(b"half")
    third = import_egoschema(source, target, progress=False)
    assert (third.videos_extracted, third.videos_skipped) == (1, 3)
    assert (target / "videos" / f"{UIDS[2]}.mp4").read_bytes() == clip_for(clips, UIDS[2])


def test_remove_zips_keeps_them_while_a_video_is_missing(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips)  # UIDS[4] is in no zip
    report = import_egoschema(source, tmp_path / "out", remove_zips=True, progress=False)
    assert report.zips_removed == []
    assert report.zips_kept_reason == "1 video of the questions is missing"
    assert sorted(p.name for p in source.glob("*.zip")) == [
        "videos_chunked_01.zip", "videos_chunked_02.zip",
    ]
    assert "zips kept: 1 video of the questions is missing" in report.summary()


def test_remove_zips_once_all_videos_are_verified(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips, zipped=UIDS[:5])
    target = tmp_path / "out"
    unrelated = write_zip(source / "other.zip", {"readme.txt": b"keep me"})
    report = import_egoschema(source, target, remove_zips=True, progress=False)
    assert report.videos_missing == [] and report.zips_kept_reason is None
    assert sorted(p.name for p in report.zips_removed) == [
        "videos_chunked_01.zip", "videos_chunked_02.zip",
    ]
    assert sorted(p.name for p in source.glob("*.zip")) == [unrelated.name]  # not a video zip
    # The videos stay, and importing again from the source without zips still finds them.
    again = import_egoschema(source, target, progress=False)
    assert (again.videos_present, again.videos_extracted, again.videos_missing) == (5, 0, [])
    assert len(load_egoschema(target).answerable()) == 5


def test_remove_zips_frees_hub_cache_blobs(tmp_path, clips):
    """In a huggingface_hub cache the zips are symlinks to blobs: both go."""
    source = make_hub(tmp_path / "hub", clips, zipped=UIDS[:5])
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for zip_path in sorted(source.glob("*.zip")):
        blob = blobs / f"sha-{zip_path.stem}"
        zip_path.rename(blob)
        zip_path.symlink_to(blob)
    report = import_egoschema(source, tmp_path / "out", remove_zips=True, progress=False)
    assert len(report.zips_removed) == 2 and report.videos_extracted == 5
    assert list(source.glob("*.zip")) == [] and list(blobs.iterdir()) == []


def test_remove_zips_refuses_when_a_video_differs_from_its_member(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips, zipped=UIDS[:5])
    (source / "extracted").mkdir()
    # An already-extracted copy that is not the zip's video: it is linked, not verified.
    (source / "extracted" / f"{UIDS[0]}.mp4").write_bytes(b"something else")
    report = import_egoschema(source, tmp_path / "out", remove_zips=True, progress=False)
    assert report.videos_missing == [] and report.zips_removed == []
    assert report.zips_kept_reason is not None and UIDS[0] in report.zips_kept_reason
    assert len(list(source.glob("videos_chunked_*.zip"))) == 2


def test_disk_space_is_checked_before_writing(tmp_path, clips, monkeypatch):
    source = make_hub(tmp_path / "hub", clips)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(egoschema_import.shutil, "disk_usage", lambda path: usage(100, 90, 10))
    needed = sum(len(clip_for(clips, u)) for u in UIDS[:4])
    with pytest.raises(DatasetError) as err:
        import_egoschema(source, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "not enough free disk space" in message
    assert f"{needed:,} bytes" in message and "(10 bytes) are free" in message
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------
# Official and folder layouts


def test_official_layout_links_videos(tmp_path, clips):
    source = make_official(tmp_path / "EgoSchema", clips)
    (source / "benchmarking").mkdir()
    (source / "benchmarking" / "args.json").write_text(json.dumps({"size_option": 5}))
    target = tmp_path / "out"
    report = import_egoschema(source, target, progress=False)

    assert report.layout == LAYOUT_OFFICIAL and report.ok
    assert report.tables == {"questions.json": 4, "subset_answers.json": 2}
    assert (report.questions, report.answers, report.videos_linked) == (4, 2, 4)
    assert report.videos_copied == 0
    for uid in UIDS[:4]:
        dst, src = target / "videos" / f"{uid}.mp4", source / "good_clips_git" / f"{uid}.mp4"
        assert os.path.samefile(dst, src)  # a hard link (or a symlink), not a copy
    entries = read_json(target / "questions.json")
    assert entries[0]["google_drive_id"] == f"drive-{UIDS[0][:8]}"
    assert read_json(target / "subset_answers.json") == {UIDS[0]: 3, UIDS[1]: 1}
    assert len(load_egoschema(target).answerable()) == 4

    again = import_egoschema(source, target, progress=False)
    assert (again.videos_linked, again.videos_skipped) == (0, 4)


def test_symlinked_video_folder_is_followed(tmp_path, clips):
    elsewhere = tmp_path / "disk2" / "clips"
    elsewhere.mkdir(parents=True)
    for uid in UIDS[:4]:
        (elsewhere / f"{uid}.mp4").write_bytes(clip_for(clips, uid))
    source = make_official(tmp_path / "EgoSchema", clips, video_dir=None, with_videos=[])
    (source / "videos").symlink_to(elsewhere, target_is_directory=True)
    (source / "loop").symlink_to(source, target_is_directory=True)  # walked once, not forever
    report = import_egoschema(source, tmp_path / "out", progress=False)
    assert report.layout == LAYOUT_OFFICIAL and report.tables["questions.json"] == 4
    assert (report.videos_present, report.videos_linked) == (4, 4)


def test_official_layout_copies_when_not_linking(tmp_path, clips):
    source = make_official(tmp_path / "EgoSchema", clips, video_dir="videos")
    target = tmp_path / "out"
    report = import_egoschema(source, target, link=False, progress=False)
    assert (report.videos_copied, report.videos_linked) == (4, 0)
    for uid in UIDS[:4]:
        dst = target / "videos" / f"{uid}.mp4"
        assert not os.path.samefile(dst, source / "videos" / f"{uid}.mp4")
        assert not dst.is_symlink() and dst.read_bytes() == clip_for(clips, uid)


def test_folder_layout(tmp_path, clips):
    source = make_official(
        tmp_path / "clips", clips, video_dir=None, questions_name="egoschema_q.json",
        answers_name="answers_500.json", with_videos=UIDS[:3],
    )
    (source / "holiday.mp4").write_bytes(clips[0])  # not a question's video
    report = import_egoschema(source, tmp_path / "out", progress=False)
    assert report.layout == LAYOUT_FOLDER and report.ok
    assert report.videos_missing == [UIDS[3]] and report.videos_present == 3
    assert report.ignored == 1
    dataset = load_egoschema(tmp_path / "out")
    assert [q.q_uid for q in dataset.answerable()] == UIDS[:3]


def test_missing_videos_are_listed_and_capped(tmp_path, clips):
    uids = [f"{i:04d}0000-aaaa-4bbb-8ccc-000000000000" for i in range(30)]
    source = tmp_path / "EgoSchema"
    source.mkdir()
    entries = [{"q_uid": u, "question": f"q {u}", **{f"option {j}": f"o{j}" for j in range(5)}}
               for u in uids]
    (source / "questions.json").write_text(json.dumps(entries))
    report = import_egoschema(source, tmp_path / "out", remove_zips=True, progress=False)
    assert report.videos_missing == uids and report.videos_present == 0
    assert report.zips_kept_reason == "no video zips in the source"
    text = report.summary(max_listed=5)
    assert ", ".join(uids[:5]) + " ... and 25 more" in text
    assert uids[5] not in text


# ----------------------------------------------------------------------------------------
# Tables that disagree


def test_answers_file_disagreeing_with_the_questions(tmp_path, clips):
    stranger = "99999999-0000-0000-0000-000000000000"
    source = make_official(
        tmp_path / "EgoSchema", clips, answers={UIDS[0]: 3, UIDS[1]: 7, stranger: 2}
    )
    report = import_egoschema(source, tmp_path / "out", progress=False)
    assert not report.ok
    assert any(UIDS[1] in p and "out of range" in p for p in report.disagreements)
    assert any(stranger in p and "not among the questions" in p for p in report.disagreements)
    assert set(report.disagreements) <= set(report.problems)
    assert "status: FAILED" in report.summary()
    # What is consistent is still written, and loads.
    assert read_json(tmp_path / "out" / "subset_answers.json") == {UIDS[0]: 3}
    assert len(load_egoschema(tmp_path / "out").questions) == 4


def test_subset_table_disagreeing_with_the_full_set(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips)
    subset = hub_rows(UIDS[:3], ["2", "0", "4"])
    subset.loc[1, "question"] = "A question that the full set does not have?"
    extra = hub_rows([UIDS[5]], ["1"])
    write_parquet(source, "Subset", pd.concat([subset, extra], ignore_index=True))
    report = import_egoschema(source, tmp_path / "out", progress=False)
    assert not report.ok
    assert any(
        "Subset and GENERATION give a different question" in p and UIDS[1] in p
        for p in report.problems
    )
    assert any("not in the full set" in p and UIDS[5] in p for p in report.problems)
    # The full set's version is written; the stray subset row is not added.
    entries = read_json(tmp_path / "out" / "questions.json")
    assert [e["q_uid"] for e in entries] == UIDS[:5]
    assert entries[1]["question"] == question(UIDS[1])


def test_full_set_tables_must_hold_the_same_questions(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips)
    write_parquet(source, "MC", hub_rows(UIDS[:4], [None] * 4))
    report = import_egoschema(source, tmp_path / "out", progress=False)
    assert not report.ok
    assert any(p.startswith("MC lacks 1 q_uids of GENERATION") and UIDS[4] in p
               for p in report.problems)


def test_hub_answers_disagreeing_with_an_answers_file(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips)
    # The official answers file dropped beside the hub tables: one answer differs.
    (source / "subset_answers.json").write_text(json.dumps({UIDS[0]: 2, UIDS[1]: 3}))
    report = import_egoschema(source, tmp_path / "out", progress=False)
    assert report.layout == LAYOUT_HUB
    assert not report.ok
    assert any(UIDS[1] in p and "different answers" in p for p in report.problems)
    # The conflicting answer is dropped; the agreeing ones stay.
    assert read_json(tmp_path / "out" / "subset_answers.json") == {UIDS[0]: 2, UIDS[2]: 4}


def test_unreadable_hub_answer_is_a_disagreement(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips, subset_answers={UIDS[0]: "2", UIDS[1]: "Z"})
    report = import_egoschema(source, tmp_path / "out", progress=False)
    assert not report.ok
    assert any("Subset" in p and UIDS[1] in p for p in report.disagreements)
    assert read_json(tmp_path / "out" / "subset_answers.json") == {UIDS[0]: 2}


# ----------------------------------------------------------------------------------------
# Bad input


def test_source_without_a_layout(tmp_path):
    source = tmp_path / "empty"
    source.mkdir()
    (source / "notes.txt").write_text("hello")
    (source / "config.json").write_text(json.dumps({"a": {"b": 1}}))
    with pytest.raises(DatasetError) as err:
        import_egoschema(source, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "no EgoSchema layout found" in message and "Looked for" in message
    assert "parquet" in message and "questions JSON" in message
    with pytest.raises(DatasetError, match="does not exist"):
        import_egoschema(tmp_path / "nowhere", tmp_path / "out")


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "hub" / "GENERATION" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match="not a readable parquet table") as err:
        import_egoschema(tmp_path / "hub", tmp_path / "out", progress=False)
    assert str(path) in str(err.value)


def test_parquet_without_an_id_column(tmp_path):
    frame = hub_rows(UIDS[:2], ["", ""]).drop(columns=["video_idx", "question_idx"])
    path = write_parquet(tmp_path / "hub", "GENERATION", frame)
    with pytest.raises(DatasetError, match="no id column") as err:
        import_egoschema(tmp_path / "hub", tmp_path / "out", progress=False)
    assert str(path) in str(err.value)


def test_parquet_rows_with_wrong_options(tmp_path):
    frame = hub_rows(UIDS[:2], ["", ""])
    frame.at[1, "option"] = ["A. one", "B. two", "C. three", "D. four"]
    path = write_parquet(tmp_path / "hub", "GENERATION", frame)
    with pytest.raises(DatasetError) as err:
        import_egoschema(tmp_path / "hub", tmp_path / "out", progress=False)
    message = str(err.value)
    assert str(path) in message and UIDS[1] in message and "expected 5 options, got 4" in message


def test_malformed_questions_json(tmp_path):
    source = tmp_path / "EgoSchema"
    source.mkdir()
    (source / "questions.json").write_text('[{"q_uid": "a", ')
    with pytest.raises(DatasetError, match="malformed JSON") as err:
        import_egoschema(source, tmp_path / "out", progress=False)
    assert "questions.json" in str(err.value)


# ----------------------------------------------------------------------------------------
# Hugging Face hub helpers (no network: snapshot_download is replaced)

HUB_FILES = [
    ".gitattributes", "README.md",
    "GENERATION/test-00000-of-00001.parquet", "MC/test-00000-of-00001.parquet",
    "MC_PPL/test-00000-of-00001.parquet", "Subset/test-00000-of-00001.parquet",
    *[f"videos_chunked_{i:02d}.zip" for i in range(1, 6)],
]


def test_snapshot_patterns_select_tables_then_videos():
    from huggingface_hub.utils import filter_repo_objects

    tables = list(filter_repo_objects(HUB_FILES, allow_patterns=snapshot_patterns(False)))
    assert tables == HUB_FILES[1:6]
    everything = list(filter_repo_objects(HUB_FILES, allow_patterns=snapshot_patterns(True)))
    assert everything == HUB_FILES[1:]
    assert snapshot_patterns(True)[: len(snapshot_patterns(False))] == snapshot_patterns(False)


def test_download_and_import_calls_snapshot_download(tmp_path, clips, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        make_hub(Path(kwargs["local_dir"]), clips)
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    report = download_and_import(
        "lmms-lab/egoschema", tmp_path / "cache", tmp_path / "out", videos=True, progress=False
    )
    # The tables first (a wrong repo fails in seconds), then the video zips.
    assert calls == [{
        "repo_id": "lmms-lab/egoschema", "repo_type": "dataset",
        "allow_patterns": patterns, "local_dir": str(tmp_path / "cache"),
    } for patterns in (snapshot_patterns(False), ["*.zip"])]
    assert set(snapshot_patterns(True)) == {*snapshot_patterns(False), "*.zip"}
    assert report.layout == LAYOUT_HUB and report.videos_present == 4


def test_target_inside_the_source(tmp_path, clips):
    source = make_hub(tmp_path / "hub", clips)
    target = source / "imported"
    first = import_egoschema(source, target, progress=False)
    second = import_egoschema(source, target, progress=False)  # its own output is not a source
    assert first.ok and second.ok and second.tables == first.tables
    assert (second.videos_skipped, second.ignored) == (4, 2)
    shutil.rmtree(target)
