"""A real 2-node Ray cluster on this machine (loopback only), for tests and bench-cluster.

    cluster = LocalCluster(cpus_per_node=2, hidden_on_worker=Path("/tmp/x/head-only"))
    address = cluster.start()          # head via ray.cluster_utils, worker in its own process
    ...                                # ray.init(address=address) / RaySettings(address=...)
    cluster.kill_worker()              # every process of the worker node, SIGKILL
    cluster.stop()

The head node runs in this process's tree (`ray.cluster_utils.Cluster`). The worker node
is `python -m pipeline.local_cluster ADDRESS CPUS` in its own session, so its processes can
be told apart from everyone else's Ray processes on a shared machine (never `ray stop`: it
would end every Ray instance of the user). When `hidden_on_worker` is given and mount namespaces are
permitted (`unshare --mount`, root or user namespaces), the worker node runs in its own
mount namespace with an empty tmpfs over that folder: a path there is readable on the head
node only, as a node-local disk is on a real cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# Failure detection in seconds, not Ray's default ~30 s: a killed node is declared dead
# after 2 missed health checks 0.5 s apart (only the test and benchmark clusters).
FAST_FAILURE = {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
                "health_check_timeout_ms": 500}
_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled"}


def mount_namespaces_permitted() -> str | None:
    """None when `unshare --mount` can hide a folder here, else why not."""
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    probe = _unshare_prefix() + ["sh", "-c", "mount -t tmpfs none /mnt || mount -t tmpfs none /tmp"]
    done = subprocess.run(probe, capture_output=True, text=True)
    if done.returncode:
        return f"mount namespaces are not permitted: {done.stderr.strip()[:200]}"
    return None


def _unshare_prefix() -> list[str]:
    # As root a mount namespace is enough; otherwise a user namespace maps us to its root.
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private"]


class LocalCluster:
    """A head node and one worker node, each with `cpus_per_node` logical CPUs."""

    def __init__(self, cpus_per_node: int = 2, hidden_on_worker: Path | None = None,
                 worker_env: dict[str, str] | None = None) -> None:
        self.cpus_per_node = cpus_per_node
        self.hidden_on_worker = hidden_on_worker
        self.worker_env = worker_env or {}
        # Its own temp dir: `ray start` records the cluster's address there, and a shared
        # one (/tmp/ray-<uid>) would pull other users' local `ray.init()` into this cluster.
        self.temp_dir = f"/tmp/rayc-{os.getpid()}"
        self.head = None
        self.worker: subprocess.Popen | None = None
        self.hides_path = False

    @property
    def address(self) -> str:
        return self.head.address

    def start(self, timeout_s: float = 180.0) -> str:
        from ray._private.utils import get_ray_address_file
        from ray.cluster_utils import Cluster

        # cluster_utils writes its address there and fails when the folder is missing.
        Path(get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
        self.head = Cluster(initialize_head=True, head_node_args={
            "num_cpus": self.cpus_per_node, "node_ip_address": "127.0.0.1",
            "temp_dir": self.temp_dir, "include_dashboard": False,
            "_system_config": FAST_FAILURE,
        })
        _forget_default_address(self.address)
        self.start_worker(timeout_s)
        return self.address

    def start_worker(self, timeout_s: float = 180.0) -> None:
        # `python -m pipeline.local_cluster ADDRESS CPUS`: cluster_utils' own recipe for a
        # worker node, in a process of its own (`ray start` would swap 127.0.0.1 for the
        # machine's routable IP, which this loopback-only cluster does not listen on).
        start = (f"exec {sys.executable} -m pipeline.local_cluster {self.address} "
                 f"{self.cpus_per_node}")
        command = ["sh", "-c", start]
        self.hides_path = False
        if self.hidden_on_worker is not None and mount_namespaces_permitted() is None:
            self.hidden_on_worker.mkdir(parents=True, exist_ok=True)
            command = _unshare_prefix() + ["sh", "-c",
                                           f"mount -t tmpfs -o size=1m none "
                                           f"'{self.hidden_on_worker}' && {start}"]
            self.hides_path = True
        env = {**os.environ, **_ENV, **self.worker_env}
        log = open(Path(self.temp_dir) / "worker-node.log", "ab")  # noqa: SIM115 (lives with it)
        self.worker = subprocess.Popen(command, env=env, stdout=log, stderr=log,
                                       start_new_session=True,
                                       cwd=Path(__file__).resolve().parent.parent)
        self._wait_for_nodes(2, timeout_s)

    def alive_nodes(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n["Alive"]] if ray.is_initialized() else \
            [n for n in self.head.global_state.node_table() if n["Alive"]]

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) < count:
            if self.worker is not None and self.worker.poll() is not None:
                log = (Path(self.temp_dir) / "worker-node.log").read_text()[-2000:]
                raise RuntimeError(f"the worker node exited ({self.worker.returncode}): {log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} Ray nodes not alive after {timeout_s:.0f} s")
            time.sleep(0.2)

    def node_ids(self) -> set[str]:
        return {node["NodeID"] for node in self.alive_nodes()}

    def worker_node_id(self) -> str:
        head = self.head.head_node.node_id
        return next(node for node in self.node_ids() if node != head)

    def worker_pids(self) -> list[int]:
        """Every live process of the worker node: those in its session."""
        if self.worker is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == self.worker.pid:
                        pids.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    continue
        return pids

    def kill_worker(self, wait_dead_s: float = 60.0) -> None:
        """Power the worker node off: SIGKILL every process of it, wait until Ray sees it."""
        if self.worker is None:
            return
        for pid in self.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.worker.wait(timeout=30)
        self.worker = None
        deadline = time.monotonic() + wait_dead_s
        while len(self.alive_nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        self.kill_worker(wait_dead_s=0)
        if self.head is not None:
            self.head.shutdown()
            self.head = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _forget_default_address(address: str) -> None:
    """cluster_utils records its address as the default for a bare `ray.init()` (in
    /tmp/ray/ray_current_cluster); on a shared machine that would send other people's
    local runs to this cluster, so the record is removed when it is ours."""
    from ray._private.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))
    if record.exists() and record.read_text().strip() == address:
        record.unlink()


def nodes_used(since: float) -> dict[str, set[str]]:
    """The nodes each actor class of this job ran on, for actors started after `since`
    (time.time() seconds), dead ones included: from the GCS actor table."""
    import ray
    from ray._private.state import actors

    job = ray.get_runtime_context().get_job_id()
    used: dict[str, set[str]] = {}
    for info in actors().values():
        node = info["Address"]["NodeID"]
        if info["JobID"] != job or info["StartTime"] < since * 1000 or not node.strip("0"):
            continue
        used.setdefault(info["ActorClassName"], set()).add(node)
    return used


def _run_worker_node(address: str, cpus: int) -> None:
    """A worker node joined to `address` (what cluster_utils.add_node starts), until killed."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(gcs_address=address, node_ip_address="127.0.0.1", num_cpus=cpus,
                       num_gpus=0, object_store_memory=150 * 1024 * 1024, min_worker_port=0,
                       max_worker_port=0, node_manager_port=0, include_log_monitor=False)
    params.dashboard_agent_listen_port = None
    Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.pause()


if __name__ == "__main__":
    _run_worker_node(sys.argv[1], int(sys.argv[2]))
