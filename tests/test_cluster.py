"""A real 2-node Ray cluster on this machine: joining it with `ray.address`, work on both
nodes, captions equal to a local run, the cache shared, a node-local path, node loss.

The cluster is started once for the module (pipeline/local_cluster.py) and stopped after
it; the node-loss test kills the worker node, so it runs last.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from captioner.random_weights import build_tiny_checkpoint
from pipeline.cache import CaptionCache
from pipeline.captioning import caption_videos_cached
from pipeline.config import Config, RaySettings, SamplingSettings, load_config
from pipeline.decode import DecodeFailure, decode_videos
from pipeline.local_cluster import LocalCluster, mount_namespaces_permitted, nodes_used
from pipeline.records import SampledFrames, VideoItem
from pipeline.synth import textured_frames, write_video

FRAMES_PER_VIDEO = 6  # 6 s at sampling.fps 1; also the batch size (one video per batch)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from pipeline.ray_cluster import init_ray, shutdown_ray

    shutdown_ray()  # an earlier module's local cluster: this module joins its own
    head_only = tmp_path_factory.mktemp("cluster") / "head-only"
    local = LocalCluster(cpus_per_node=2, hidden_on_worker=head_only)
    local.start()
    init_ray(RaySettings(address=local.address))
    yield local
    shutdown_ray()
    local.stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cluster-tiny") / "mmser", refine=True)


def _videos(folder: Path, count: int, start: int = 0) -> list[VideoItem]:
    items = []
    for i in range(start, start + count):
        path = folder / f"v{i}.mp4"
        if not path.exists():
            write_video(path, textured_frames(5 * FRAMES_PER_VIDEO, 96, 64, seed=i), fps=5)
        items.append(VideoItem(f"v{i}", path))
    return items


def _config(tmp: Path, checkpoint: Path, cache: str, address: str | None) -> Config:
    ray = [f"ray.address={address}"] if address else ["ray.enabled=false"]
    return load_config(overrides=[
        f"cache.dir={tmp / cache}", "captioner.name=mmser",
        f"captioner.mmser.checkpoint={checkpoint}", f"captioner.batch_size={FRAMES_PER_VIDEO}",
        "captioner.generation.max_new_tokens=6", "captioner.device=cpu",
        "captioner.dtype=float32", "sampling.resize=[64, 64]", "ray.decode_workers=1",
        "ray.cpu_caption_actors=1", *ray,
    ])


def _captions(outcome) -> dict[str, list[str]]:
    return {vid: [c.caption for c in t.captions] for vid, t in outcome.transcripts.items()}


def test_a_run_on_the_cluster_uses_both_nodes_matches_a_local_run_and_caches(
    cluster, checkpoint, tmp_path
):
    videos = _videos(tmp_path / "shared", 6)
    config = _config(tmp_path, checkpoint, "cache", cluster.address)
    started = time.time()
    outcome = caption_videos_cached(videos, config)
    assert outcome.failures == []
    assert outcome.stats.captioned_videos == 6
    used = nodes_used(since=started)
    assert set(used["DecodeWorker"]) == set(used["CaptionWorker"]) == cluster.node_ids()

    # One video per batch on both sides, so the float rounding is the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cluster's caption actors run 1 thread each (2 CPUs, 1 actor)
    try:
        local = caption_videos_cached(videos, _config(tmp_path, checkpoint, "local", None))
    finally:
        torch.set_num_threads(threads)
    assert _captions(outcome) == _captions(local)

    records = {r.video_id: r for r in CaptionCache(tmp_path / "cache").iter_records()}
    assert set(records) == {v.video_id for v in videos}
    assert all(r.frames == FRAMES_PER_VIDEO and all(c.caption for c in r.captions)
               for r in records.values())
    again = caption_videos_cached(videos, config)
    assert again.stats.cache_hits == 6 and again.stats.captioned_videos == 0
    assert _captions(again) == _captions(outcome)


def test_a_path_only_the_head_node_can_read_fails_there_naming_the_node_and_path(cluster):
    if not cluster.hides_path:
        pytest.skip(f"no node-local path on this machine: {mount_namespaces_permitted()}")
    path = cluster.hidden_on_worker / "local.mp4"
    write_video(path, textured_frames(10, 96, 64, seed=9), fps=5)
    items = [VideoItem(f"copy{i}", path) for i in range(6)]
    sampling = SamplingSettings(resize=[64, 64])
    results = list(decode_videos(items, sampling, RaySettings(address=cluster.address,
                                                               decode_workers=2),
                                 progress=False))
    failed = [r for r in results if isinstance(r, DecodeFailure)]
    decoded = [r for r in results if isinstance(r, SampledFrames)]
    assert len(results) == 6 and failed and decoded  # read on the head, missing on the other
    worker_node = cluster.worker_node_id()[:12]
    for failure in failed:
        assert "no such file" in failure.reason
        assert f"node {worker_node}" in failure.reason and str(path) in failure.reason


def test_losing_the_worker_node_mid_run_finishes_the_run_and_keeps_what_was_done(
    cluster, checkpoint, tmp_path
):
    videos = _videos(tmp_path / "shared", 14)
    config = _config(tmp_path, checkpoint, "cache", cluster.address)
    outcome: list = []
    run = threading.Thread(target=lambda: outcome.append(caption_videos_cached(videos, config)))
    run.start()
    cache_dir = tmp_path / "cache"
    deadline = time.monotonic() + 240
    while not list(cache_dir.rglob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    done_before = {r.video_id for r in CaptionCache(cache_dir).iter_records()}
    assert done_before, "no video finished within 240 s"
    cluster.kill_worker()
    run.join(timeout=400)
    assert not run.is_alive(), "the run did not finish after the node was lost"
    result = outcome[0]
    assert len(done_before) < len(videos), "the run was over before the node was killed"
    # Every video is either captioned or failed with a reason; none is lost silently.
    failed = {f.video_id: f for f in result.failures}
    assert set(result.transcripts) | set(failed) == {v.video_id for v in videos}
    assert all(f.reason for f in failed.values())
    assert done_before <= set(result.transcripts)
    records = {r.video_id: r for r in CaptionCache(cache_dir).iter_records()}
    assert set(records) == set(result.transcripts)
    assert all(r.frames == FRAMES_PER_VIDEO for r in records.values())
    # The lost node's videos were retried on the head node: none needed to fail here.
    assert failed == {}, [f"{f.video_id}: {f.stage}: {f.reason}" for f in failed.values()]
