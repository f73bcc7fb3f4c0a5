"""Decode and sample many videos in parallel Ray workers; results stream back as they finish.

    for result in decode_videos(items, config.sampling, config.ray):
        if isinstance(result, DecodeFailure):
            print(result.video_id, result.reason)      # one bad video never sinks the run
        else:
            result.frames                              # (N, H, W, 3) uint8

Ray path (ray.enabled): a pool of `ray.decode_workers` actors, each one process with
num_cpus=1 and decord num_threads=1, each holding at most 2 videos (one decoding, one
queued), so at most 2x workers are in flight and memory stays bounded. A video decoding
longer than `sampling.decode_timeout_s` gets its actor killed (decord can hang in native
code holding the GIL, so nothing short of ending the process stops it) and is reported as
failed; a worker that dies (crash, OOM kill) gets its video retried once on a fresh one.
On a multi-node cluster the actors are placed with SPREAD scheduling (every node decodes);
when a node is lost, its workers' videos go to the survivors and the pool shrinks with the
cluster's CPUs instead of waiting for a replacement that has nowhere to run. A failure
names the node that saw it (a path missing on one node: storage not shared, docs/CLUSTER.md).
Frames come back through Ray's object store: the arrays are read-only, zero-copy views.

Serial path (ray.enabled false): the same worker code in this process, in input order, for
debugging; it gives identical frames but has no timeout (a hang hangs).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from pipeline.config import RaySettings, SamplingSettings
from pipeline.errors import PipelineError, VideoDecodeError
from pipeline.frames import check_sampling, sample_video
from pipeline.records import SampledFrames, VideoItem

log = logging.getLogger(__name__)

JOBS_PER_WORKER = 2  # one decoding + one queued: workers never idle, memory stays bounded
WORKER_START_TIMEOUT_S = 300.0  # starting an actor process on a loaded machine can be slow
DIED_RETRIES = 1  # a video whose worker died is tried once more on a fresh worker
START_RETRIES = 3  # a worker that fails to start is replaced this many times, then we stop


@dataclass(frozen=True)
class DecodeFailure:
    """A video that could not be decoded; the run goes on without it."""

    video_id: str
    path: Path
    reason: str
    timed_out: bool = False


DecodeResult = SampledFrames | DecodeFailure


@dataclass(frozen=True)
class WorkerStats:
    """Memory of the process that decoded a video, measured right after it."""

    pid: int
    rss_bytes: int  # resident set now (the video's frames still held)
    peak_rss_bytes: int  # the process's high-water mark so far
    # Private memory only: RSS also counts the object-store pages the worker has written
    # results into, which are shared and belong to the store, not to the worker.
    uss_bytes: int


def _own_stats() -> WorkerStats:
    memory = psutil.Process().memory_full_info()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return WorkerStats(os.getpid(), memory.rss, peak_kib * 1024, memory.uss)


class DecodeWorker:
    """Decodes one video per call. The Ray path runs it as an actor (one killable process)."""

    def __init__(self, sampling: SamplingSettings, name_node: bool = False) -> None:
        self.sampling = sampling
        # On Ray, failures say which node saw them: on a cluster a path may exist on some
        # nodes only (a disk that is not the shared one).
        self.node = _this_node() if name_node else None

    def ready(self) -> int:
        """The worker's pid, once its process is up."""
        return os.getpid()

    def decode(self, item: VideoItem) -> tuple[DecodeResult, WorkerStats]:
        """Sample one video; a decode error becomes a DecodeFailure, not an exception."""
        try:
            result: DecodeResult = sample_video(item.path, item.video_id, self.sampling)
        except VideoDecodeError as exc:
            reason = exc.reason if self.node is None else \
                f"{exc.reason} on node {self.node}: {item.path}"
            result = DecodeFailure(item.video_id, Path(item.path), reason)
        return result, _own_stats()


def _this_node() -> str:
    """'hostname (IP, node id)' of the Ray node this process runs on."""

    import ray

    context = ray.get_runtime_context()
    ip = ray.util.get_node_ip_address()
    return f"{socket.gethostname()} ({ip}, node {context.get_node_id()[:12]})"


def decode_videos(
    items: Iterable[VideoItem],
    sampling: SamplingSettings,
    ray_settings: RaySettings,
    progress: bool = True,
    cpus_per_worker: float = 1.0,
) -> Iterator[DecodeResult]:
    """Decode every video; yield SampledFrames or DecodeFailure per video as each finishes.

    Completion order on Ray, input order when serial. Starts Ray (`init_ray`) when needed.
    `cpus_per_worker`: see `decode_videos_with_stats`.
    """
    stream = decode_videos_with_stats(items, sampling, ray_settings, progress, cpus_per_worker)
    for result, _ in stream:
        yield result


def decode_videos_with_stats(
    items: Iterable[VideoItem],
    sampling: SamplingSettings,
    ray_settings: RaySettings,
    progress: bool = True,
    cpus_per_worker: float = 1.0,
) -> Iterator[tuple[DecodeResult, WorkerStats | None]]:
    """`decode_videos`, plus the decoding process's memory after each video (benchmarks).

    Stats are None for a video whose worker was killed or died. `cpus_per_worker` is the
    Ray CPU reservation of each decode actor (lower it to share a small cluster with other
    actors; decord still uses one thread).
    """
    check_sampling(sampling)
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, desc="decode", unit="video", disable=not progress)
    failures = 0
    if ray_settings.enabled:
        results = _decode_on_ray(items, sampling, ray_settings, cpus_per_worker)
    else:
        worker = DecodeWorker(sampling)
        results = (worker.decode(item) for item in items)
    try:
        for result, stats in results:
            if isinstance(result, DecodeFailure):
                failures += 1
                bar.set_postfix(failed=failures)
            bar.update(1)
            yield result, stats
    finally:
        results.close()
        bar.close()


# --- the Ray path -----------------------------------------------------------------------


@dataclass
class _Job:
    item: VideoItem
    attempt: int = 0
    ref: Any = None  # ray.ObjectRef of DecodeWorker.decode
    started: float | None = None  # when the worker began on it (monotonic seconds)


@dataclass
class _Slot:
    """One decode actor and the videos it holds, the running one first."""

    actor: Any
    ready_ref: Any
    ready: bool = False
    pid: int | None = None  # the actor's process, once it is up
    created: float = field(default_factory=time.monotonic)
    jobs: deque[_Job] = field(default_factory=deque)


def _decode_on_ray(
    items: Iterable[VideoItem],
    sampling: SamplingSettings,
    ray_settings: RaySettings,
    cpus_per_worker: float,
) -> Iterator[tuple[DecodeResult, WorkerStats | None]]:
    from pipeline.ray_cluster import init_ray

    init_ray(ray_settings)  # before importing Ray: it reads its environment at import
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    workers = ray_settings.decode_workers
    if workers < 1:
        raise PipelineError(f"ray.decode_workers must be >= 1, got {workers}")
    # SPREAD: on a cluster, every node gets decode workers (one node: no difference).
    remote_worker = ray.remote(num_cpus=cpus_per_worker, max_restarts=0,
                               scheduling_strategy="SPREAD")(DecodeWorker)
    sampling_ref = ray.put(sampling)  # shared by every actor, fresh ones included
    start_cpus = ray.cluster_resources().get("CPU", 0.0)
    from pipeline.ray_cluster import alive_nodes

    name_node = len(alive_nodes()) > 1  # on one machine the node is noise in a reason

    def new_slot() -> _Slot:
        actor = remote_worker.remote(sampling_ref, name_node)
        return _Slot(actor=actor, ready_ref=actor.ready.remote())

    def cluster_shrank(slots: list[_Slot]) -> bool:
        """True when the cluster lost CPUs (a node died) and fewer workers fit now."""
        cpus = ray.cluster_resources().get("CPU", 0.0)
        fit = max(1, int(workers * cpus / start_cpus)) if start_cpus else workers
        return len(slots) > fit

    def submit(slot: _Slot, job: _Job) -> None:
        job.ref = slot.actor.decode.remote(job.item)
        job.started = time.monotonic() if slot.ready and not slot.jobs else None
        slot.jobs.append(job)

    def replace(slot: _Slot) -> list[_Job]:
        """Kill the slot's actor, start a fresh one; return its unfinished queued jobs."""
        ray.kill(slot.actor, no_restart=True)
        fresh = new_slot()
        slot.actor, slot.ready_ref, slot.ready, slot.pid = fresh.actor, fresh.ready_ref, False, None
        slot.created = fresh.created
        queued = list(slot.jobs)
        slot.jobs.clear()
        return queued

    def drop(slot: _Slot) -> list[_Job]:
        """Retire the slot (its node is gone); return its unfinished queued jobs."""
        ray.kill(slot.actor, no_restart=True)
        slots.remove(slot)
        log.warning("a decode worker's node left the cluster; %d workers go on", len(slots))
        queued = list(slot.jobs)
        slot.jobs.clear()
        return queued

    source = iter(items)
    todo: deque[_Job] = deque()  # jobs to (re)submit before new items
    slots = [new_slot() for _ in range(workers)]
    start_failures = 0
    try:
        while True:
            # Fill: the least-loaded slot first, at most JOBS_PER_WORKER each.
            while True:
                slot = min(slots, key=lambda s: len(s.jobs))
                if len(slot.jobs) >= JOBS_PER_WORKER:
                    break
                if todo:
                    job = todo.popleft()
                else:
                    item = next(source, None)
                    if item is None:
                        break
                    job = _Job(item)
                submit(slot, job)
            heads = {s.jobs[0].ref: s for s in slots if s.jobs}
            if not heads:
                return
            starting = {s.ready_ref: s for s in slots if not s.ready}

            now = time.monotonic()
            deadlines = [s.jobs[0].started + sampling.decode_timeout_s
                         for s in slots if s.jobs and s.jobs[0].started is not None]
            wait_s = max(min(deadlines, default=now + 1.0) - now, 0.0) + 0.05
            done, _ = ray.wait(list(heads) + list(starting), num_returns=1, timeout=wait_s)
            now = time.monotonic()

            for ref in done:
                if ref in starting:
                    slot = starting[ref]
                    try:
                        slot.pid = ray.get(ref)
                    except RayActorError as exc:
                        start_failures += 1
                        if start_failures > START_RETRIES:
                            raise PipelineError(
                                f"Ray decode workers failed to start {start_failures} times; "
                                f"last error: {_first_line(exc)}"
                            ) from exc
                        todo.extendleft(reversed(replace(slot)))
                        continue
                    slot.ready = True
                    if slot.jobs:
                        slot.jobs[0].started = now
                    continue
                slot = heads[ref]
                job = slot.jobs.popleft()
                try:
                    result, stats = ray.get(ref)
                except RayActorError as exc:
                    # The process died under this video (crash, OOM kill): fresh worker;
                    # its node died with it: the survivors take its videos.
                    if cluster_shrank(slots):
                        todo.extendleft(reversed(drop(slot)))
                    else:
                        todo.extendleft(reversed(replace(slot)))
                    if job.attempt < DIED_RETRIES:
                        todo.appendleft(_Job(job.item, job.attempt + 1))
                        continue
                    result, stats = _failure(job, f"decode worker died: {_first_line(exc)}"), None
                except RayTaskError as exc:
                    result, stats = _failure(job, f"decode worker raised: {exc.cause!r}"), None
                if slot.jobs:
                    slot.jobs[0].started = now
                yield result, stats

            # Timeouts: the worker may be stuck in native code; only killing it stops it.
            for slot in list(slots):
                if slot.jobs and slot.jobs[0].started is not None:
                    if now - slot.jobs[0].started > sampling.decode_timeout_s:
                        job, pid = slot.jobs.popleft(), slot.pid
                        todo.extendleft(reversed(replace(slot)))
                        reason = (f"decoding took longer than sampling.decode_timeout_s="
                                  f"{sampling.decode_timeout_s:g} s; its worker (pid {pid}) "
                                  "was killed")
                        yield _failure(job, reason, timed_out=True), None
                elif not slot.ready and now - slot.created > 2.0 and cluster_shrank(slots):
                    # A replacement made before Ray marked its node dead: no room for it.
                    todo.extendleft(reversed(drop(slot)))
                elif not slot.ready and now - slot.created > WORKER_START_TIMEOUT_S:
                    raise PipelineError(
                        f"a Ray decode worker (num_cpus={cpus_per_worker}) did not start in "
                        f"{WORKER_START_TIMEOUT_S:.0f} s; free CPUs in the cluster: "
                        f"{ray.available_resources().get('CPU', 0)}"
                    )
    finally:
        for slot in slots:
            ray.kill(slot.actor, no_restart=True)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _failure(job: _Job, reason: str, timed_out: bool = False) -> DecodeFailure:
    return DecodeFailure(job.item.video_id, Path(job.item.path), reason, timed_out)
