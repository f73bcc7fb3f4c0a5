"""A run's report: metrics.json (accuracy, counts, wall-clock, captioner timing, hardware)
and report.md."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.captioning import CaptionOutcome
from pipeline.config import Config
from pipeline.datasets import Dataset

log = logging.getLogger(__name__)


def _hardware() -> dict[str, Any]:
    import os

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(),
                            "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def build_metrics(dataset: Dataset, captions: CaptionOutcome, answers: list, captioner: str,
                  config: Config, wall: dict[str, float]) -> dict[str, Any]:
    from qa.evaluate import accuracy

    stats = captions.stats
    scores = accuracy(answers).to_dict()
    caption_wall = stats.wall_seconds
    # The same timing rows as `make bench-captioners`: a captioner's speed per frame, per
    # EgoSchema video (180 frames at 1 fps) and projected to the 500-question subset.
    per_frame = caption_wall / stats.captioned_frames if stats.captioned_frames else None
    timing = {
        "frames_per_second": round(1 / per_frame, 3) if per_frame else None,
        "seconds_per_egoschema_video": round(180 * per_frame, 2) if per_frame else None,
        "projected_egoschema_500_minutes": round(500 * 180 * per_frame / 60, 1)
        if per_frame else None,
    }
    timing["parameters"], timing["parameters_source"] = _run_parameters(config, captioner)
    return {
        "dataset": dataset.name,
        "captioner": captioner,
        "reader": config.reader.served_name or config.reader.model,
        "questions": len(dataset.questions),
        "answered": sum(1 for a in answers if not a.error),
        "failed_questions": sum(1 for a in answers if a.error),
        "failed_videos": len(captions.failures) + len(dataset.missing_videos),
        "accuracy": scores,
        "videos": stats.videos,
        "cache_hits": stats.cache_hits,
        "captioned_videos": stats.captioned_videos,
        "captioned_frames": stats.captioned_frames,
        "wall_clock_s": {
            "decode_worker_time": round(stats.decode_seconds, 3),
            "caption_worker_time": round(stats.caption_seconds, 3),
            "decode_and_caption": round(caption_wall, 3),
            "read": round(wall["read"], 3),
            "total": round(wall["total"], 3),
        },
        "frames_per_second": timing["frames_per_second"],
        "captioner_timing": timing,
        "hardware": _hardware(),
    }


def _run_parameters(config: Config, captioner: str) -> tuple[int | None, str]:
    """(parameters of the captioner this run loaded, where the count comes from): a local
    checkpoint's safetensors headers (no weights read; the demo's tiny model reports its
    own size), else the real architecture's count (what a hub id loads)."""
    from safetensors import safe_open

    from captioner.base import parameter_counts

    checkpoint = getattr(getattr(config.captioner, captioner, None), "checkpoint", None)
    files = sorted(Path(checkpoint).glob("*.safetensors")) if checkpoint else []
    if files:
        total = 0
        for file in files:
            with safe_open(str(file), framework="np") as handle:
                for name in handle.keys():
                    total += int(np.prod(handle.get_slice(name).get_shape()))
        return total, f"safetensors headers of {checkpoint}"
    try:
        counts = parameter_counts(config.captioner, captioner)
    except Exception:  # a count is a nicety: the report stands without it
        return None, "unavailable"
    return counts.get("total", sum(counts.values())), "the real-size architecture"


def render_report(metrics: dict[str, Any]) -> str:
    acc = metrics["accuracy"]
    wall = metrics["wall_clock_s"]
    lines = [
        f"# {metrics['dataset']} with {metrics['captioner']} + {metrics['reader']}",
        "",
        "| questions | answered | failed | accuracy (strict) | accuracy (LLoVi) |",
        "| --- | --- | --- | --- | --- |",
        f"| {metrics['questions']} | {metrics['answered']} | {metrics['failed_questions']} | "
        f"{_pct(acc.get('strict'))} | {_pct(acc.get('llovi'))} |",
        "",
        "| stage | wall-clock s |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in wall.items()]
    timing = metrics.get("captioner_timing") or {}
    if timing.get("frames_per_second"):
        params = timing.get("parameters")
        lines += [
            "",
            "| captioner | parameters | frames/s | s per EgoSchema video | "
            "EgoSchema-500 projected |",
            "| --- | --- | --- | --- | --- |",
            f"| {metrics['captioner']} | {f'{params / 1e6:.1f}M' if params else 'n/a'} | "
            f"{timing['frames_per_second']} | {timing['seconds_per_egoschema_video']} | "
            f"{timing['projected_egoschema_500_minutes']} min |",
        ]
    lines += [
        "",
        f"Videos: {metrics['videos']} ({metrics['cache_hits']} from the cache, "
        f"{metrics['captioned_videos']} captioned, {metrics['failed_videos']} failed); "
        f"{metrics['captioned_frames']} frames captioned"
        + (f" at {metrics['frames_per_second']} frames/s." if metrics["frames_per_second"]
           else "."),
        f"Hardware: {metrics['hardware']}",
    ]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
