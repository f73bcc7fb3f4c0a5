"""Smoke test of the four-captioner timing benchmark at tiny sizes on CPU (a few seconds).

Timings on a shared 2-core machine are noise, so only the outputs' shape and the timing
method are checked: turns interleaved round-robin, figures from the median turn.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.captioner_comparison import NAMES, Options, Preset, parse_args, run, table
from pipeline.errors import CaptionerError

REPEATS = 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    opts = Options(
        device="cpu", preset=Preset("tiny"), frames=3, frame_size=(24, 40), batch_size=2,
        llava_batch_size=2, new_tokens=3, warmup_frames=1, repeats=REPEATS, threads=1,
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
        # 3 frames in steps of 2: turns of 2 and 1 frames, every round.
        assert row["frames"] == 2 and row["turns"] == 2 * REPEATS == len(row["step_s"])
        assert row["min_step_s"] <= row["median_step_s"] and row["spread"] >= 1
        per_frame = sorted(s / n for s, n in zip(row["step_s"], [2, 1] * REPEATS, strict=True))
        assert 1 / row["frames_per_s"] == pytest.approx(np.median(per_frame))
        assert 1 / row["frames_per_s_best"] == pytest.approx(per_frame[0])
        assert len(row["cpu_step_s"]) == row["turns"] and row["median_cpu_step_s"] > 0
        assert row["egoschema500_s"] == pytest.approx(90000 / row["frames_per_s"])
        assert row["s_per_video"] == pytest.approx(180 / row["frames_per_s"])
        assert row["weights_bytes"] >= 2 * row["params_benchmarked"]  # bf16 + buffers
        assert row["peak_memory_bytes"] >= row["weights_bytes"] > 0
    # Real-size parameter counts come from the modules, not from the tiny models.
    assert saved["captioners"]["llava15"]["params_real"] > 7e9
    assert saved["captioners"]["mmser"]["params_real"] > saved["captioners"]["simple"][
        "params_real"]
    assert saved["captioners"]["tag2text"]["num_beams"] == 3  # its settings' beams
    assert "in memory" in saved["captioners"]["llava15"]["build_path"]
    assert "build()" in saved["captioners"]["mmser"]["build_path"]
    assert saved["goals_met"] is None  # goals are only judged at real sizes on a GPU
    # Ratios come from the medians of the same rounds; the cross-checks sit beside them.
    rows = saved["captioners"]
    for name in NAMES:
        for key, ratios in (("median_step_s", "ratios_to_simple"),
                            ("min_step_s", "ratios_to_simple_min"),
                            ("median_cpu_step_s", "ratios_to_simple_cpu_time")):
            assert saved[ratios][name] == pytest.approx(rows[name][key] / rows["simple"][key])
    for when in ("at_start", "before_timing", "after_timing"):
        assert len(saved["load_average"][when]) == 3
    assert [r["round"] for r in saved["rounds"]] == list(range(1, REPEATS + 1))
    assert saved["options"]["threads"] == 1 and saved["machine"]["torch_threads"] == 1

    # Round-robin: every captioner takes turn k before any takes turn k + 1, the first
    # captioner rotating from step to step.
    starts = sorted((t, k, name) for name in NAMES
                    for k, t in enumerate(rows[name]["turn_started_s"]))
    assert [k for _, k, _ in starts] == sorted(k for _, k, _ in starts)
    firsts = [name for i, (_, _, name) in enumerate(starts) if i % len(NAMES) == 0]
    assert firsts == [NAMES[k % len(NAMES)] for k in range(2 * REPEATS)]

    with open(out / "captioners.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["captioner"] for r in rows] == list(NAMES)
    assert {"frames_per_s", "median_step_s", "min_step_s", "spread", "egoschema500_s",
            "ratio_to_simple", "paper_ratio_to_simple", "peak_memory_bytes",
            "params_real"} <= set(rows[0])
    assert (out / "captioners.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = table(result)
    assert all(name in text for name in NAMES) and "6.007" in text
    assert "load average" in text and f"{REPEATS} interleaved rounds" in text


def test_defaults_per_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    opts, out = parse_args(["--device", "cuda"])
    assert out == tmp_path
    assert opts.preset.name == "real" and opts.direct == ("llava15",)
    assert (opts.batch_size, opts.llava_batch_size, opts.dtype) == (128, 64, "bfloat16")
    assert opts.repeats == 3 and opts.threads is None  # a GPU box: torch's own threads
    opts, out = parse_args(["--out", str(tmp_path / "x")])
    assert out == tmp_path / "x"
    assert opts.preset == Preset("reduced", 4) and opts.direct == ()
    assert opts.repeats == 3 and opts.threads == 1  # one thread: robust to others' load
    opts, _ = parse_args(["--repeats", "5", "--threads", "2"])
    assert (opts.repeats, opts.threads) == (5, 2)


def test_refuses_zero_repeats(tmp_path: Path) -> None:
    with pytest.raises(CaptionerError, match="--repeats must be >= 1, got 0"):
        run(Options(preset=Preset("tiny"), repeats=0), tmp_path)


def test_benchmarks_time_float32_where_bf16_is_not_native(monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.machine as machine

    monkeypatch.setattr(machine, "native_bf16_cpu", lambda: False)
    dtype, why = machine.benchmark_dtype("auto", "cpu")
    assert dtype == "float32" and "without native bf16" in why
    monkeypatch.setattr(machine, "native_bf16_cpu", lambda: True)
    assert machine.benchmark_dtype("auto", "cpu") == ("bfloat16", "CPU with native bf16")
    assert machine.benchmark_dtype("auto", "cuda") == ("bfloat16", "GPU")
    assert machine.benchmark_dtype("float16", "cpu") == ("float16", "asked for")
