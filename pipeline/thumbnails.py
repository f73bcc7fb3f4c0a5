"""Small JPEG thumbnails of the frames a run captioned, for the HTML report.

The caption cache keeps captions only; the report re-decodes the few frames it shows with
decord, by the same decoder timestamps the captions carry, and keeps the JPEGs in the run
folder (RUN/thumbs/<video>/<milliseconds>.jpg) so a rebuilt report decodes nothing again.
Videos are decoded in parallel Ray tasks when `ray.enabled`, else one after another. A video
that cannot be decoded any more gives its reason, never an exception.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import RaySettings

THUMB_WIDTH = 160  # px: a strip of a dozen stays light even for 50 videos a page
_JPEG_QUALITY = 80
_TIME_TOLERANCE_S = 1e-4  # as pipeline/frames.py: decord's float32-like timestamps


@dataclass(frozen=True)
class ThumbJob:
    video_id: str
    path: str
    timestamps: tuple[float, ...]  # seconds, as the captions carry them
    out_dir: str  # absolute: RUN/thumbs/<safe video id>


@dataclass
class ThumbResult:
    video_id: str
    files: dict[int, str] = field(default_factory=dict)  # milliseconds -> file name
    jpegs: dict[int, bytes] = field(default_factory=dict)  # milliseconds -> new JPEG
    error: str | None = None  # why the video could not be decoded at report time


def millis(timestamp: float) -> int:
    return int(round(float(timestamp) * 1000))


def safe_folder(video_id: str) -> str:
    """A file-system-safe folder name for a video id, unique by a short hash."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", video_id)[:60] or "video"
    return f"{stem}-{hashlib.sha1(video_id.encode()).hexdigest()[:8]}"


def pick_timestamps(timestamps: Sequence[float], changed: Sequence[bool], limit: int
                    ) -> list[float]:
    """At most `limit` evenly spread frames, plus every frame that refinement changed."""
    n = len(timestamps)
    if n == 0:
        return []
    spread = set(np.unique(np.linspace(0, n - 1, num=min(limit, n)).round().astype(int))) \
        if limit > 0 else set()
    return [t for i, t in enumerate(timestamps) if i in spread or changed[i]]


def _thumb_name(ms: int) -> str:
    return f"{ms:09d}.jpg"


def make_thumbnails(job: ThumbJob, width: int = THUMB_WIDTH) -> ThumbResult:
    """Decode the `job.timestamps` not yet in `job.out_dir` and return their JPEG bytes
    (written by the caller: a Ray task may run on another node than the run folder's)."""
    out = Path(job.out_dir)
    result = ThumbResult(job.video_id)
    todo = [t for t in job.timestamps if not (out / _thumb_name(millis(t))).exists()]
    if not todo:
        return result  # a rebuilt report: nothing to decode
    try:
        frames = _decode_at(job.path, todo)
    except Exception as exc:  # any decoder failure is this video's reason, not the report's
        result.error = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return result
    from PIL import Image

    for t, frame in zip(todo, frames, strict=True):
        image = Image.fromarray(frame)
        height = max(1, round(image.height * width / image.width))
        buffer = io.BytesIO()
        image.resize((width, height), Image.Resampling.BILINEAR).save(
            buffer, "JPEG", quality=_JPEG_QUALITY)
        result.jpegs[millis(t)] = buffer.getvalue()
    return result


def _store(job: ThumbJob, result: ThumbResult) -> ThumbResult:
    """Write the new JPEGs; list every thumbnail of the job that exists."""
    out = Path(job.out_dir)
    if result.jpegs:
        out.mkdir(parents=True, exist_ok=True)
    for ms, data in result.jpegs.items():
        (out / _thumb_name(ms)).write_bytes(data)
    result.jpegs = {}
    for t in job.timestamps:
        if (out / _thumb_name(millis(t))).exists():
            result.files[millis(t)] = _thumb_name(millis(t))
    return result


def _decode_at(path: str, timestamps: Sequence[float]) -> np.ndarray:
    """The frames on screen at `timestamps` (N, H, W, 3) uint8, with decord's own reason
    (pipeline/frames.py) when the file cannot be read."""
    from decord import VideoReader, cpu

    from pipeline.errors import VideoDecodeError
    from pipeline.frames import _captured_stderr, _plain_reason, _reason

    file = Path(path)
    if not file.is_file():
        raise VideoDecodeError(path, "no such file (moved or deleted since the run)")
    stderr: list[str] = []
    try:
        with _captured_stderr() as stderr:
            reader = VideoReader(path, ctx=cpu(0), num_threads=1)
            try:
                starts = np.asarray(reader.get_frame_timestamp(np.arange(len(reader))),
                                    dtype=np.float64)[:, 0]
                wanted = np.asarray(timestamps, dtype=np.float64)
                index = np.searchsorted(starts, wanted + _TIME_TOLERANCE_S, side="right") - 1
                index = np.clip(index, 0, len(starts) - 1)
                return reader.get_batch(index.tolist()).asnumpy()
            finally:
                del reader  # a live reader keeps decoding ahead (pipeline/frames.py)
    except Exception as exc:
        raise VideoDecodeError(path, _plain_reason(file, _reason(exc, stderr, path))) from exc


def thumbnails_for(jobs: list[ThumbJob], ray_settings: RaySettings) -> dict[str, ThumbResult]:
    """Every job's thumbnails: Ray tasks (one per video still to decode) when Ray is
    enabled, else serial; the JPEGs are written here, in the run folder."""
    needed = [j for j in jobs if any(
        not (Path(j.out_dir) / _thumb_name(millis(t))).exists() for t in j.timestamps)]
    if not ray_settings.enabled or not needed:
        return {j.video_id: _store(j, make_thumbnails(j)) for j in jobs}
    import ray

    from pipeline.ray_cluster import init_ray

    init_ray(ray_settings)
    task = ray.remote(num_cpus=1)(make_thumbnails)
    refs = {j.video_id: task.remote(j) for j in needed}
    results = {}
    for job in jobs:
        if job.video_id not in refs:
            results[job.video_id] = _store(job, ThumbResult(job.video_id))
            continue
        try:
            results[job.video_id] = _store(job, ray.get(refs[job.video_id]))
        except Exception as exc:  # a worker that died is this video's reason
            results[job.video_id] = ThumbResult(job.video_id,
                                                error=f"thumbnail task failed: {exc}")
    return results
