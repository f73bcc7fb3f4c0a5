"""EgoSchema loading and validation; folder-tree archives; the demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import DatasetSettings
from pipeline.datasets import find_videos, load_dataset, load_egoschema
from pipeline.demo_data import generate_demo_dataset
from pipeline.errors import DatasetError


def _entry(q_uid: str, n_options: int = 5) -> dict:
    entry = {"q_uid": q_uid, "question": f"What happens in {q_uid}?", "google_drive_id": "x"}
    entry.update({f"option {j}": f"answer {j}" for j in range(n_options)})
    return entry


def _write(root: Path, entries, answers=None, videos=()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "questions.json").write_text(json.dumps(entries))
    if answers is not None:
        (root / "subset_answers.json").write_text(json.dumps(answers))
    for vid in videos:
        (root / "videos").mkdir(exist_ok=True)
        (root / "videos" / f"{vid}.mp4").write_bytes(b"not decoded here")
    return root


def test_egoschema_layout_loads_questions_answers_and_videos(tmp_path: Path):
    root = _write(tmp_path / "ego", [_entry("a1"), _entry("b2")], {"a1": 3}, videos=["a1", "b2"])
    ds = load_egoschema(root)
    assert [q.q_uid for q in ds.questions] == ["a1", "b2"]
    assert ds.questions[0].options == tuple(f"answer {j}" for j in range(5))
    assert ds.questions[0].answer == 3
    assert ds.questions[1].answer is None
    assert ds.videos["a1"].path == root / "videos" / "a1.mp4"
    assert ds.missing_videos == []


def test_subset_only_keeps_questions_with_public_answers(tmp_path: Path):
    root = _write(tmp_path / "ego", [_entry("a1"), _entry("b2")], {"b2": 0}, videos=["a1", "b2"])
    ds = load_egoschema(root, subset_only=True)
    assert [q.q_uid for q in ds.questions] == ["b2"]


def test_missing_video_is_reported_and_the_rest_go_on(tmp_path: Path, caplog):
    root = _write(tmp_path / "ego", [_entry("a1"), _entry("b2")], videos=["a1"])
    ds = load_egoschema(root)
    assert ds.missing_videos == ["b2"]
    assert [q.q_uid for q in ds.answerable()] == ["a1"]
    assert "1 of 2 videos missing" in caplog.text and "b2" in caplog.text


def test_malformed_json_names_file_and_position(tmp_path: Path):
    root = tmp_path / "ego"
    root.mkdir()
    (root / "questions.json").write_text('[{"q_uid": "a1",,}]')
    with pytest.raises(DatasetError, match=r"questions.json: malformed JSON at line 1 column"):
        load_egoschema(root)


def test_validation_lists_every_offending_item(tmp_path: Path):
    bad_missing_field = _entry("m1")
    del bad_missing_field["question"]
    entries = [
        _entry("ok"),
        _entry("ok"),  # duplicate
        _entry("../escape"),  # not a plain name
        _entry("sub/dir"),
        _entry("four", n_options=4),
        _entry("six", n_options=6),
        bad_missing_field,
        {"question": "no id", **{f"option {j}": "x" for j in range(5)}},
        "not an object",
    ]
    root = _write(tmp_path / "ego", entries)
    with pytest.raises(DatasetError) as info:
        load_egoschema(root)
    message = str(info.value)
    assert "questions.json: 8 invalid item(s)" in message
    assert "item 1 (q_uid 'ok'): duplicate q_uid, first at item 0" in message
    assert "item 2 (q_uid '../escape'): 'q_uid' is not a plain name" in message
    assert "item 3 (q_uid 'sub/dir'): 'q_uid' is not a plain name" in message
    assert "item 4 (q_uid 'four'): expected exactly 5 options" in message and "got 4" in message
    assert "item 5 (q_uid 'six'): expected exactly 5 options" in message and "got 6" in message
    assert "item 6 (q_uid 'm1'): missing or empty 'question'" in message
    assert "item 7: missing or empty 'q_uid'" in message
    assert "item 8: expected an object, got str" in message


def test_bad_answers_file_is_named(tmp_path: Path):
    root = _write(tmp_path / "ego", [_entry("a1")], {"a1": 7, "zz": 1})
    with pytest.raises(DatasetError) as info:
        load_egoschema(root)
    assert "subset_answers.json" in str(info.value)
    assert "q_uid 'a1': answer 7 is not an integer 0-4" in str(info.value)
    assert "q_uid 'zz': not in questions.json" in str(info.value)


def test_top_level_must_be_a_list(tmp_path: Path):
    root = _write(tmp_path / "ego", {"q_uid": "a"})
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_egoschema(root)


def test_load_dataset_by_name_by_path_and_unknown(tmp_path: Path):
    root = _write(tmp_path / "ego", [_entry("a1")], videos=["a1"])
    registered = {"mine": DatasetSettings(root=str(root))}
    assert load_dataset("mine", registered).name == "mine"
    assert load_dataset(str(root), registered).questions[0].q_uid == "a1"
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'.*mine"):
        load_dataset("nope", registered)
    empty = {"ego": DatasetSettings(root=str(tmp_path / "absent"))}
    with pytest.raises(DatasetError, match=r"questions.json not found.*download=true"):
        load_dataset("ego", empty)


def test_folder_archive_finds_videos_recursively(tmp_path: Path):
    for rel in ["a/one.mp4", "a/b/two.MKV", "three.webm", "notes.txt", "c/four.mov"]:
        path = tmp_path / "arch" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    items = find_videos(tmp_path / "arch")
    assert sorted(i.video_id for i in items) == ["a/b/two", "a/one", "c/four", "three"]
    archive = DatasetSettings(format="folder", root=str(tmp_path / "arch"))
    ds = load_dataset("arch", {"arch": archive})
    assert len(ds.videos) == 4 and ds.questions == []
    with pytest.raises(DatasetError, match="no such file or folder"):
        find_videos(tmp_path / "missing")


def test_demo_dataset_is_valid_egoschema_and_reproducible(tmp_path: Path):
    import decord

    a = generate_demo_dataset(tmp_path / "a", num_videos=2, seconds=4, fps=5)
    b = generate_demo_dataset(tmp_path / "b", num_videos=2, seconds=4, fps=5)
    ds = load_egoschema(a)
    assert len(ds.questions) == 2 and not ds.missing_videos
    assert all(q.answer is not None for q in ds.questions)
    assert (a / "questions.json").read_text() == (b / "questions.json").read_text()
    reader = decord.VideoReader(str(ds.videos["demo-000"].path))
    assert len(reader) == 20 and reader[0].shape == (144, 144, 3)  # square: no distortion at 336
    del reader
    # A second call with the same settings reuses the files.
    mtime = (a / "questions.json").stat().st_mtime_ns
    generate_demo_dataset(a, num_videos=2, seconds=4, fps=5)
    assert (a / "questions.json").stat().st_mtime_ns == mtime
