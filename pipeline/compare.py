"""Assemble several runs into one table like the paper's VideoQA table.

    mmser compare runs/egoschema-mmser-* runs/egoschema-simple-*     (make compare RUNS="...")

Columns: captioner, parameters (real size), accuracy (strict and LLoVi-style), captioning
time, total time, frames/s. Rows of different datasets are refused: the comparison only
means something on the same questions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def compare_table(runs: list[dict[str, Any]], parameters: dict[str, int] | None = None) -> str:
    """A Markdown table, one row per run, fastest captioning first."""
    parameters = parameters or {}
    header = ("| captioner | parameters | acc. strict | acc. LLoVi | answered | "
              "captioning | total | frames/s | run |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    runs = sorted(runs, key=lambda m: m["wall_clock_s"].get("decode_and_caption", 0.0))
    for m in runs:
        params = parameters.get(m["captioner"])
        wall = m["wall_clock_s"]
        lines.append(
            f"| {m['captioner']} | {f'{params / 1e6:.0f}M' if params else 'n/a'} | "
            f"{_pct(m['accuracy'].get('strict'))} | {_pct(m['accuracy'].get('llovi'))} | "
            f"{m['answered']}/{m['questions']} | {_minutes(wall.get('decode_and_caption'))} | "
            f"{_minutes(wall.get('total'))} | {m.get('frames_per_second') or 'n/a'} | "
            f"{m['_folder']} |"
        )
    return "\n".join(lines) + "\n"
