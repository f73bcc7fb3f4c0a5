"""Decode benchmark: decord sampling speed, Ray workers vs serial, memory per worker.

    python -m benchmarks.decode                      # or: make bench-decode
    python -m benchmarks.decode --videos 2 --memory-videos 6    # a quicker run

On a generated 3-minute 640x480 30 fps H.264 clip (made once, cached under data/bench/):
  1. frames per second of sampling one video at 1 fps and at 8 uniform frames (one process);
  2. wall-clock of decoding --videos copies of it with --workers Ray workers vs serially
     (Ray's cluster start is excluded and reported apart; starting the workers is included);
  3. each worker's resident memory after every video over --memory-videos videos
     (first vs last vs max), to show it stays flat.
Every copy is the same file under a different id: decoding is CPU-bound and the file sits
in the page cache either way. Results go to benchmarks/results/decode.json; the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.machine import ray_machine
from pipeline.config import RaySettings, SamplingSettings
from pipeline.decode import DecodeFailure, WorkerStats, decode_videos_with_stats
from pipeline.frames import sample_video
from pipeline.records import VideoItem
from pipeline.synth import textured_frames, write_video

BENCH_DIR = Path("data/bench")
RESULTS = Path("benchmarks/results/decode.json")
MIB = 1024 * 1024


def bench_clip(minutes: float, width: int = 640, height: int = 480, fps: int = 30) -> Path:
    """The benchmark clip, generated once (a minute or two of encoding) and cached."""
    path = BENCH_DIR / f"clip_{width}x{height}_{fps}fps_{minutes:g}min.mp4"
    if not path.exists():
        print(f"generating {path} (once) ...", flush=True)
        partial = path.with_suffix(".partial.mp4")
        frames = textured_frames(int(minutes * 60 * fps), width, height, seed=0)
        write_video(partial, frames, fps=fps, crf=23)
        partial.rename(path)  # only a complete file ever has the final name
    return path


def sampling_speed(clip: Path, sampling: SamplingSettings) -> dict[str, float]:
    """Sample one video in this process: frames, seconds, frames per second."""
    result = sample_video(clip, "speed", sampling)
    return {
        "frames": len(result),
        "seconds": round(result.decode_seconds, 3),
        "frames_per_s": round(len(result) / result.decode_seconds, 2),
    }


def run(items: list[VideoItem], sampling: SamplingSettings, settings: RaySettings):
    """Decode all; return wall seconds, frames and each result's worker stats."""
    start = time.perf_counter()
    frames, failures, stats = 0, [], []
    for result, worker in decode_videos_with_stats(items, sampling, settings, progress=False):
        if isinstance(result, DecodeFailure):
            failures.append(f"{result.video_id}: {result.reason}")
        else:
            frames += len(result)
        if worker is not None:
            stats.append(worker)
    if failures:
        raise SystemExit("benchmark videos failed to decode:\n" + "\n".join(failures))
    return time.perf_counter() - start, frames, stats


def memory_per_worker(stats: list[WorkerStats]) -> list[dict[str, float]]:
    """Per worker, in completion order: RSS after its first and last video, max, peak."""
    by_pid: dict[int, list[WorkerStats]] = defaultdict(list)
    for s in stats:
        by_pid[s.pid].append(s)
    rows = []
    for pid, seq in by_pid.items():
        # Flatness: how far RSS moves over the second half of the worker's videos (the first
        # few grow it while the allocator and the object-store mapping warm up).
        late = [s.rss_bytes for s in seq[len(seq) // 2 :]]
        rows.append({
            "pid": pid,
            "videos": len(seq),
            "rss_first_mib": round(seq[0].rss_bytes / MIB, 1),
            "rss_last_mib": round(seq[-1].rss_bytes / MIB, 1),
            "rss_max_mib": round(max(s.rss_bytes for s in seq) / MIB, 1),
            "peak_rss_mib": round(max(s.peak_rss_bytes for s in seq) / MIB, 1),
            "rss_spread_second_half_mib": round((max(late) - min(late)) / MIB, 1),
            "uss_first_mib": round(seq[0].uss_bytes / MIB, 1),
            "uss_last_mib": round(seq[-1].uss_bytes / MIB, 1),
            "uss_max_mib": round(max(s.uss_bytes for s in seq) / MIB, 1),
            "rss_after_each_mib": [round(s.rss_bytes / MIB, 1) for s in seq],
            "uss_after_each_mib": [round(s.uss_bytes / MIB, 1) for s in seq],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=4, help="videos for Ray vs serial")
    parser.add_argument("--workers", type=int, default=2, help="Ray decode workers")
    parser.add_argument("--memory-videos", type=int, default=20,
                        help="videos for the memory-per-worker run (0 skips it)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="repeat Ray vs serial, keep each one's best (for a busy machine)")
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the clip")
    parser.add_argument("--resize", default="336x336",
                        help="decode to WxH (the captioner's input), or 'none' for 640x480")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    resize = None if args.resize == "none" else [int(v) for v in args.resize.split("x")]
    base = SamplingSettings(resize=resize)
    fps_policy = replace(base, policy="fps", fps=1.0)
    uniform_policy = replace(base, policy="uniform", num_frames=8)
    info = ray_machine()
    clip = bench_clip(args.minutes)

    print("sampling one video in this process ...", flush=True)
    speed = {"fps_1": sampling_speed(clip, fps_policy),
             "uniform_8": sampling_speed(clip, uniform_policy)}

    from pipeline.ray_cluster import init_ray, shutdown_ray

    ray_settings = RaySettings(num_cpus=max(args.workers, os.cpu_count() or 1),
                               decode_workers=args.workers)
    t0 = time.perf_counter()
    init_ray(ray_settings)
    ray_start_s = time.perf_counter() - t0

    items = [VideoItem(f"copy{i}", clip) for i in range(args.videos)]
    serial_runs, ray_runs = [], []
    for _ in range(args.repeats):  # alternate, so a change in machine load hits both
        print(f"decoding {args.videos} videos serially ...", flush=True)
        serial_s, serial_frames, _ = run(items, fps_policy, RaySettings(enabled=False))
        print(f"decoding {args.videos} videos on {args.workers} Ray workers ...", flush=True)
        ray_s, ray_frames, _ = run(items, fps_policy, ray_settings)
        assert ray_frames == serial_frames, (ray_frames, serial_frames)
        serial_runs.append(round(serial_s, 2))
        ray_runs.append(round(ray_s, 2))
    serial_s, ray_s = min(serial_runs), min(ray_runs)

    memory = []
    if args.memory_videos:
        print(f"memory: {args.memory_videos} videos on {args.workers} Ray workers ...",
              flush=True)
        many = [VideoItem(f"mem{i}", clip) for i in range(args.memory_videos)]
        _, _, stats = run(many, fps_policy, ray_settings)
        memory = memory_per_worker(stats)
    shutdown_ray()

    results = {
        "machine": info,
        "clip": {"path": str(clip), "minutes": args.minutes, "size": "640x480", "fps": 30,
                 "codec": "h264", "bytes": clip.stat().st_size},
        "resize": resize,
        "sampling_one_video": speed,
        "ray_cluster_start_s": round(ray_start_s, 2),
        "parallel": {"videos": args.videos, "workers": args.workers,
                     "frames": serial_frames, "serial_s": serial_s, "ray_s": ray_s,
                     "serial_runs_s": serial_runs, "ray_runs_s": ray_runs},
        "ray_speedup": round(serial_s / ray_s, 3),
        "memory_per_worker": memory,
        "settings": {"fps_policy": asdict(fps_policy), "uniform_policy": asdict(uniform_policy)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results written to {args.out}")
    return 0


def print_table(r: dict) -> None:
    m, s, p = r["machine"], r["sampling_one_video"], r["parallel"]
    size = "x".join(map(str, r["resize"])) if r["resize"] else "640x480"
    print(f"\nDecode benchmark on {m['host']}: {m['cpu']}, {m['cores']} cores, "
          f"load average {m['load_average_at_start']} at start; frames decoded at {size}")
    print(f"{'measure':<46}{'value':>24}")
    print(f"{'sampling at 1 fps (one video, one process)':<46}"
          f"{s['fps_1']['frames_per_s']:>13.1f} frames/s"
          f"  ({s['fps_1']['frames']} frames in {s['fps_1']['seconds']:.1f} s)")
    print(f"{'sampling 8 uniform frames (one video)':<46}"
          f"{s['uniform_8']['frames_per_s']:>13.1f} frames/s"
          f"  ({s['uniform_8']['frames']} frames in {s['uniform_8']['seconds']:.1f} s)")
    print(f"{'Ray cluster start (not in the timings)':<46}{r['ray_cluster_start_s']:>22.1f} s")
    print(f"{p['videos']} videos serially{'':<29}{p['serial_s']:>22.1f} s")
    print(f"{p['videos']} videos on {p['workers']} Ray workers{'':<22}{p['ray_s']:>22.1f} s")
    print(f"{'ray_speedup (goal >= 1.6 on 2 cores)':<46}{r['ray_speedup']:>23.2f}x")
    for w in r["memory_per_worker"]:
        label = f"worker pid {w['pid']}, {w['videos']} videos: RSS"
        print(f"{label:<46}first {w['rss_first_mib']:.0f} / last {w['rss_last_mib']:.0f} / "
              f"max {w['rss_max_mib']:.0f} MiB (peak {w['peak_rss_mib']:.0f}); "
              f"second half within {w['rss_spread_second_half_mib']:.0f} MiB")
        label = f"worker pid {w['pid']}, {w['videos']} videos: private (USS)"
        print(f"{label:<46}first {w['uss_first_mib']:.0f} / last {w['uss_last_mib']:.0f} / "
              f"max {w['uss_max_mib']:.0f} MiB")


if __name__ == "__main__":
    raise SystemExit(main())
