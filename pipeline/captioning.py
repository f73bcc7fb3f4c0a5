"""The captioning half: videos -> transcripts through the caption cache (also `mmser cache
build`). Every video is looked up in the cache first; only the misses are decoded (Ray
tasks) and captioned (Ray actors), and each video's record is written the moment it is
done, so an interrupted run loses at most the videos in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from captioner.base import captioner_identity
from pipeline.cache import CacheRecord, CaptionCache, cache_key, sampling_identity
from pipeline.caption_stage import (
    CaptionActorPool,
    CaptionedVideo,
    CaptionFailure,
    caption_videos,
)
from pipeline.config import Config, RaySettings
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
    """The settings with the decode workers the cluster can run (pipeline.ray_cluster)."""
    if not ray_settings.enabled:
        return ray_settings
    from pipeline.ray_cluster import current_plan

    workers = current_plan(ray_settings).decode_workers
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


