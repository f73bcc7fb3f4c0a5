"""The whole run: dataset -> decode (Ray tasks) -> caption (Ray actors) -> transcript ->
cache -> reader -> predictions, metrics, report.

    mmser videoqa --dataset egoschema --captioner mmser        (make videoqa DATASET=...)

`caption_videos_cached` is the captioning half on its own (also `mmser cache build`): it
looks every video up in the caption cache first, decodes and captions only the misses,
and writes each video's record the moment it is done, so an interrupted run loses at
most the videos in flight. Rerunning the same command resumes the newest unfinished run
folder of that dataset and captioner: cached videos are not captioned again and answered
questions are not asked again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from captioner.base import captioner_identity, check_captioner_name
from pipeline.cache import CacheRecord, CaptionCache, cache_key, sampling_identity
from pipeline.caption_stage import (
    CaptionActorPool,
    CaptionedVideo,
    CaptionFailure,
    caption_videos,
)
from pipeline.config import Config, RaySettings
from pipeline.datasets import Dataset, load_dataset
from pipeline.errors import PipelineError
from pipeline.records import FrameCaption, Transcript, VideoItem

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """A unit of work that failed, with the stage and reason (one line of failures.jsonl)."""

    video_id: str
    path: str
    stage: str  # fingerprint | decode | caption | read
    reason: str


@dataclass
class CaptionStats:
    videos: int = 0
    cache_hits: int = 0
    captioned_videos: int = 0
    captioned_frames: int = 0
    decode_seconds: float = 0.0  # summed over videos (worker time, overlapping)
    caption_seconds: float = 0.0  # summed over batches (worker time)
    wall_seconds: float = 0.0  # the decode + caption stage, end to end


@dataclass
class CaptionOutcome:
    transcripts: dict[str, Transcript] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    stats: CaptionStats = field(default_factory=CaptionStats)


def _decode_stream(videos: list[VideoItem], config: Config):
    from pipeline.decode import decode_videos

    return decode_videos(videos, config.sampling, _fit_decode_workers(config.ray))


def _fit_decode_workers(ray_settings: RaySettings) -> RaySettings:
    """Without GPUs the caption actors hold CPUs too (1 each): decode workers get the rest,
    at least one. Asking for more would leave a decode worker waiting for a CPU forever."""
    if not ray_settings.enabled:
        return ray_settings
    import ray

    resources = ray.cluster_resources()
    if resources.get("GPU", 0):
        return ray_settings
    spare = int(resources.get("CPU", 1)) - ray_settings.cpu_caption_actors
    workers = max(1, min(ray_settings.decode_workers, spare))
    if workers != ray_settings.decode_workers:
        log.info("ray.decode_workers %d -> %d: %d CPUs, %d held by caption actors",
                 ray_settings.decode_workers, workers, int(resources.get("CPU", 1)),
                 ray_settings.cpu_caption_actors)
    return dataclasses.replace(ray_settings, decode_workers=workers)


def caption_videos_cached(
    videos: list[VideoItem],
    config: Config,
    captioner_name: str | None = None,
    on_failure: Callable[[Failure], None] | None = None,
    pool: CaptionActorPool | None = None,
) -> CaptionOutcome:
    """Transcripts for `videos`: from the cache where present, else decoded and captioned
    (and cached). One bad video is a `Failure`, never an exception. `pool`: caption actors
    already running (benchmarks reuse one); by default they are started for this call."""
    from pipeline.decode import DecodeFailure

    name = captioner_name or config.captioner.name
    settings = dataclasses.replace(config.captioner, name=name)
    identity = captioner_identity(settings, name)
    sampling = sampling_identity(config.sampling)
    cache = CaptionCache(config.cache.dir, fingerprint_mode=config.cache.fingerprint)
    out = CaptionOutcome()
    out.stats.videos = len(videos)
    start = time.perf_counter()

    def fail(failure: Failure) -> None:
        out.failures.append(failure)
        if on_failure:
            on_failure(failure)

    misses: list[VideoItem] = []
    fingerprints: dict[str, str] = {}
    for video in tqdm(videos, desc="cache lookup", unit="video", leave=False):
        try:
            fingerprint = cache.fingerprint(video.path)
        except OSError as exc:
            fail(Failure(video.video_id, str(video.path), "fingerprint", str(exc)))
            continue
        record = cache.get(cache_key(fingerprint, sampling, identity))
        if record is None:
            fingerprints[video.video_id] = fingerprint
            misses.append(video)
            continue
        cache.add_path(record.key, video.path)
        out.transcripts[video.video_id] = record.to_transcript(video.video_id)
        out.stats.cache_hits += 1

    if misses:
        log.info("%d of %d videos cached; captioning %d with %s",
                 out.stats.cache_hits, len(videos), len(misses), name)
        if config.ray.enabled:
            from pipeline.ray_cluster import init_ray

            init_ray(config.ray)
        bar = tqdm(total=len(misses), desc=f"caption ({name})", unit="video")
        stream = _decode_stream(misses, config)
        for item in caption_videos(stream, settings, config.ray, pool=pool):
            bar.update(1)
            if isinstance(item, DecodeFailure):
                fail(Failure(item.video_id, str(item.path), "decode", item.reason))
            elif isinstance(item, CaptionFailure):
                fail(Failure(item.video_id, item.path, "caption", item.reason))
            elif isinstance(item, CaptionedVideo):
                frames = item.frames
                captions = [
                    FrameCaption(
                        timestamp=float(t), caption=r.caption, coarse_caption=r.coarse_caption,
                        refine_passes=r.refine_passes, tags=tuple(r.tags),
                    )
                    for t, r in zip(frames.timestamps, item.results, strict=True)
                ]
                record = CacheRecord.create(
                    fingerprint=fingerprints[frames.video_id], video_id=frames.video_id,
                    path=frames.path, duration=frames.duration, captions=captions,
                    sampling=sampling, captioner=identity,
                    timings={"decode_seconds": frames.decode_seconds,
                             "caption_seconds": item.caption_seconds},
                )
                cache.put(record)
                out.transcripts[frames.video_id] = record.to_transcript()
                out.stats.captioned_videos += 1
                out.stats.captioned_frames += len(captions)
                out.stats.decode_seconds += frames.decode_seconds
                out.stats.caption_seconds += item.caption_seconds
        bar.close()
    out.stats.wall_seconds = time.perf_counter() - start
    return out


# --- the videoqa run ----------------------------------------------------------------------


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


# Reader settings that change answers (not how fast they come: concurrency, timeouts, ...).
_ANSWER_KEYS = ("model", "served_name", "system_prompt", "structured_choice", "temperature",
                "max_tokens", "summary_words", "max_model_len", "reserve_tokens",
                "dedup_threshold", "digest", "digest_similarity", "permutations", "llovi")


def run_identity(config: Config, dataset: str, captioner: str) -> dict[str, Any]:
    """Everything that decides a run's answers: the dataset, the captioner (its identity,
    model files fingerprinted), the sampling, the template and its text, and the reader's
    answer-changing settings. A run folder is only resumed by a run of the same identity."""
    from qa.prompts import get_template

    reader = dataclasses.asdict(config.reader)
    template = get_template(config.reader.template)
    return {
        "dataset": dataset,
        "dataset_settings": dataclasses.asdict(config.datasets[dataset])
        if dataset in config.datasets else None,
        "captioner": captioner_identity(config.captioner, captioner),
        "sampling": sampling_identity(config.sampling),
        "template": template.to_dict(),
        "reader": {k: reader[k] for k in _ANSWER_KEYS},
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k),
                                                     f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def check_same_run(folder: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume `folder` with settings that would mix answers of two runs."""
    path = folder / "run.json"
    if not path.exists():
        if (folder / "predictions.jsonl").exists():
            raise PipelineError(
                f"{folder} has answers but no run.json (made by an older version): its "
                "settings cannot be checked; rerun with --new for a new run folder"
            )
        return
    old = json.loads(path.read_text())
    changed = _differences(old, json.loads(json.dumps(identity)))
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8
                                          else "")
        raise PipelineError(
            f"{folder} was run with other settings ({shown}); resuming would mix answers "
            "of two configurations: rerun with --new for a new run folder (or --run-dir DIR)"
        )


def choose_run_dir(config: Config, dataset: str, captioner: str, run_dir: str | None,
                   new: bool) -> tuple[Path, bool]:
    """The run folder and whether it resumes an unfinished run of the same dataset/captioner."""
    if run_dir:
        path = Path(run_dir)
        return path, (path / "config.yaml").exists()
    root = Path(config.outputs.runs_dir)
    label = Path(dataset).name if "/" in dataset else dataset
    prefix = f"{label}-{captioner}-"
    if not new and root.is_dir():
        unfinished = sorted(
            p for p in root.glob(prefix + "*")
            if p.is_dir() and not (p / "metrics.json").exists()
        )
        if unfinished:
            return unfinished[-1], True
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{prefix}{stamp}", False


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def run_videoqa(
    config: Config,
    dataset_name: str,
    captioner_name: str | None = None,
    run_dir: str | None = None,
    new: bool = False,
) -> Path:
    """Answer every question of a dataset; returns the run folder. Raises PipelineError only
    when nothing at all could be done."""
    from qa.evaluate import AnswerRecord, write_submission
    from qa.reader import answer_questions

    captioner_name = captioner_name or config.captioner.name
    check_captioner_name(captioner_name)  # before any output is written
    dataset: Dataset = load_dataset(dataset_name, config.datasets)
    folder, resumed = choose_run_dir(config, dataset_name, captioner_name, run_dir, new)
    identity = run_identity(config, dataset_name, captioner_name)
    if resumed:
        check_same_run(folder, identity)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'resuming' if resumed else 'run folder'}: {folder}")
    (folder / "run.json").write_text(json.dumps(identity, indent=1))
    snapshot = dict(config.to_dict(), run={"dataset": dataset_name, "captioner": captioner_name})
    (folder / "config.yaml").write_text(yaml.safe_dump(snapshot, sort_keys=False))
    failures_path = folder / "failures.jsonl"
    failures_path.unlink(missing_ok=True)  # rewritten from scratch: a resume retries failures

    def record_failure(failure: Failure) -> None:
        _append_jsonl(failures_path, dataclasses.asdict(failure))

    for video_id in dataset.missing_videos:
        record_failure(Failure(video_id, str(dataset.root / "videos" / f"{video_id}.mp4"),
                               "load", "video file is missing"))

    t0 = time.perf_counter()
    videos = [dataset.videos[v] for v in sorted({q.video_id for q in dataset.answerable()})]
    captions = caption_videos_cached(videos, config, captioner_name, on_failure=record_failure)
    t_caption = time.perf_counter() - t0
    items = [(q, captions.transcripts[q.video_id]) for q in dataset.questions
             if q.video_id in captions.transcripts]
    if not items:
        raise PipelineError(
            f"nothing to answer: all {len(dataset.questions)} questions' videos failed; "
            f"see {failures_path}"
        )
    t1 = time.perf_counter()
    answers = answer_questions(config.reader, items, folder / "predictions.jsonl")
    t_read = time.perf_counter() - t1
    for answer in answers:
        if answer.error:
            record_failure(Failure(answer.q_uid, "", "read", answer.error))
    # Questions whose video failed count as failed answers (0 strict, 0.2 LLoVi-style) and
    # are written -1 in the submission: nothing is invented, nothing silently dropped.
    video_errors = {f.video_id: f"{f.stage}: {f.reason}" for f in captions.failures}
    video_errors.update((v, "load: video file is missing") for v in dataset.missing_videos)
    with (folder / "predictions.jsonl").open("a") as fh:
        for q in dataset.questions:
            if q.video_id not in captions.transcripts:
                record = AnswerRecord(
                    q_uid=q.q_uid, video_id=q.video_id, prediction=None, letter=None,
                    option_probs=None, raw_output="", answer=q.answer,
                    error=f"video failed, question not asked ({video_errors.get(q.video_id)})",
                )
                answers.append(record)
                fh.write(record.to_json() + "\n")
    write_submission(answers, folder)
    metrics = build_metrics(dataset, captions, answers, captioner_name, config,
                            {"caption_stage": t_caption, "read": t_read,
                             "total": time.perf_counter() - t0})
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "report.md").write_text(render_report(metrics))
    print(render_report(metrics))
    return folder


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
        "parameters": _run_parameters(config, captioner),
    }
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


def _run_parameters(config: Config, captioner: str) -> int | None:
    """Parameters of the captioner this run used: counted from a local checkpoint's
    safetensors headers (no weights read; the demo's tiny model reports its own size),
    else the real architecture's count."""
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
        return total
    try:
        counts = parameter_counts(config.captioner, captioner)
    except Exception:  # a count is a nicety: the report stands without it
        return None
    return counts.get("total", sum(counts.values()))


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
