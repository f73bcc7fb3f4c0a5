"""Parallel decoding on a real local Ray cluster vs the serial path; timeouts; bad videos."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.config import RaySettings, SamplingSettings
from pipeline.decode import DecodeFailure, decode_videos, decode_videos_with_stats
from pipeline.records import SampledFrames, VideoItem
from pipeline.synth import read_index, write_indexed_video

RAY = RaySettings(num_cpus=2, decode_workers=2)
SERIAL = RaySettings(enabled=False)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the whole session (starting one costs seconds)."""
    import ray

    from pipeline.ray_cluster import init_ray, shutdown_ray

    started = not ray.is_initialized()
    init_ray(RAY)
    yield
    if started:
        shutdown_ray()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decode")
    paths = {
        "short": write_indexed_video(root / "short.mp4", 45, fps=30),
        "long": write_indexed_video(root / "long.mp4", 150, fps=30, width=192, height=144),
        "vfr": write_indexed_video(
            root / "vfr.mp4", 80, fps=25, pts_seconds=[i * 0.04 + (i % 3) * 0.01 for i in range(80)]
        ),
    }
    for i in range(3):
        paths[f"clip{i}"] = write_indexed_video(root / f"clip{i}.mp4", 60 + 15 * i, fps=30)
    paths["corrupt"] = root / "corrupt.mp4"
    paths["corrupt"].write_bytes(np.random.default_rng(1).bytes(10_000))
    paths["missing"] = root / "missing.mp4"
    # A named pipe with no writer: opening it blocks in native code, like a hung decode.
    paths["hang"] = root / "hang.mp4"
    os.mkfifo(paths["hang"])
    return paths


def items(videos: dict[str, Path], *names: str) -> list[VideoItem]:
    return [VideoItem(name, videos[name]) for name in names]


def by_id(results) -> dict[str, SampledFrames | DecodeFailure]:
    return {r.video_id: r for r in results}


def test_ray_and_serial_paths_give_identical_frames(ray_cluster, videos):
    names = ("short", "long", "vfr", "clip0", "clip1", "clip2")
    sampling = SamplingSettings(policy="fps", fps=2.0, resize=[160, 128])
    on_ray = by_id(decode_videos(items(videos, *names), sampling, RAY, progress=False))
    serial = by_id(decode_videos(items(videos, *names), sampling, SERIAL, progress=False))
    assert set(on_ray) == set(serial) == set(names)
    for name in names:
        a, b = on_ray[name], serial[name]
        assert isinstance(a, SampledFrames) and isinstance(b, SampledFrames)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.timestamps, b.timestamps)
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.frames.shape[1:] == (128, 160, 3)
        assert [read_index(f) for f in a.frames] == a.indices.tolist()


def test_one_bad_video_does_not_sink_the_run(ray_cluster, videos):
    names = ("clip0", "corrupt", "missing", "clip1")
    sampling = SamplingSettings(policy="uniform", num_frames=4, resize=None)
    results = by_id(decode_videos(items(videos, *names), sampling, RAY, progress=False))
    assert isinstance(results["clip0"], SampledFrames) and len(results["clip0"]) == 4
    assert isinstance(results["clip1"], SampledFrames) and len(results["clip1"]) == 4
    assert isinstance(results["corrupt"], DecodeFailure)
    assert "Invalid data found" in results["corrupt"].reason
    assert results["missing"] == DecodeFailure("missing", videos["missing"], "no such file")


def test_serial_path_keeps_input_order_and_reports_failures(videos):
    names = ("clip2", "missing", "short")
    sampling = SamplingSettings(resize=None)
    results = list(decode_videos(items(videos, *names), sampling, SERIAL, progress=False))
    assert [r.video_id for r in results] == list(names)
    assert isinstance(results[1], DecodeFailure)
    assert [read_index(f) for f in results[2].frames] == [0, 30]


def test_timeout_kills_a_hung_decode_and_the_rest_goes_on(ray_cluster, videos):
    # One worker: the videos queued behind the hung one must move to its replacement.
    settings = RaySettings(num_cpus=2, decode_workers=1)
    sampling = SamplingSettings(resize=None, decode_timeout_s=2.0)
    start = time.monotonic()
    results = by_id(
        decode_videos(items(videos, "hang", "clip0", "short"), sampling, settings, progress=False)
    )
    hung = results["hang"]
    assert isinstance(hung, DecodeFailure) and hung.timed_out
    assert "decode_timeout_s" in hung.reason
    assert isinstance(results["clip0"], SampledFrames)
    assert isinstance(results["short"], SampledFrames)
    assert time.monotonic() - start < 60
    # The worker blocked opening the pipe is gone (an unkilled one would block forever).
    # ray.kill is asynchronous: allow it a few seconds.
    pid = int(re.search(r"pid (\d+)", hung.reason).group(1))
    assert pid != os.getpid()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_worker_that_dies_gets_its_video_retried_on_a_fresh_one(ray_cluster, videos):
    settings = RaySettings(num_cpus=2, decode_workers=1)
    sampling = SamplingSettings(resize=None, decode_timeout_s=6.0)
    stream = decode_videos_with_stats(
        items(videos, "clip0", "hang", "short"), sampling, settings, progress=False
    )
    first, stats = next(stream)
    assert first.video_id == "clip0" and stats is not None
    # The worker has moved on to the pipe and blocks there; kill it from outside, as the
    # kernel's OOM killer would. Reading wchan tells when it is blocked (Linux).
    wchan = Path(f"/proc/{stats.pid}/wchan")
    deadline = time.monotonic() + 5
    while wchan.read_text() != "wait_for_partner" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wchan.read_text() == "wait_for_partner"
    os.kill(stats.pid, signal.SIGKILL)
    rest = by_id(result for result, _ in stream)
    # Retried once on a fresh worker, which blocks too and is killed by the timeout.
    hung = rest["hang"]
    assert isinstance(hung, DecodeFailure) and hung.timed_out
    assert int(re.search(r"pid (\d+)", hung.reason).group(1)) != stats.pid
    assert isinstance(rest["short"], SampledFrames)


def test_in_flight_videos_are_bounded(ray_cluster, videos):
    pulled = 0

    def source() -> Iterator[VideoItem]:
        nonlocal pulled
        for i in range(10):
            pulled += 1
            yield VideoItem(f"v{i}", videos[f"clip{i % 3}"])

    sampling = SamplingSettings(policy="uniform", num_frames=2, resize=None)
    stream = decode_videos_with_stats(source(), sampling, RAY, progress=False)
    first, stats = next(stream)
    # 2 workers x 2 videos each: no more was taken from the source before the first result.
    assert pulled <= 4
    assert isinstance(first, SampledFrames) and stats is not None and stats.rss_bytes > 0
    assert stats.pid != os.getpid()
    rest = list(stream)
    assert pulled == 10 and len(rest) == 9


def test_local_cluster_is_on_loopback_and_init_is_idempotent(ray_cluster):
    import ray

    from pipeline.ray_cluster import init_ray

    init_ray(RAY)  # already up: a no-op, not an error
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
