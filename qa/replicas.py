"""Several reader replicas (OpenAI-compatible servers) behind one `create()`.

    pool = ReplicaPool(settings, ["http://a:8000/v1", "http://b:8000/v1"])  # in the event loop
    resp = await pool.create({"model": ..., "messages": [...]})
    await pool.close()

How a request is placed (one pool per event loop; the counters need no locks):
- it goes to the replica that is up with the fewest requests in flight (ties: the fewest
  sent so far, then list order), so a slow replica gets less work;
- a connection error (refused, reset) takes the replica out at once; a 5xx or a timeout
  first asks the replica's health endpoint: unhealthy means out, healthy means this
  request failed, not the replica (one bad request must not take every replica out);
- a request whose replica was taken out goes straight to another one that is up: no
  backoff and no retry spent, since a different server is asked;
- 429, or a failure on a healthy replica, is a retry with the doubling backoff;
- with no replica up it backs off, re-checks every replica that is out and gives up after
  `max_retries` such rounds with ReplicasDownError naming each URL and why it is out;
- a replica that is out is re-checked on its health endpoint in the background (GET
  /health, vLLM's; servers without one: GET /v1/models) at most every
  `replica_recheck_s`; a 200 puts it back;
- one request is sent at most (max_retries + 1) x replicas times, whatever happens.

The pool never records answers: a retried request returns one reply to its one caller,
which writes one record (qa.reader). A reply lost with its connection is not an answer.

Hand-written: openai's and httpx's retries are per client (one URL), and a least-in-flight
balancer with take-out and health re-checks over AsyncOpenAI clients is not in either
library (a separate load balancer process does it too; docs/CLUSTER.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

from qa.errors import ReaderError
from qa.settings import ReaderSettings

MAX_BACKOFF_S = 30.0
HEALTH_TIMEOUT_S = 5.0  # a health check that takes longer counts as unhealthy
# Request errors that may pass on another try (the others, e.g. 400 or 404, are raised).
RETRYABLE = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


class ReplicasDownError(ReaderError):
    """No reader replica is up; the message names every URL and why it is out."""


def make_client(settings: ReaderSettings, base_url: str) -> AsyncOpenAI:
    """An async client whose retries are ours (bounded, with our backoff), not the SDK's.
    Make it inside the event loop that uses it."""
    return AsyncOpenAI(
        base_url=base_url,
        api_key=settings.api_key or "EMPTY",
        max_retries=0,
        timeout=settings.request_timeout_s,
    )


def health_url(base_url: str) -> str:
    """vLLM's health endpoint beside an OpenAI base URL (`.../v1` -> `.../health`)."""
    root = base_url.rstrip("/")
    return (root[: -len("/v1")] if root.endswith("/v1") else root) + "/health"


@dataclass
class Replica:
    """One server and what the pool knows about it."""

    url: str
    client: AsyncOpenAI
    up: bool = True
    in_flight: int = 0
    max_in_flight: int = 0
    sent: int = 0  # requests sent (each try counts)
    ok: int = 0  # replies received
    failed: int = 0  # tries that failed
    reason: str | None = None  # why it is out (the last failure while it was up)
    next_check: float = 0.0  # monotonic time of its next health re-check while out
    checking: bool = False

    def stats(self) -> dict[str, Any]:
        return {"url": self.url, "up": self.up, "sent": self.sent, "ok": self.ok,
                "failed": self.failed, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "reason": self.reason}


@dataclass
class PoolEvent:
    """A replica taken out or put back, at `t` seconds since the pool was made."""

    t: float
    url: str
    event: str  # "out" | "back"
    reason: str = ""


@dataclass
class ReplicaPool:
    """Least-in-flight placement over `urls` with take-out and health re-checks (above)."""

    settings: ReaderSettings
    urls: Sequence[str]
    replicas: list[Replica] = field(init=False)
    events: list[PoolEvent] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ReaderError("reader: no replica URLs given")
        self.replicas = [Replica(u, make_client(self.settings, u)) for u in self.urls]
        self.started = time.monotonic()  # events' `t` counts from here
        self._http: httpx.AsyncClient | None = None
        self._checks: set[asyncio.Task[None]] = set()

    # --- what benchmarks and tests read -------------------------------------------------
    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def elapsed(self) -> float:
        """Seconds since the pool was made (the clock of `events`)."""
        return time.monotonic() - self.started

    def stats(self) -> list[dict[str, Any]]:
        return [r.stats() for r in self.replicas]

    async def close(self) -> None:
        for task in self._checks:
            task.cancel()
        for replica in self.replicas:
            await replica.client.close()
        if self._http is not None:
            await self._http.aclose()

    # --- placement ----------------------------------------------------------------------
    def _pick(self) -> Replica | None:
        self._schedule_checks()
        up = [r for r in self.replicas if r.up]
        if not up:
            return None
        return min(up, key=lambda r: (r.in_flight, r.sent))  # min keeps list order on ties

    def _take_out(self, replica: Replica, reason: str) -> None:
        if not replica.up:
            return  # several requests in flight fail together: one event
        replica.up = False
        replica.reason = reason
        replica.next_check = time.monotonic() + self.settings.replica_recheck_s
        self._event(replica, "out", reason)

    def _event(self, replica: Replica, event: str, reason: str = "") -> None:
        t = round(self.elapsed(), 3)
        self.events.append(PoolEvent(t, replica.url, event, reason))

    def down_message(self) -> str:
        down = "; ".join(f"{r.url} ({r.reason})" for r in self.replicas if not r.up)
        return f"all {len(self.replicas)} reader replicas are down: {down}"

    # --- health -------------------------------------------------------------------------
    async def healthy(self, replica: Replica) -> bool:
        """GET /health is 200 (or, where there is no /health, GET /v1/models is)."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S)
        try:
            resp = await self._http.get(health_url(replica.url))
            if resp.status_code == 404:  # an OpenAI-compatible server without /health
                key = self.settings.api_key or "EMPTY"
                resp = await self._http.get(replica.url.rstrip("/") + "/models",
                                            headers={"Authorization": f"Bearer {key}"})
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def _recheck(self, replica: Replica) -> None:
        try:
            if await self.healthy(replica):
                replica.up = True
                self._event(replica, "back", "health check 200")
            else:
                replica.next_check = time.monotonic() + self.settings.replica_recheck_s
        finally:
            replica.checking = False

    def _schedule_checks(self, now: bool = False) -> list[asyncio.Task[None]]:
        """Start a background health check of each replica that is out and due."""
        started = []
        for replica in self.replicas:
            due = now or time.monotonic() >= replica.next_check
            if replica.up or replica.checking or not due:
                continue
            replica.checking = True
            task = asyncio.ensure_future(self._recheck(replica))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
            started.append(task)
        return started

    # --- one request --------------------------------------------------------------------
    async def create(self, kwargs: dict[str, Any],
                     on_send: Callable[[], None] | None = None) -> Any:
        """One chat completion on the best replica, moved or retried as the module says.
        Raises the last request error, or ReplicasDownError when no replica is up."""
        s = self.settings
        retries = sends = 0
        while True:
            replica = self._pick()
            if replica is None:
                if retries >= s.max_retries:
                    raise ReplicasDownError(self.down_message())
                retries += 1
                await asyncio.sleep(self._backoff(retries))
                checks = self._schedule_checks(now=True)
                if checks:
                    await asyncio.wait(checks)
                continue
            if sends >= (s.max_retries + 1) * len(self.replicas):
                raise ReaderError(f"reader: request sent {sends} times without a reply; "
                                  f"replicas: {self.stats()}")
            sends += 1
            if on_send is not None:
                on_send()
            try:
                return await self._send(replica, kwargs)
            except RETRYABLE as exc:
                if await self._replica_failed(replica, exc):
                    continue  # taken out: another replica, at once
                retries += 1
                if retries > s.max_retries:
                    raise
            await asyncio.sleep(self._backoff(retries))

    async def _send(self, replica: Replica, kwargs: dict[str, Any]) -> Any:
        replica.sent += 1
        replica.in_flight += 1
        replica.max_in_flight = max(replica.max_in_flight, replica.in_flight)
        try:
            resp = await replica.client.chat.completions.create(**kwargs)
        except Exception:  # not a cancellation: the run ending is not the replica failing
            replica.failed += 1
            raise
        finally:
            replica.in_flight -= 1
        replica.ok += 1
        return resp

    async def _replica_failed(self, replica: Replica, exc: Exception) -> bool:
        """Take `replica` out if `exc` says it is dead; True when it was (or is) out."""
        if isinstance(exc, openai.RateLimitError):
            return False  # busy, not dead
        reason = f"{type(exc).__name__}: {exc}"
        timeout = isinstance(exc, openai.APITimeoutError)
        if (timeout or isinstance(exc, openai.InternalServerError)) and replica.up:
            if await self.healthy(replica):
                return False  # the request failed, not the replica
        self._take_out(replica, reason)
        return True

    def _backoff(self, retry: int) -> float:
        return min(self.settings.retry_backoff_s * 2 ** (retry - 1), MAX_BACKOFF_S)
