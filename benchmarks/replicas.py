"""Reader replicas under a fault: one of two vLLM CPU servers killed mid-run.

    python -m benchmarks.replicas             # writes benchmarks/results/replicas.json
    python -m benchmarks.replicas --questions 64 --concurrency 4 --no-revive

Starts `reader.replicas: 2` managed vLLM servers on the tiny random Qwen2 (qa.tiny), answers
EgoSchema-shaped questions through the replica pool (qa.replicas) and, once `kill_after`
answers are written and a request is in flight on it, SIGKILLs replica 0's whole process
group. The run goes on: the pool takes the replica out and moves its requests to the other.
With `revive`, the killed replica is started again on its port and a second batch of
questions is answered; the pool puts it back after its health check. Reported: questions,
answered, answered_twice (q_uids with more than one line in predictions.jsonl), missing,
requests per replica before the kill and in all, wall-clock, and when the replica was taken
out and put back. Random weights: this measures fail-over, never answer quality.

`replica_fault_run(...)` is the function `benchmarks/cluster.py` calls; tests call it on
replicas they already started (`replicas=`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.machine import cpu_capability, cpu_model, load_average
from pipeline.records import FrameCaption, Question, Transcript
from qa.answers import AnswerRecord, AnswerWriter
from qa.reader import Reader
from qa.server import ManagedReplicas, ManagedServer
from qa.settings import ReaderSettings
from qa.tiny import build_tiny_reader

RESULTS = Path(__file__).resolve().parent / "results" / "replicas.json"
_WORDS = ("C picks up a knife cuts the onion walks to the sink washes a plate opens the fridge "
          "pours water into a cup puts the bag on the floor").split()


def tiny_replica_settings(model_dir: Path, port: int = 18800, replicas: int = 2,
                          **overrides: Any) -> ReaderSettings:
    """Managed settings for `replicas` tiny vLLM CPU servers (docs/ARCHITECTURE.md's flags:
    --enforce-eager, a 1-GiB KV cache each, so two fit beside each other in 24 GiB)."""
    values: dict[str, Any] = dict(
        model=str(model_dir), served_name="tiny-reader", port=port, replicas=replicas,
        max_model_len=2048, extra_args=["--enforce-eager"],
        env={"VLLM_CPU_KVCACHE_SPACE": "1"}, health_timeout_s=600.0, request_timeout_s=60.0,
        max_retries=2, retry_backoff_s=0.2, replica_recheck_s=0.5, reserve_tokens=64,
        max_tokens=16, concurrency=4,
    )
    values.update(overrides)
    settings = ReaderSettings(**values)
    settings.validate()
    return settings


def make_questions(n: int, prefix: str, captions: int = 30) -> list[tuple[Question, Transcript]]:
    """`n` distinct questions with their own transcripts (deterministic by index)."""
    items = []
    for i in range(n):
        words = [_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(captions * 8)]
        lines = [FrameCaption(float(t), " ".join(words[t * 8:(t + 1) * 8]))
                 for t in range(captions)]
        options = tuple(f"option {j} of question {i}: " + " ".join(words[j:j + 5])
                        for j in range(5))
        video = f"{prefix}-video-{i}"
        question = Question(q_uid=f"{prefix}{i}", video_id=video,
                            question="What is the person mainly doing?", options=options,
                            answer=i % 5)
        items.append((question, Transcript(video, float(captions), lines)))
    return items


class _CountingWriter(AnswerWriter):
    """Writes each record and tells the killer how many are written."""

    def __init__(self, path: Path, reached: asyncio.Event, kill_after: int) -> None:
        super().__init__(path)
        self.count = 0
        self.reached = reached
        self.kill_after = kill_after

    def write(self, record: Any) -> None:
        super().write(record)
        self.count += 1
        if self.count >= self.kill_after:
            self.reached.set()


def _kill_tree(server: ManagedServer) -> None:
    """SIGKILL the server's whole process group (API server and engine): a dead replica."""
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)


async def _kill_when_busy(reader: Reader, index: int, server: ManagedServer,
                          reached: asyncio.Event, out: dict[str, Any]) -> None:
    """After `kill_after` answers, kill replica `index` while a request is in flight on it."""
    await reached.wait()
    replica = reader.pool.replicas[index]
    while replica.in_flight == 0:
        await asyncio.sleep(0.005)
    out["before_kill"] = reader.pool.stats()
    out["in_flight_at_kill"] = replica.in_flight
    out["kill_t"] = round(reader.pool.elapsed(), 3)  # the clock of the pool's events
    _kill_tree(server)


async def _answer_batch(reader: Reader, items: list, path: Path, kill: dict[str, Any] | None,
                        kill_after: int, index: int, server: ManagedServer | None,
                        progress: bool) -> list[AnswerRecord]:
    reached = asyncio.Event()
    with _CountingWriter(path, reached, kill_after if kill is not None else 10**9) as writer:
        killer = None
        if kill is not None and server is not None:
            killer = asyncio.ensure_future(_kill_when_busy(reader, index, server, reached, kill))
        try:
            return await reader.answer_all(items, writer, progress)
        finally:
            if killer is not None and not killer.done():
                killer.cancel()  # every answer came before the kill: reported as not killed


async def _warm_up(reader: Reader, url: str, prefix: str) -> None:
    """One question on `url` alone, outside the pool's counters: a fresh vLLM server's first
    constrained-choice request compiles its grammar (seconds on a busy CPU), which would
    make a cold replica look slow to the pool and skew the per-replica counts."""
    warm = Reader(reader.settings, [url], reader.count_tokens, reader.counter_kind)
    try:
        (record,) = await warm.answer_all(make_questions(1, prefix), progress=False)
    finally:
        await warm.close()
    if record.error:
        raise RuntimeError(f"warm-up of replica {url} failed: {record.error}")


def _count_lines(path: Path) -> Counter[str]:
    return Counter(json.loads(line)["q_uid"] for line in path.read_text().splitlines() if line)


async def _fault_run(settings: ReaderSettings, replicas: ManagedReplicas, questions: int,
                     kill_after: int, kill_index: int, revive: bool, out_dir: Path,
                     progress: bool) -> dict[str, Any]:
    reader = Reader(settings, replicas.base_urls)
    killed = replicas.servers[kill_index]
    url = replicas.base_urls[kill_index]
    kill: dict[str, Any] = {}
    items = make_questions(questions, "fault")
    for i, replica_url in enumerate(replicas.base_urls):
        await _warm_up(reader, replica_url, f"warm{i}-")
    t0 = time.perf_counter()
    try:
        records = await _answer_batch(reader, items, out_dir / "predictions.jsonl", kill,
                                      kill_after, kill_index, killed, progress)
        t_run = time.perf_counter() - t0
        result: dict[str, Any] = {"batch": _batch_figures(records, items, out_dir),
                                  "batch_stats": reader.pool.stats()}
        if revive and kill:
            result["revive"] = await _revive(reader, replicas, kill_index, questions,
                                             out_dir, progress)
        result.update(
            kill=kill, wall_s=round(t_run, 3), stats=reader.pool.stats(),
            events=[dataclasses.asdict(e) for e in reader.pool.events], url=url,
        )
        return result
    finally:
        await reader.close()


def _batch_figures(records: list[AnswerRecord], items: list, out_dir: Path,
                   name: str = "predictions.jsonl") -> dict[str, Any]:
    lines = _count_lines(out_dir / name)
    asked = [q.q_uid for q, _ in items]
    return {
        "questions": len(items),
        "answered": sum(1 for r in records if r.error is None),
        "failed": sum(1 for r in records if r.error is not None),
        "answered_twice": sum(1 for q in asked if lines[q] > 1),
        "missing": sum(1 for q in asked if lines[q] == 0),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


async def _revive(reader: Reader, replicas: ManagedReplicas, index: int, questions: int,
                  out_dir: Path, progress: bool) -> dict[str, Any]:
    """Start the killed replica again on its port, then answer a second batch."""
    old = replicas.servers[index]
    old.stop()  # reaps what is left of the killed tree
    new = ManagedServer(old.settings, log_path=old.log_path.with_name(
        old.log_path.stem + "-revived.log"))
    replicas.servers[index] = new  # replicas.stop() stops the new one
    t0 = time.perf_counter()
    new.launch()  # from this (the loop's) thread: PDEATHSIG follows the forking thread
    await asyncio.to_thread(new.wait_healthy)
    healthy_at = time.perf_counter()
    healthy_t = round(reader.pool.elapsed(), 3)
    await _warm_up(reader, reader.pool.replicas[index].url, "warm-revived-")
    batch_t = round(reader.pool.elapsed(), 3)  # the pool's first look at it comes now
    before = reader.pool.replicas[index].sent
    items = make_questions(max(questions // 2, 8), "revived")
    records = await _answer_batch(reader, items, out_dir / "predictions-revived.jsonl", None,
                                  0, index, None, progress)
    figures = _batch_figures(records, items, out_dir, "predictions-revived.jsonl")
    figures.update(restart_s=round(healthy_at - t0, 3),
                   sent_to_revived=reader.pool.replicas[index].sent - before,
                   healthy_t=healthy_t, batch_t=batch_t)
    return figures


def replica_fault_run(
    settings: ReaderSettings | None = None,
    replicas: ManagedReplicas | None = None,
    questions: int = 40,
    kill_after: int = 8,
    revive: bool = True,
    out_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Answer `questions` on 2+ managed replicas, killing replica 0 mid-run; the figures.

    settings: managed reader settings with `replicas >= 2` (None: two tiny vLLM CPU servers,
    `tiny_replica_settings`); replicas: running servers to use (None: started and stopped
    here); kill_after: answers written before the kill; revive: restart the killed replica
    and answer a second batch of `questions // 2`; out_dir: predictions.jsonl goes there.
    """
    if settings is None:
        settings = tiny_replica_settings(build_tiny_reader(
            Path(tempfile.gettempdir()) / "mmser-bench-tiny-reader"))
    if settings.replicas < 2 and replicas is None:
        raise ValueError(f"replica_fault_run needs reader.replicas >= 2, got {settings.replicas}")
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="bench-replicas-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("predictions.jsonl", "predictions-revived.jsonl"):
        (out_dir / name).unlink(missing_ok=True)  # a fresh run: answered_twice counts this one
    own = replicas is None
    t0 = time.perf_counter()
    if own:
        replicas = ManagedReplicas(settings, log_dir=out_dir).start()
    assert replicas is not None
    start_s = time.perf_counter() - t0
    try:
        raw = asyncio.run(_fault_run(settings, replicas, questions, kill_after, 0, revive,
                                     out_dir, progress))
    finally:
        if own:
            replicas.stop()
    return _summary(raw, settings, replicas, start_s if own else None, out_dir)


def _summary(raw: dict[str, Any], settings: ReaderSettings, replicas: ManagedReplicas,
             start_s: float | None, out_dir: Path) -> dict[str, Any]:
    kill, url, batch = raw["kill"], raw["url"], raw["batch"]
    t_kill = kill.get("kill_t")
    outs = [e for e in raw["events"] if e["url"] == url and e["event"] == "out"]
    backs = [e for e in raw["events"] if e["url"] == url and e["event"] == "back"]
    batch_t = (raw.get("revive") or {}).get("batch_t")
    revive = raw.get("revive")
    summary: dict[str, Any] = {
        "questions": batch["questions"],
        "answered": batch["answered"],
        "failed": batch["failed"],
        "answered_twice": batch["answered_twice"],
        "missing": batch["missing"],
        "errors": batch["errors"],
        "replica_killed": url if t_kill is not None else None,
        "killed_at_s": t_kill,  # on the clock of `events`
        "in_flight_on_killed_at_kill": kill.get("in_flight_at_kill"),
        "taken_out": bool(outs),
        "taken_out_after_kill_s": round(outs[0]["t"] - t_kill, 3) if outs and t_kill else None,
        "put_back": bool(backs),
        # From the second batch's start (after the restart and a warm-up): the pool only
        # looks at a replica that is out when it places a request.
        "put_back_after_batch_start_s": round(backs[0]["t"] - batch_t, 3)
        if backs and batch_t is not None else None,
        "requests_before_kill": {s["url"]: s["sent"] for s in kill.get("before_kill", [])},
        "max_in_flight_before_kill": {s["url"]: s["max_in_flight"]
                                      for s in kill.get("before_kill", [])},
        # The fault batch's (the revived replica's second batch is in `revive`).
        "requests": {s["url"]: s["sent"] for s in raw["batch_stats"]},
        "failed_requests": {s["url"]: s["failed"] for s in raw["batch_stats"]},
        "stats": raw["stats"],
        "wall_s": raw["wall_s"],
        "replica_start_s": round(start_s, 3) if start_s is not None else None,
        "revive": revive,
        "events": raw["events"],
        "concurrency": settings.concurrency,
        "replicas": len(replicas.servers),
        "urls": replicas.base_urls,
        "out_dir": str(out_dir),
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--kill-after", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--port", type=int, default=18800)
    parser.add_argument("--no-revive", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model_dir = build_tiny_reader(Path(tempfile.gettempdir()) / "mmser-bench-tiny-reader")
    settings = tiny_replica_settings(model_dir, port=args.port, concurrency=args.concurrency)
    result = replica_fault_run(settings, questions=args.questions, kill_after=args.kill_after,
                               revive=not args.no_revive)
    result = dict(machine={"cpu": cpu_model(), "cores": os.cpu_count(),
                           "capability": cpu_capability(), "load_average": load_average()},
                  model="tiny random Qwen2, vLLM CPU, --enforce-eager, 2 replicas",
                  note="random weights: fail-over only, never answer quality", **result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"machine: {result['machine']}\nwritten: {args.out}\n")
    print_table(result)


def print_table(result: dict[str, Any]) -> None:
    print(f"{'replica':>28} {'before kill':>11} {'max in flight':>13} {'requests':>8} "
          f"{'failed':>6}")
    for url in result["urls"]:
        mark = " (killed)" if url == result["replica_killed"] else ""
        print(f"{url + mark:>28} {result['requests_before_kill'].get(url, 0):>11} "
              f"{result['max_in_flight_before_kill'].get(url, 0):>13} "
              f"{result['requests'][url]:>8} {result['failed_requests'][url]:>6}")
    revive = result["revive"] or {}
    print(f"questions {result['questions']}, answered {result['answered']}, failed "
          f"{result['failed']}, answered_twice {result['answered_twice']}, missing "
          f"{result['missing']}; wall {result['wall_s']:.1f} s")
    print(f"killed with {result['in_flight_on_killed_at_kill']} requests in flight on it; "
          f"taken out {result['taken_out']} ({result['taken_out_after_kill_s']} s after the "
          f"kill); put back {result['put_back']} ({result['put_back_after_batch_start_s']} s "
          "after the next batch started)")
    if revive:
        print(f"revived replica: restart {revive['restart_s']:.1f} s, second batch "
              f"{revive['answered']}/{revive['questions']} answered, "
              f"{revive['sent_to_revived']} requests to the revived replica")


if __name__ == "__main__":
    main()
