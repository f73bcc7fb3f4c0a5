"""`make compare`: runs of one dataset side by side; runs of different datasets refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.compare import compare_table, load_runs
from pipeline.errors import PipelineError


def _run(folder: Path, dataset: str, captioner: str, caption_s: float, strict: float) -> Path:
    folder.mkdir(parents=True)
    metrics = {
        "dataset": dataset, "captioner": captioner, "questions": 10, "answered": 9,
        "accuracy": {"strict": strict, "llovi": strict + 0.02},
        "wall_clock_s": {"decode_and_caption": caption_s, "total": caption_s + 30},
        "frames_per_second": 1800 / caption_s,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_table_orders_by_captioning_time_and_formats_minutes(tmp_path: Path):
    slow = _run(tmp_path / "a", "ego", "llava15", 1760.0, 0.511)
    fast = _run(tmp_path / "b", "ego", "simple", 293.0, 0.493)
    table = compare_table(load_runs([slow, fast]), {"simple": 430_124_544})
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1].startswith("| simple | 430M | 49.3 | 51.3 | 9/10 | 4m53.0s |")
    assert rows[2].startswith("| llava15 | n/a | 51.1 |") and "29m20.0s" in rows[2]


def test_unfinished_and_mixed_runs_are_refused(tmp_path: Path):
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(PipelineError, match="no metrics.json"):
        load_runs([tmp_path / "unfinished"])
    a = _run(tmp_path / "a", "ego", "simple", 10.0, 0.2)
    b = _run(tmp_path / "b", "demo", "simple", 10.0, 0.2)
    with pytest.raises(PipelineError, match="different datasets"):
        load_runs([a, b])


def test_the_runs_recorded_checkpoint_count_beats_the_real_size(tmp_path: Path):
    """A run of a 1.7M tiny checkpoint shows 1.7M, not the real architecture's 482M."""
    tiny = _run(tmp_path / "t", "ego", "mmser", 10.0, 0.2)
    metrics = json.loads((tiny / "metrics.json").read_text())
    metrics["captioner_timing"] = {"parameters": 1_712_345}
    (tiny / "metrics.json").write_text(json.dumps(metrics))
    older = _run(tmp_path / "o", "ego", "simple", 20.0, 0.2)  # records no count
    table = compare_table(load_runs([tiny, older]), {"mmser": 482_000_000, "simple": 430_124_544})
    assert "| mmser | 1.7M |" in table and "482M" not in table
    assert "| simple | 430M |" in table
