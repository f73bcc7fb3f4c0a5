"""Cluster benchmark: the same videos on a 2-node local Ray cluster and on one node.

    python -m benchmarks.cluster                     # or: make bench-cluster
    python -m benchmarks.cluster --videos 4 --seconds 6      # quicker

Both layouts caption the same generated videos with the tiny local MM-SeR captioner
(random weights: only its cost matters) through `caption_videos_cached` on an empty cache:
  one_node   a private local cluster with --cpus-per-node CPUs;
  two_nodes  a head node and a worker node (pipeline/local_cluster.py: real Ray processes,
             loopback only), each with --cpus-per-node CPUs, joined with `ray.address`.
The batch size is one video's frame count, so both layouts batch alike and the captions
must be identical (`captions_identical`). `nodes_used` counts the nodes that ran decode
workers and caption actors. On one machine both nodes share its cores: the two-node
wall-clock shows the cost of the layout, not a speed-up. Written to
benchmarks/results/cluster.json; the table last. Then `--questions` questions are answered by
2 tiny reader replicas (vLLM CPU servers) with one killed mid-run (benchmarks/replicas.py):
`questions`, `answered`, `answered_twice`, `replica_killed`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import machine
from benchmarks.replicas import replica_fault_run
from captioner.random_weights import build_tiny_checkpoint
from pipeline.captioning import caption_videos_cached
from pipeline.config import Config, load_config
from pipeline.local_cluster import LocalCluster, nodes_used
from pipeline.ray_cluster import init_ray, shutdown_ray
from pipeline.records import VideoItem
from pipeline.synth import textured_frames, write_video

BENCH_DIR = Path("data/bench/cluster")
RESULTS = Path("benchmarks/results/cluster.json")


def make_videos(n: int, seconds: int, width: int = 160, height: int = 120) -> list[VideoItem]:
    items = []
    for i in range(n):
        path = BENCH_DIR / f"video{i:02d}_{width}x{height}_{seconds}s.mp4"
        if not path.exists():
            partial = path.with_suffix(".partial.mp4")
            write_video(partial, textured_frames(seconds * 5, width, height, seed=i), fps=5)
            partial.rename(path)  # only a complete file ever has the final name
        items.append(VideoItem(f"video{i:02d}", path))
    return items


def run_layout(videos: list[VideoItem], config: Config) -> dict[str, Any]:
    """One cold run on the cluster Ray is connected to: wall-clock, nodes, captions."""
    started = time.time()
    outcome = caption_videos_cached(videos, config)
    used = nodes_used(since=started)
    return {
        "wall_s": round(time.time() - started, 2),
        "nodes_used": len(set().union(*used.values())) if used else 0,
        "failures": [f"{f.video_id}: {f.stage}: {f.reason}" for f in outcome.failures],
        "captions": {v: [c.caption for c in t.captions] for v, t in outcome.transcripts.items()},
    }


REPLICA_KEYS = ("questions", "answered", "answered_twice", "replica_killed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=8, help="length of each video (1 fps)")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=12, help="fixed caption length")
    parser.add_argument("--questions", type=int, default=40,
                        help="questions for the 2 reader replicas, one killed (0: skip)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    videos = make_videos(args.videos, args.seconds)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    checkpoint = build_tiny_checkpoint(work / "mmser-tiny")

    def config(cache: str, address: str | None) -> Config:
        where = [f"ray.address={address}"] if address else [f"ray.num_cpus={args.cpus_per_node}"]
        return load_config(overrides=[
            f"cache.dir={work / cache}", "captioner.name=mmser", "captioner.device=cpu",
            f"captioner.mmser.checkpoint={checkpoint}", f"captioner.batch_size={args.seconds}",
            "captioner.dtype=float32", f"captioner.generation.max_new_tokens={args.new_tokens}",
            f"captioner.generation.min_new_tokens={args.new_tokens}", "sampling.resize=[64, 64]",
            "ray.decode_workers=1", "ray.cpu_caption_actors=1", *where,
        ])

    try:
        init_ray(config("one", None).ray)
        one = run_layout(videos, config("one", None))
        shutdown_ray()
        cluster = LocalCluster(cpus_per_node=args.cpus_per_node)
        cluster.start()
        try:
            init_ray(config("two", cluster.address).ray)
            two = run_layout(videos, config("two", cluster.address))
        finally:
            shutdown_ray()
            cluster.stop()
    finally:
        shutdown_ray()
        shutil.rmtree(work, ignore_errors=True)
    # Reader replicas after the cluster is down: two tiny vLLM CPU servers take both cores.
    replicas: dict[str, Any] = {}
    if args.questions:
        print(f"reader replicas: {args.questions} questions, 2 replicas, one killed", flush=True)
        replicas = replica_fault_run(questions=args.questions, progress=True)

    result = {
        "machine": machine(torch.device("cpu")),
        "dtype": "float32",  # the captioner's, set in config() above (CPU, any capability)
        "videos": args.videos, "frames_per_video": args.seconds,
        "cpus_per_node": args.cpus_per_node,
        "nodes_used": two["nodes_used"], "nodes_used_one_node": one["nodes_used"],
        "captions_identical": bool(one["captions"]) and one["captions"] == two["captions"],
        "wall_s": {"one_node": one["wall_s"], "two_nodes": two["wall_s"]},
        "failures": {"one_node": one["failures"], "two_nodes": two["failures"]},
        # The figures at the top; everything the replica run measured beside them.
        **{key: replicas[key] for key in REPLICA_KEYS if key in replicas},
        "reader_replicas": replicas,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(f"{'layout':<10} {'nodes':>5} {'videos':>6} {'failed':>6} {'wall s':>7}")
    for name, layout in (("one_node", one), ("two_nodes", two)):
        print(f"{name:<10} {layout['nodes_used']:>5} {len(layout['captions']):>6} "
              f"{len(layout['failures']):>6} {layout['wall_s']:>7.1f}")
    print(f"captions identical: {result['captions_identical']}")
    if replicas:
        print(f"reader replicas: questions {replicas['questions']}, answered "
              f"{replicas['answered']}, answered_twice {replicas['answered_twice']}, "
              f"replica_killed {replicas['replica_killed']}, failed {replicas['failed']}")


if __name__ == "__main__":
    main()
