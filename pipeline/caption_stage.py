"""Captioning stage: decoded videos in, captioned videos out, frames batched across videos.

`CaptionWorker` is the model stage as a small stateful callable (Ray Data style): it loads
the captioner once and captions one batch per call. It runs in-process (serial path, tests)
or as a Ray actor: one per GPU with `num_gpus=1`, or `ray.cpu_caption_actors` CPU actors.

`caption_videos` is the scheduler between the decode stream and the workers: it packs
frames of different videos into batches of `captioner.batch_size`, keeps a bounded number
of batches in flight per worker (backpressure: it stops pulling decoded videos while the
workers are busy, so memory stays bounded), and yields each video as soon as all of its
frames are captioned. A failed batch is split by video and each part retried once; a video
that fails again is yielded as a `CaptionFailure`, and the others go on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from captioner.base import CaptionBatch, Captioner, CaptionResult, build_captioner
from captioner.settings import CaptionerSettings
from pipeline.config import RaySettings
from pipeline.errors import CaptionerError
from pipeline.records import SampledFrames

log = logging.getLogger(__name__)

# Batches in flight per worker: 2 lets the next batch be queued while one runs.
BATCHES_IN_FLIGHT_PER_WORKER = 2
# A lost caption actor that Ray cannot restart this long (no node has room) is given up.
ACTOR_RESTART_TIMEOUT_S = 300.0


@dataclass
class CaptionedVideo:
    """All captions of one video, in frame order."""

    frames: SampledFrames  # frames.frames is dropped (set to an empty array) once captioned
    results: list[CaptionResult]
    caption_seconds: float  # this video's share of the batches' wall-clock


@dataclass
class CaptionFailure:
    video_id: str
    path: str
    reason: str
    stage: str = "caption"


class CaptionWorker:
    """Loads a captioner once; `__call__` captions one batch (N, H, W, 3) uint8."""

    def __init__(self, settings: CaptionerSettings, name: str | None = None,
                 torch_threads: int | None = None) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        name = name or settings.name
        try:
            self.captioner: Captioner = build_captioner(settings, name)
        except CaptionerError:
            raise
        except Exception as exc:  # hub unreachable, bad files, out of memory: say which
            raise CaptionerError(
                f"captioner {name!r} could not be built: {type(exc).__name__}: "
                f"{_first_lines(str(exc))}"
            ) from exc

    def __call__(self, frames: np.ndarray) -> CaptionBatch:
        return self.captioner.caption_batch(frames)

    def ping(self) -> bool:
        return True


def _first_lines(text: str, lines: int = 2) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines()[:lines])


@dataclass
class _Pending:
    """A video whose frames are (partly) in flight."""

    frames: SampledFrames
    results: list[CaptionResult | None]
    remaining: int
    seconds: float = 0.0
    failed: str | None = None


@dataclass
class _Batch:
    # (video_id, frame index within the video) per row of `pixels`
    slots: list[tuple[str, int]]
    pixels: np.ndarray
    retry: bool = False
    worker: int = 0
    started: float = field(default_factory=time.perf_counter)


class CaptionActorPool:
    """CaptionWorker actors (one per GPU, or `ray.cpu_caption_actors` per node on CPU) with
    per-actor in-flight accounting. Created once, it can serve several `caption_videos`
    calls (the caller then shuts it down); the constructor returns once every actor has its
    model. Actors are placed with SPREAD scheduling, so a cluster captions on every node.

    A lost actor (its process or its node died) fails only its batches, which the scheduler
    retries on the actors still up; Ray restarts it once (`max_restarts=1`) where resources
    allow, and it takes work again when it answers a ping. One that is not back within
    `ACTOR_RESTART_TIMEOUT_S` (no node has room for it) is given up.
    """

    def __init__(self, settings: CaptionerSettings, ray_settings: RaySettings) -> None:
        import ray

        from pipeline.ray_cluster import current_plan

        plan = current_plan(ray_settings)  # the one place the cluster is divided up
        count, options, threads = plan.caption_actors, plan.caption_actor_options, \
            plan.caption_threads
        # max_task_retries=0: a batch on a lost actor fails at once and is retried on a live
        # one, instead of waiting for a restart that may never find a free node.
        actor_cls = ray.remote(CaptionWorker).options(
            max_restarts=1, max_task_retries=0, scheduling_strategy="SPREAD", **options
        )
        self.actors: list[Any] = [actor_cls.remote(settings, None, threads)
                                  for _ in range(count)]
        self.in_flight = [0] * count
        self._refs: dict[Any, _Batch] = {}
        self._down: dict[int, tuple[Any, float]] = {}  # actor -> (its ping, lost since)
        # A captioner that cannot be built fails every video alike: stop the run with the
        # reason now, instead of failing each batch with the same traceback.
        try:
            ray.get([actor.ping.remote() for actor in self.actors])
        except ray.exceptions.RayActorError as exc:
            self.shutdown()
            reason = str(exc)
            marker = "CaptionerError: "
            if marker in reason:
                reason = reason[reason.rindex(marker) + len(marker):]
            raise CaptionerError(
                f"captioner {settings.name!r} could not start in its Ray actor: "
                f"{_first_lines(reason)}"
            ) from None

    def _up(self) -> list[int]:
        return [i for i, a in enumerate(self.actors) if a is not None and i not in self._down]

    def capacity(self) -> int:
        up = self._up()
        return BATCHES_IN_FLIGHT_PER_WORKER * len(up) - sum(self.in_flight[i] for i in up)

    def submit(self, batch: _Batch) -> None:
        up = self._up()
        if not up:
            raise CaptionerError("every caption actor was lost (their nodes died or they "
                                 "crashed twice); no actor is left to caption on")
        worker = min(up, key=lambda i: self.in_flight[i])
        batch.worker = worker
        batch.started = time.perf_counter()
        ref = self.actors[worker].__call__.remote(batch.pixels)
        self.in_flight[worker] += 1
        self._refs[ref] = batch

    def busy(self) -> bool:
        return bool(self._refs or self._down)

    def wait(self, block: bool) -> list[tuple[_Batch, CaptionBatch | Exception]]:
        import ray

        pings = {ping: i for i, (ping, _) in self._down.items()}
        if not self._refs and not pings:
            return []
        timeout = 0.0 if not block else (5.0 if pings else None)  # pings: check deadlines
        ready, _ = ray.wait(list(self._refs) + list(pings), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            if ref in pings:
                self._answered(pings[ref], ref)
                continue
            batch = self._refs.pop(ref)
            self.in_flight[batch.worker] -= 1
            try:
                out.append((batch, ray.get(ref)))
            except ray.exceptions.RayActorError as exc:  # the actor or its node died
                self._lost(batch.worker)
                out.append((batch, exc))
            except Exception as exc:  # a captioner error: this batch only
                out.append((batch, exc))
        self._give_up_late_restarts()
        return out

    def _lost(self, index: int) -> None:
        if index not in self._down and self.actors[index] is not None:
            log.warning("caption actor %d lost; its batches go to the others", index)
            self._down[index] = (self.actors[index].ping.remote(), time.monotonic())

    def _answered(self, index: int, ping: Any) -> None:
        import ray

        del self._down[index]
        try:
            ray.get(ping)
            log.info("caption actor %d is back", index)
        except ray.exceptions.RayActorError:  # out of restarts: gone for good
            self.actors[index] = None

    def _give_up_late_restarts(self) -> None:
        import ray

        now = time.monotonic()
        for index, (_, since) in list(self._down.items()):
            if now - since > ACTOR_RESTART_TIMEOUT_S:
                log.warning("caption actor %d did not come back in %.0f s; given up",
                            index, ACTOR_RESTART_TIMEOUT_S)
                ray.kill(self.actors[index])
                self.actors[index] = None
                del self._down[index]
        if not any(a is not None for a in self.actors):
            raise CaptionerError("every caption actor was lost (their nodes died or they "
                                 "did not restart); no actor is left to caption on")

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            if actor is not None:
                ray.kill(actor)


class _LocalWorkers:
    """The serial path: one in-process worker, each batch runs at submit time."""

    def __init__(self, worker: CaptionWorker) -> None:
        self.worker = worker
        self._done: deque[tuple[_Batch, CaptionBatch | Exception]] = deque()

    def capacity(self) -> int:
        return 1 - len(self._done)

    def submit(self, batch: _Batch) -> None:
        batch.started = time.perf_counter()
        try:
            self._done.append((batch, self.worker(batch.pixels)))
        except Exception as exc:
            self._done.append((batch, exc))

    def busy(self) -> bool:
        return bool(self._done)

    def wait(self, block: bool) -> list[tuple[_Batch, CaptionBatch | Exception]]:
        out = list(self._done)
        self._done.clear()
        return out

    def shutdown(self) -> None:
        pass


def caption_videos(
    videos: Iterable[SampledFrames | Any],
    settings: CaptionerSettings,
    ray_settings: RaySettings,
    local_worker: CaptionWorker | None = None,
    pool: CaptionActorPool | None = None,
) -> Iterator[CaptionedVideo | CaptionFailure | Any]:
    """Caption every frame of every decoded video; yield videos as they complete.

    Items of `videos` that are not SampledFrames (decode failures) are passed through
    unchanged, so the caller sees one stream. With `ray_settings.enabled` false (or a
    `local_worker` given) everything runs in this process. A `pool` given is used and left
    running; otherwise one is made for this call and shut down at its end.
    """
    owned = pool is None
    if pool is not None:
        workers: CaptionActorPool | _LocalWorkers = pool
    elif ray_settings.enabled and local_worker is None:
        workers = CaptionActorPool(settings, ray_settings)
    else:
        workers = _LocalWorkers(local_worker or CaptionWorker(settings))
    batch_size = settings.batch_size
    pending: dict[str, _Pending] = {}
    queue: deque[tuple[str, int]] = deque()  # frames waiting for a batch
    source = iter(videos)
    exhausted = False

    def make_batch(slots: list[tuple[str, int]], retry: bool = False) -> _Batch:
        pixels = np.stack([pending[v].frames.frames[i] for v, i in slots])
        return _Batch(slots=slots, pixels=pixels, retry=retry)

    def finish(video_id: str) -> CaptionedVideo | CaptionFailure:
        item = pending.pop(video_id)
        item.frames.frames = item.frames.frames[:0]  # release the pixels
        if item.failed:
            return CaptionFailure(video_id, str(item.frames.path), item.failed)
        return CaptionedVideo(item.frames, list(item.results), item.seconds)  # type: ignore[arg-type]

    def handle(batch: _Batch, outcome: CaptionBatch | Exception) -> Iterator[Any]:
        touched = {v for v, _ in batch.slots}
        if isinstance(outcome, Exception):
            if not batch.retry:
                log.warning("caption batch of %d frames failed (%s); retrying per video",
                            len(batch.slots), str(outcome).splitlines()[0] if str(outcome) else
                            type(outcome).__name__)
                for video_id in touched:
                    slots = [s for s in batch.slots if s[0] == video_id]
                    retry_queue.append(make_batch(slots, retry=True))
                return
            for video_id in touched:
                item = pending[video_id]
                item.failed = item.failed or f"captioning failed twice: {outcome}"
                item.remaining -= sum(1 for v, _ in batch.slots if v == video_id)
        else:
            if len(outcome.results) != len(batch.slots):
                raise RuntimeError(
                    f"captioner returned {len(outcome.results)} results for "
                    f"{len(batch.slots)} frames"
                )
            elapsed = sum(outcome.timings.values()) or (time.perf_counter() - batch.started)
            for (video_id, index), result in zip(batch.slots, outcome.results, strict=True):
                item = pending[video_id]
                item.results[index] = result
                item.remaining -= 1
                item.seconds += elapsed / len(batch.slots)
        for video_id in touched:
            if pending[video_id].remaining == 0:
                yield finish(video_id)

    retry_queue: deque[_Batch] = deque()
    try:
        while True:
            # Pull decoded videos while there is room for more batches (backpressure).
            while not exhausted and len(queue) < batch_size * max(workers.capacity(), 1):
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if not isinstance(item, SampledFrames):
                    yield item  # a decode failure: passed through
                    continue
                if len(item) == 0:
                    yield CaptionedVideo(item, [], 0.0)
                    continue
                if item.video_id in pending:
                    raise ValueError(f"video id {item.video_id!r} appears twice in one run")
                pending[item.video_id] = _Pending(item, [None] * len(item), len(item))
                queue.extend((item.video_id, i) for i in range(len(item)))
            # Dispatch retries first, then full batches (a partial one once input has ended).
            while retry_queue and workers.capacity() > 0:
                workers.submit(retry_queue.popleft())
            while workers.capacity() > 0 and (len(queue) >= batch_size or exhausted and queue):
                slots = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
                workers.submit(make_batch(slots))
            if not workers.busy():
                if exhausted and not queue and not retry_queue:
                    break
                continue
            block = exhausted or workers.capacity() <= 0
            for batch, outcome in workers.wait(block=block):
                yield from handle(batch, outcome)
    finally:
        if owned:
            workers.shutdown()
    for video_id in list(pending):  # only reachable if a bug left frames unaccounted
        yield finish(video_id)
