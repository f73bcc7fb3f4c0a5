"""Smoke test of the four-captioner timing benchmark at tiny sizes on CPU (a few seconds).

Only the outputs' shape is checked: timings on a shared 2-core machine are noise.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks.captioners import NAMES, Options, Preset, parse_args, run, table


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    opts = Options(
        device="cpu", preset=Preset("tiny"), frames=3, frame_size=(24, 40), batch_size=2,
        llava_batch_size=2, new_tokens=3, warmup_frames=1,
        direct=("llava15",),  # the path the cuda mode takes for LLaVA-7B
    )
    return run(opts, out), out


def test_writes_json_csv_png_with_every_captioner(tiny_run: tuple[dict, Path]) -> None:
    result, out = tiny_run
    saved = json.loads((out / "captioners.json").read_text())
    assert set(saved["ratios_to_simple"]) == set(NAMES)
    assert saved["ratios_to_simple"]["simple"] == pytest.approx(1.0)
    assert all(r > 0 for r in saved["ratios_to_simple"].values())
    assert saved["paper_ratios_to_simple"]["llava15"] == pytest.approx(1760 / 293)
    for key in ("cpu", "cores", "gpu", "torch", "transformers", "device"):
        assert key in saved["machine"]
    assert saved["sizes"]["preset"] == "tiny" and saved["options"]["new_tokens"] == 3
    for name in NAMES:
        row = saved["captioners"][name]
        assert row["frames"] == 3 and row["frames_per_s"] > 0
        assert row["egoschema500_s"] == pytest.approx(90000 / row["frames_per_s"])
        assert row["s_per_video"] == pytest.approx(180 / row["frames_per_s"])
        assert row["peak_memory_bytes"] > 0 and row["params_benchmarked"] > 0
    # Real-size parameter counts come from the modules, not from the tiny models.
    assert saved["captioners"]["llava15"]["params_real"] > 7e9
    assert saved["captioners"]["mmser"]["params_real"] > saved["captioners"]["simple"][
        "params_real"]
    assert saved["captioners"]["tag2text"]["num_beams"] == 3  # its settings' beams
    assert "in memory" in saved["captioners"]["llava15"]["build_path"]
    assert "build()" in saved["captioners"]["mmser"]["build_path"]
    assert saved["goals_met"] is None  # goals are only judged at real sizes on a GPU

    with open(out / "captioners.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["captioner"] for r in rows] == list(NAMES)
    assert {"frames_per_s", "egoschema500_s", "ratio_to_simple", "paper_ratio_to_simple",
            "peak_memory_bytes", "params_real"} <= set(rows[0])
    assert (out / "captioners.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = table(result)
    assert all(name in text for name in NAMES) and "6.007" in text


def test_defaults_per_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    opts, out = parse_args(["--device", "cuda"])
    assert out == tmp_path
    assert opts.preset.name == "real" and opts.direct == ("llava15",)
    assert (opts.batch_size, opts.llava_batch_size, opts.dtype) == (128, 64, "bfloat16")
    opts, out = parse_args(["--out", str(tmp_path / "x")])
    assert out == tmp_path / "x"
    assert opts.preset == Preset("reduced", 4) and opts.direct == ()
