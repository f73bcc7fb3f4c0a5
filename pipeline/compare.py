"""Assemble several runs into one table like the paper's VideoQA table.

    mmser compare runs/egoschema-mmser-* runs/egoschema-simple-*     (make compare RUNS="...")

Columns: captioner, parameters (of the checkpoint the run loaded, as its metrics.json
recorded them; the real-size count only for runs that did not record one), accuracy
(strict and LLoVi-style), captioning time, total time, frames/s. Rows of different
datasets are refused: the comparison only means something on the same questions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import PipelineError


def load_runs(folders: list[str | Path]) -> list[dict[str, Any]]:
    runs = []
    for folder in map(Path, folders):
        path = folder / "metrics.json"
        if not path.exists():
            raise PipelineError(f"{folder}: no metrics.json (an unfinished run?)")
        metrics = json.loads(path.read_text())
        metrics["_folder"] = str(folder)
        runs.append(metrics)
    datasets = {m["dataset"] for m in runs}
    if len(datasets) > 1:
        raise PipelineError(f"runs of different datasets cannot be compared: {sorted(datasets)}")
    return runs


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def _millions(params: int | None) -> str:
    """430M at real size; a tiny checkpoint keeps its digits (1.7M, not 2M)."""
    if not params:
        return "n/a"
    return f"{params / 1e6:.0f}M" if params >= 1e8 else f"{params / 1e6:.1f}M"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def run_parameters(metrics: dict[str, Any]) -> int | None:
    """The parameter count a run recorded for the checkpoint it loaded (metrics.json)."""
    value = (metrics.get("captioner_timing") or {}).get("parameters")
    return int(value) if isinstance(value, (int, float)) and value else None


def compare_table(runs: list[dict[str, Any]], parameters: dict[str, int] | None = None) -> str:
    """A Markdown table, one row per run, fastest captioning first. `parameters`: counts by
    captioner name for runs whose metrics.json records none (older runs)."""
    parameters = parameters or {}
    header = ("| captioner | parameters | acc. strict | acc. LLoVi | answered | "
              "captioning | total | frames/s | run |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    runs = sorted(runs, key=lambda m: m["wall_clock_s"].get("decode_and_caption", 0.0))
    for m in runs:
        params = run_parameters(m) or parameters.get(m["captioner"])
        wall = m["wall_clock_s"]
        lines.append(
            f"| {m['captioner']} | {_millions(params)} | "
            f"{_pct(m['accuracy'].get('strict'))} | {_pct(m['accuracy'].get('llovi'))} | "
            f"{m['answered']}/{m['questions']} | {_minutes(wall.get('decode_and_caption'))} | "
            f"{_minutes(wall.get('total'))} | {m.get('frames_per_second') or 'n/a'} | "
            f"{m['_folder']} |"
        )
    return "\n".join(lines) + "\n"


def compare_runs(config: Config, folders: list[str], out: str | None = None) -> str:
    """`mmser compare`: the table of `folders` (also written to `out`). Only runs that
    recorded no count of their loaded checkpoint fall back to the real-size count."""
    from captioner.base import parameter_counts

    runs = load_runs(folders)
    params = {}
    for name in {m["captioner"] for m in runs if run_parameters(m) is None}:
        try:
            counts = parameter_counts(config.captioner, name)
            params[name] = counts.get("total", sum(counts.values()))
        except Exception:  # a count is a nicety; the table stands without it
            pass
    table = compare_table(runs, params)
    if out:
        Path(out).write_text(table)
    return table
