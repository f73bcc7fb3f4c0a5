"""Pipeline benchmark: cold vs warm caption cache, and decode/caption overlap.

    python -m benchmarks.pipeline                    # or: make bench-pipeline
    python -m benchmarks.pipeline --videos 4 --seconds 20   # quicker

On generated videos (made once under data/bench/pipeline/), with the tiny local MM-SeR
captioner (random weights: only its cost matters here) on Ray, its actors started once
(their start-up is reported apart):
  1. decode alone: every video through the Ray decode workers;
  2. caption alone: the already-decoded frames through the caption actor;
  3. cold run: `caption_videos_cached` on an empty cache (decode and caption overlapped);
  4. warm run: the same again, every video now cached.
overlap_ratio = cold / max(decode alone, caption alone): 1.0 is perfect overlap, 2.0 none.
warm_over_cold = warm / cold captioning-stage wall-clock. Written to
benchmarks/results/pipeline.json; the table last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.machine import ray_machine
from captioner.random_weights import build_tiny_checkpoint
from pipeline.caption_stage import CaptionActorPool, CaptionedVideo, caption_videos
from pipeline.captioning import _fit_decode_workers, caption_videos_cached
from pipeline.config import load_config
from pipeline.decode import decode_videos
from pipeline.ray_cluster import init_ray, shutdown_ray
from pipeline.records import SampledFrames, VideoItem
from pipeline.synth import textured_frames, write_video

BENCH_DIR = Path("data/bench/pipeline")
RESULTS = Path("benchmarks/results/pipeline.json")


def make_videos(n: int, seconds: float, width: int, height: int, fps: int) -> list[VideoItem]:
    items = []
    for i in range(n):
        path = BENCH_DIR / f"video{i:02d}_{width}x{height}_{fps}fps_{seconds:g}s.mp4"
        if not path.exists():
            frames = textured_frames(int(seconds * fps), width, height, seed=i)
            write_video(path.with_suffix(".partial.mp4"), frames, fps=fps)
            path.with_suffix(".partial.mp4").rename(path)
        items.append(VideoItem(f"video{i:02d}", path))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each video")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--new-tokens", type=int, default=24, help="fixed caption length")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    videos = make_videos(args.videos, args.seconds, args.width, args.height, fps=30)
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    checkpoint = build_tiny_checkpoint(work / "mmser-tiny")
    overrides = [
        f"cache.dir={work / 'cache'}", "captioner.name=mmser",
        f"captioner.mmser.checkpoint={checkpoint}", f"captioner.batch_size={args.batch_size}",
        f"captioner.generation.max_new_tokens={args.new_tokens}",
        f"captioner.generation.min_new_tokens={args.new_tokens}",
    ]
    config = load_config(overrides=overrides)
    init_ray(config.ray)
    ray_settings = _fit_decode_workers(config.ray)
    # The caption actors start once (importing torch and loading the model) and serve all
    # three captioning measurements: their start is a fixed cost, reported apart, while
    # the overlap ratio is about decoding and captioning streaming side by side.
    t0 = time.perf_counter()
    pool = CaptionActorPool(config.captioner, config.ray)
    actor_start = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        decoded = [r for r in decode_videos(videos, config.sampling, ray_settings, progress=False)
                   if isinstance(r, SampledFrames)]
        decode_alone = time.perf_counter() - t0
        frames = sum(len(r) for r in decoded)

        t0 = time.perf_counter()
        captioned = [r for r in caption_videos(iter(decoded), config.captioner, config.ray,
                                               pool=pool)
                     if isinstance(r, CaptionedVideo)]
        caption_alone = time.perf_counter() - t0
        assert len(captioned) == len(videos), "every video must be captioned"

        cold = caption_videos_cached(videos, config, pool=pool)
        warm = caption_videos_cached(videos, config, pool=pool)
        assert warm.stats.captioned_frames == 0 and warm.stats.cache_hits == len(videos)
    finally:
        pool.shutdown()
        shutdown_ray()
        shutil.rmtree(work, ignore_errors=True)

    cold_s, warm_s = cold.stats.wall_seconds, warm.stats.wall_seconds
    result = {
        "videos": len(videos),
        "frames": frames,
        "video": f"{args.seconds:g} s {args.width}x{args.height} 30 fps H.264, sampled at 1 fps",
        "captioner": f"tiny MM-SeR (random weights), {args.new_tokens} new tokens, "
                     f"batch {args.batch_size}",
        "decode_workers": ray_settings.decode_workers,
        "caption_actors": config.ray.cpu_caption_actors,
        "caption_actor_start_s": round(actor_start, 3),
        "decode_alone_s": round(decode_alone, 3),
        "caption_alone_s": round(caption_alone, 3),
        "cold_s": round(cold_s, 3),
        "warm_s": round(warm_s, 4),
        "warm_over_cold": round(warm_s / cold_s, 5),
        "overlap_ratio": round(cold_s / max(decode_alone, caption_alone), 3),
        "machine": ray_machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nmachine: {result['machine']}\nwritten: {args.out}\n")
    print(f"{'measure':<38}{'seconds':>10}")
    for label, key in [("caption actor start (not in timings)", "caption_actor_start_s"),
                       ("decode alone", "decode_alone_s"), ("caption alone", "caption_alone_s"),
                       ("cold run (decode + caption)", "cold_s"), ("warm run (all cached)",
                                                                  "warm_s")]:
        print(f"{label:<38}{result[key]:>10.3f}")
    print(f"{'warm / cold (goal <= 0.02)':<38}{result['warm_over_cold']:>10.4f}")
    print(f"{'overlap ratio (goal <= 1.2)':<38}{result['overlap_ratio']:>10.3f}")


if __name__ == "__main__":
    main()
