"""Start or join Ray, safely and quietly.

    init_ray(config.ray)      # private local cluster on 127.0.0.1, or join `ray.address`
    ...
    shutdown_ray()

By default a private local cluster: bound to loopback, usage stats off, no dashboard, a
short temp dir (Ray's Unix socket paths must stay under ~107 characters) and logs at warning
level. `RaySettings.address` ("auto", "host:port" or "ray://host:port") joins an existing
cluster instead, with that cluster's own settings.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RaySettings

log = logging.getLogger(__name__)

# Read by Ray when it is first imported (ray_constants) or when it starts processes; we set
# them only where the user has not. Worker processes inherit them.
_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # A private local cluster needs no token; unset, Ray warns about it on every start.
    "RAY_AUTH_MODE": "disabled",
}
# 0: Ray binds to 127.0.0.1 (a private local cluster, or one on this machine's loopback).
# Joining a cluster of machines needs 1: the driver must find its own node by the routable
# IP the cluster knows it by (with 0 Ray takes 127.0.0.1 for it).
_CLUSTER_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_set_by_us: dict[str, str] = {}  # what init_ray itself put in os.environ (it may change it)


def ray_temp_dir() -> str:
    """A short per-user temp dir (/tmp/ray-<uid>): Ray puts its sockets under it."""
    return os.path.join(tempfile.gettempdir(), f"ray-{os.getuid()}")


def init_ray(settings: RaySettings) -> None:
    """Start a private local cluster, or join `settings.address`; a no-op when Ray is up.

    Raises RuntimeError when settings.enabled is false (the caller should run serially).
    """
    if not settings.enabled:
        raise RuntimeError("ray.enabled is false: run the stage serially instead")
    wanted = {**_QUIET_ENV, _CLUSTER_FLAG: "1" if _joins_another_machine(settings) else "0"}
    for key, value in wanted.items():
        if key not in os.environ or _set_by_us.get(key) == os.environ[key]:
            os.environ[key] = _set_by_us[key] = value
    if "ray" in sys.modules:
        _sync_cluster_flag()
    import ray

    if ray.is_initialized():
        return
    common = {"logging_level": logging.WARNING, "namespace": "mmser"}
    if settings.address:
        log.info("joining the Ray cluster at %s", settings.address)
        ray.init(address=settings.address, **common)
        log.info("joined: %d nodes alive, %s", len(alive_nodes()), ray.cluster_resources())
        return
    ray.init(
        num_cpus=settings.num_cpus,
        include_dashboard=False,
        _temp_dir=ray_temp_dir(),
        **common,
    )
    log.info("started a local Ray cluster: %s", ray.cluster_resources())


def _joins_another_machine(settings: RaySettings) -> bool:
    """An address other than loopback: with 1, Ray swaps 127.0.0.1 for the routable IP."""
    if not settings.address:
        return False
    host = settings.address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host not in ("127.0.0.1", "localhost", "::1")


def _sync_cluster_flag() -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when first imported.

    When something imported Ray before init_ray set it, apply the value to the constant Ray
    read, so a local cluster still binds to 127.0.0.1 and a driver joining a cluster still
    finds its node (the lookup happens at start-up).
    """
    from ray._private import ray_constants

    wanted = os.environ.get(_CLUSTER_FLAG) == "1"
    if getattr(ray_constants, "ENABLE_RAY_CLUSTER", wanted) != wanted:
        ray_constants.ENABLE_RAY_CLUSTER = wanted


def alive_nodes() -> list[dict[str, Any]]:
    """`ray.nodes()` entries of the nodes alive now (a dead node stays listed, not Alive)."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def shutdown_ray() -> None:
    """Disconnect from Ray (and stop the local cluster this process started)."""
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_session(settings: RaySettings) -> Iterator[None]:
    """Ray up for the block; shut down after it only if this block started it."""
    import ray

    started = not ray.is_initialized()
    init_ray(settings)
    try:
        yield
    finally:
        if started:
            shutdown_ray()


@dataclass(frozen=True)
class RayPlan:
    """How the run uses the cluster: decode workers and caption actors, decided once."""

    decode_workers: int
    caption_actors: int
    caption_actor_options: dict[str, Any] = field(default_factory=dict)
    caption_threads: int | None = None  # torch threads per CPU caption actor (None: GPU)


def plan_ray(settings: RaySettings, resources: Mapping[str, float]) -> RayPlan:
    """The plan for one node. One caption actor per GPU; without GPUs `cpu_caption_actors`
    CPU actors, which hold a CPU each, so decode workers get the rest (at least one: more
    would leave one waiting for a CPU forever), and each actor's torch threads share the
    CPUs with the decoders."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        return RayPlan(settings.decode_workers, gpus, {"num_gpus": 1, "num_cpus": 1})
    actors = settings.cpu_caption_actors
    workers = max(1, min(settings.decode_workers, cpus - actors))
    if workers != settings.decode_workers:
        log.info("ray.decode_workers %d -> %d: %d CPUs, %d held by caption actors",
                 settings.decode_workers, workers, cpus, actors)
    return RayPlan(workers, actors, {"num_cpus": 1}, max(1, cpus // (actors + 1)))


def plan_cluster(settings: RaySettings, nodes: list[Mapping[str, float]]) -> RayPlan:
    """`plan_ray` per node, summed: `decode_workers` and `cpu_caption_actors` are per node,
    so a cluster runs them on every node (the actors are placed with SPREAD scheduling).
    With GPUs on some nodes, caption actors go to the GPUs only and CPU-only nodes decode."""
    if not nodes:
        raise RuntimeError("the Ray cluster has no alive nodes")
    plans = [plan_ray(settings, node) for node in nodes]
    gpu_plans = [p for p in plans if p.caption_threads is None]
    caption_plans = gpu_plans or plans
    decode = sum(settings.decode_workers if gpu_plans and p.caption_threads is not None
                 else p.decode_workers for p in plans)
    threads = None if gpu_plans else min(p.caption_threads or 1 for p in plans)
    return RayPlan(decode, sum(p.caption_actors for p in caption_plans),
                   dict(caption_plans[0].caption_actor_options), threads)


def current_plan(settings: RaySettings) -> RayPlan:
    """`plan_cluster` for the nodes alive in the cluster Ray is connected to."""
    return plan_cluster(settings, [node["Resources"] for node in alive_nodes()])
