"""One JSON from the GPU run (scripts/device_bench.sh): the captioner, comparison and
training benchmarks' files, with each captioner's EgoSchema-500 projection and the goals.

    python -m benchmarks.device_report DIR      # reads DIR/*.json, writes DIR/device_bench.json

The projection is the measured frames per second applied to the 500-video subset at 1 fps
(90,000 frames): captioning time only, no decoding or reading.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.captioner_comparison import EGOSCHEMA_FRAMES_PER_VIDEO, EGOSCHEMA_SUBSET_VIDEOS

EGOSCHEMA_500_FRAMES = EGOSCHEMA_SUBSET_VIDEOS * EGOSCHEMA_FRAMES_PER_VIDEO
# The goals on one GPU: MM-SeR / simple (the paper's end-to-end ratio is 1.058),
# and MM-SeR's captioning of EgoSchema-500.
GOAL_RATIO = 1.05
GOAL_EGOSCHEMA500_S = 120.0


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a step that timed out or failed: reported as missing


def _mmser_cost(result: dict[str, Any]) -> dict[str, Any]:
    """bench-captioner's largest batch: frames/s, the ratios and the projection."""
    top = result["rows"][-1]
    fps = {name: top[f"{name}_fps"] for name in ("simple", "mmser", "mmser_plain")}
    return {
        "batch_size": top["batch_size"],
        "compile_decode": result.get("compile_decode", False),
        "frames_per_s": fps,
        "egoschema500_s": {name: EGOSCHEMA_500_FRAMES / f for name, f in fps.items()},
        "mmser_over_simple": top["ratio"],
        "mmser_plain_over_simple": top["ratio_plain"],
        "coarse_pass_ratio": result["coarse_pass_ratio"],
        "flop_ratio": result["flop_ratio"],
    }


def device_report(folder: Path) -> dict[str, Any]:
    """Everything the GPU run measured, in one record; missing steps are named."""
    report: dict[str, Any] = {"egoschema500_frames": EGOSCHEMA_500_FRAMES, "missing": []}
    gpu = folder / "gpu.txt"
    report["gpu"] = gpu.read_text().strip() if gpu.is_file() else None
    for key, name in (("eager", "captioner_cuda.json"),
                      ("compiled", "captioner_cuda_compiled.json")):
        result = _read(folder / name)
        if result is None:
            report["missing"].append(name)
        else:
            report.setdefault("mmser_cost", {})[key] = _mmser_cost(result)
    comparison = _read(folder / "captioners.json")
    if comparison is None:
        report["missing"].append("captioners.json")
    else:
        report["captioners"] = {
            name: {"frames_per_s": row["frames_per_s"], "egoschema500_s": row["egoschema500_s"],
                   "batch_size": row["batch_size"], "paper_s": row.get("paper_s")}
            for name, row in comparison["captioners"].items()
        }
    training = _read(folder / "train_throughput.json")
    if training is None:
        report["missing"].append("train_throughput.json")
    else:
        report["training"] = training
    costs = report.get("mmser_cost", {})
    if costs:
        best = min(costs.values(), key=lambda c: c["mmser_over_simple"])
        report["goals"] = {
            "mmser_over_simple": best["mmser_over_simple"],
            "mmser_over_simple_goal": GOAL_RATIO,
            "mmser_over_simple_met": best["mmser_over_simple"] <= GOAL_RATIO,
            "mmser_egoschema500_s": best["egoschema500_s"]["mmser"],
            "mmser_egoschema500_goal_s": GOAL_EGOSCHEMA500_S,
            "mmser_egoschema500_met": best["egoschema500_s"]["mmser"] <= GOAL_EGOSCHEMA500_S,
            "from": "compiled" if best["compile_decode"] else "eager",
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="the folder the GPU run wrote")
    folder = parser.parse_args().folder
    report = device_report(folder)
    (folder / "device_bench.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'captioner':<20}{'frames/s':>10}{'EgoSchema-500 s':>17}")
    for key, cost in report.get("mmser_cost", {}).items():
        for name, fps in cost["frames_per_s"].items():
            print(f"{name + ' ' + key:<20}{fps:>10.1f}{cost['egoschema500_s'][name]:>17.1f}")
    for name, row in report.get("captioners", {}).items():
        print(f"{name:<20}{row['frames_per_s']:>10.1f}{row['egoschema500_s']:>17.1f}")
    goals = report.get("goals")
    if goals:
        print(f"MM-SeR / simple {goals['mmser_over_simple']:.3f} (goal <= {GOAL_RATIO}), "
              f"MM-SeR EgoSchema-500 {goals['mmser_egoschema500_s']:.0f} s "
              f"(goal <= {GOAL_EGOSCHEMA500_S:.0f} s), {goals['from']}")
    if report["missing"]:
        print("missing:", ", ".join(report["missing"]))


if __name__ == "__main__":
    main()
