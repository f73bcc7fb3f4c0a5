"""The reader against a real vLLM OpenAI server on CPU serving a tiny random Qwen2 model.

One server for the session (start-up ~40-60 s on 2 cores); the killed-server test starts
its own, and the never-healthy tests use small stand-in processes with short timeouts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from reader_fixtures import make_items, tiny_settings

from pipeline.errors import ReaderError
from qa.answers import AnswerRecord
from qa.evaluate import read_answers
from qa.reader import Reader, answer_questions
from qa.server import ManagedServer
from qa.settings import LLoViSettings, ReaderSettings
from qa.tiny import build_tiny_reader


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reader(tmp_path_factory.mktemp("tiny-reader"))


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    settings = tiny_settings(tiny_model)
    log = tmp_path_factory.mktemp("reader-log") / "server.log"
    managed = ManagedServer(settings, log_path=log)
    with managed:
        pgid = managed.process.pid  # type: ignore[union-attr]
        # vLLM runs the engine in child processes: the tree is more than the leader.
        assert len(managed.alive_pids()) >= 2, managed.alive_pids()
        yield managed
    # Teardown doubles as the clean-stop test: nothing of the tree may survive.
    assert managed.alive_pids() == [], f"orphans after stop: {managed.alive_pids()}"
    assert not _group_alive(pgid)


def _group_alive(pgid: int) -> bool:
    """Whether any running (non-zombie) process is in group `pgid`, ours or reparented."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


def test_structured_choice_gives_letters_and_option_probabilities(
    server: ManagedServer, tmp_path: Path
) -> None:
    settings = server.settings
    items = make_items(6, seed=1, prefix="choice")
    records = answer_questions(settings, items, tmp_path / "a.jsonl", progress=False, server=server)
    assert [r.q_uid for r in records] == [q.q_uid for q, _ in items]
    for r in records:
        assert r.error is None, r.error
        assert r.raw_output.strip() in {"A", "B", "C", "D", "E"}
        assert r.letter == r.raw_output.strip() and r.prediction == "ABCDE".index(r.letter)
        assert r.option_probs is not None and len(r.option_probs) == 5
        assert sum(r.option_probs) == pytest.approx(1.0, abs=1e-6)
        # The chosen letter is the most probable (greedy under the constraint).
        assert r.option_probs[r.prediction] == pytest.approx(max(r.option_probs), abs=1e-6)
        assert r.prompt_tokens > 100 and r.latency_s > 0 and r.budget["policy"] == "none"
    saved = read_answers(tmp_path / "a.jsonl")
    assert set(saved) == {r.q_uid for r in records}
    assert (tmp_path / "a.template.json").exists()


def test_concurrent_requests_in_flight(server: ManagedServer) -> None:
    """`concurrency` requests are really in flight at once, and all come back answered.

    Throughput is the benchmark's job (`make bench-reader`); a wall-clock assertion here
    would flake on a shared 2-core CI box.
    """

    async def run(concurrency: int, seed: int) -> tuple[int, list]:
        settings = tiny_settings(
            Path(server.settings.model), port=server.settings.port, concurrency=concurrency
        )
        reader = Reader(settings, server.base_url)
        items = make_items(16, num_captions=40, seed=seed, prefix=f"c{concurrency}-")
        try:
            records = await reader.answer_all(items, progress=False)
        finally:
            await reader.close()
        return reader.max_in_flight, records

    serial_peak, serial = asyncio.run(run(1, seed=10))
    peak, parallel = asyncio.run(run(8, seed=11))
    assert serial_peak == 1 and peak == 8
    assert all(r.error is None and r.letter for r in serial + parallel)
    assert [r.q_uid for r in parallel] == [f"c8-{i}" for i in range(16)]  # input order kept


def test_budget_policy_recorded_for_long_transcripts(server: ManagedServer, tmp_path: Path) -> None:
    settings = server.settings  # max_model_len 2048
    long_items = make_items(2, num_captions=400, seed=3, prefix="long")  # ~5000 tokens each
    records = answer_questions(
        settings, long_items, tmp_path / "b.jsonl", progress=False, server=server
    )
    for r in records:
        assert r.error is None, r.error
        assert r.budget["policy"] == "digest+subsample"
        assert r.budget["counter"] == "tokenizer"
        assert r.budget["captions_in"] == 400 and 0 < r.budget["captions_kept"] < 400
        assert r.prompt_tokens <= settings.max_model_len
    on_disk = read_answers(tmp_path / "b.jsonl")
    assert on_disk["long0"].budget == records[0].budget


def test_resume_skips_done_and_retries_failed(server: ManagedServer, tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    items = make_items(4, seed=4, prefix="resume")
    first = answer_questions(server.settings, items[:2], out, progress=False, server=server)
    # A failed record on disk is asked again; done ones are not.
    failed = make_items(1, seed=5, prefix="failed")[0]
    with out.open("a") as fh:
        fh.write(first[0].__class__(
            q_uid="failed0", video_id="x", prediction=None, letter=None, option_probs=None,
            raw_output="", error="APIConnectionError: earlier crash",
        ).to_json() + "\n")  # fmt: skip
    records = answer_questions(
        server.settings, items + [failed], out, progress=False, server=server
    )
    assert records[:2] == first  # read back, not re-asked
    assert all(r.error is None for r in records)
    lines = out.read_text().splitlines()
    assert len(lines) == 2 + 1 + 3  # first run, the failed line, 2 new + the retried one


def _settings(server: ManagedServer, **overrides: object) -> ReaderSettings:
    """The server's settings; one request at a time, so a question's requests follow each
    other in what the spy saw."""
    overrides.setdefault("concurrency", 1)
    return tiny_settings(Path(server.settings.model), port=server.settings.port, **overrides)


class _Spy:
    """Passes every request to the real server and keeps what was sent."""

    def __init__(self, reader: Reader) -> None:
        self.sent: list[dict] = []
        (replica,) = reader.pool.replicas  # one server: requests follow each other here
        self._create = replica.client.chat.completions.create
        replica.client.chat.completions.create = self  # type: ignore[method-assign]

    async def __call__(self, **kwargs: object) -> object:
        self.sent.append(kwargs)
        return await self._create(**kwargs)


def _answer_with_spy(settings: ReaderSettings, server: ManagedServer,
                     items: list) -> tuple[list[AnswerRecord], list[dict]]:
    async def run() -> tuple[list[AnswerRecord], list[dict]]:
        reader = Reader(settings, server.base_url)
        spy = _Spy(reader)
        try:
            return await reader.answer_all(items, progress=False), spy.sent
        finally:
            await reader.close()

    return asyncio.run(run())


def test_our_multi_stage_flows_end_in_a_constrained_letter(server: ManagedServer) -> None:
    items = make_items(2, seed=6, prefix="free")
    for template in ("cot", "summarize_then_answer"):
        records, sent = _answer_with_spy(_settings(server, template=template), server, items)
        for r in records:
            assert r.error is None and r.template == template and len(r.stage_outputs) == 2
            assert r.letter in {"A", "B", "C", "D", "E"} and r.option_probs is not None
            assert len(r.finish_reasons) == 2
        first, second = sent[0], sent[1]
        assert "structured_outputs" not in first.get("extra_body", {})
        assert second["extra_body"]["structured_outputs"]["choice"] == list("ABCDE")
        if template == "cot":  # one conversation: turn 2 carries turn 1 and its reply
            assert [m["role"] for m in second["messages"]] == [
                "system", "user", "assistant", "user"]
            assert second["messages"][2]["content"] == records[0].stage_outputs[0]
        else:  # two requests: the answer sees the summary, not the transcript
            assert [m["role"] for m in second["messages"]] == ["system", "user"]
            assert records[0].stage_outputs[0].strip() in second["messages"][1]["content"]


def test_llovi_flows_run_with_llovis_settings(server: ManagedServer) -> None:
    items = make_items(2, seed=7, prefix="llovi")
    llovi = LLoViSettings(summary_words=30, summary_max_tokens=24)
    for template, turns in (("llovi_standard", 1), ("llovi_sum_q", 2), ("llovi_zs_cot", 2)):
        settings = _settings(server, template=template, llovi=llovi, max_tokens=24)
        records, sent = _answer_with_spy(settings, server, items)
        assert len(sent) == 2 * turns
        for r, request in zip(records, sent[turns - 1 :: turns], strict=True):
            assert r.error is None and len(r.stage_outputs) == turns
            assert "structured_outputs" not in request.get("extra_body", {})  # free text
            # LLoVi reads the first character: a letter, or invalid with the reason.
            assert r.prediction == ("ABCDE".index(r.raw_output[0])
                                    if r.raw_output[:1] in list("ABCDE") else None)
            assert r.prediction is not None or r.invalid_reason
            assert r.budget["digest"] is False
        transcript_text = sent[0]["messages"][-1]["content"]
        assert ". " in transcript_text and "\n0: " not in transcript_text  # joined, untimed
        if template == "llovi_sum_q":
            summary_request = sent[0]
            assert summary_request["temperature"] == 1.0 and summary_request["max_tokens"] == 24
        if template == "llovi_zs_cot":
            assert [m["role"] for m in sent[1]["messages"]] == [
                "system", "user", "assistant", "user"]
    # As an option, the last turn is the constrained choice.
    settings = _settings(server, template="llovi_standard",
                         llovi=LLoViSettings(constrained_choice=True))
    records, sent = _answer_with_spy(settings, server, items)
    assert all(r.letter in list("ABCDE") and r.option_probs for r in records)
    assert sent[0]["extra_body"]["structured_outputs"]["choice"] == list("ABCDE")


def test_permutations_average_each_options_probability_over_shifts(
    server: ManagedServer,
) -> None:
    items = make_items(3, seed=8, prefix="perm")
    settings = _settings(server, permutations=5)
    records, sent = _answer_with_spy(settings, server, items)
    assert len(sent) == 15
    for r in records:
        assert r.error is None and len(r.shift_probs) == 5
        for probs in r.shift_probs:
            assert sum(probs) == pytest.approx(1.0, abs=1e-6)
        mean = [sum(p[i] for p in r.shift_probs) / 5 for i in range(5)]
        assert r.option_probs == pytest.approx(mean)
        assert r.prediction == max(range(5), key=mean.__getitem__)
    # Each shift shows the options rotated: position A of shift k is option k.
    shown = [req["messages"][-1]["content"].split("Options:\n")[1].splitlines()[0]
             for req in sent[:5]]
    assert shown == [f"A. {items[0][0].options[k]}" for k in range(5)]


def test_summarize_then_answer_shares_its_summary_across_shifts(server: ManagedServer) -> None:
    items = make_items(1, seed=9, prefix="permsum")
    settings = _settings(server, template="summarize_then_answer", permutations=3)
    records, sent = _answer_with_spy(settings, server, items)
    assert len(sent) == 1 + 3  # the summary (no options shown) once, the choice per shift
    assert len(records[0].shift_probs) == 3


def test_a_truncated_free_text_stage_is_marked(server: ManagedServer) -> None:
    items = make_items(2, seed=12, prefix="trunc")
    settings = _settings(server, template="summarize_then_answer", max_tokens=2,
                         temperature=1.0)
    records, _ = _answer_with_spy(settings, server, items)
    for r in records:
        assert r.finish_reasons[0] == "length" and r.truncated
        assert r.letter is not None  # the constrained answer still came back


def test_a_question_overflowing_the_context_fails_before_any_request(
    server: ManagedServer,
) -> None:
    (question, transcript), = make_items(1, seed=13, prefix="huge")
    huge = dataclasses.replace(question, question="why " * 3000)
    records, sent = _answer_with_spy(server.settings, server, [(huge, transcript)])
    assert sent == [] and records[0].attempts == 0
    assert "question huge0" in records[0].error and "max_model_len" in records[0].error


def test_server_killed_mid_run_records_failures(tiny_model: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_model, concurrency=2, max_retries=2, retry_backoff_s=0.2)
    items = make_items(20, num_captions=60, seed=7, prefix="kill")
    out = tmp_path / "kill.jsonl"
    server = ManagedServer(settings, log_path=tmp_path / "server.log")
    with server:
        leader = server.process.pid  # type: ignore[union-attr]
        engine = [pid for pid in server.alive_pids() if pid != leader]
        assert engine, "expected vLLM engine processes under the API server"

        def kill_when_started() -> None:
            while not out.exists() or len(out.read_text().splitlines()) < 3:
                time.sleep(0.05)
            os.kill(leader, signal.SIGKILL)  # the API server dies; its engine is orphaned

        killer = threading.Thread(target=kill_when_started, daemon=True)
        killer.start()
        t0 = time.perf_counter()
        records = answer_questions(settings, items, out, progress=False, server=server)
        elapsed = time.perf_counter() - t0
        killer.join(timeout=5)
    assert len(records) == 20
    ok = [r for r in records if r.error is None]
    failed = [r for r in records if r.error is not None]
    assert len(ok) >= 3 and failed, (len(ok), len(failed))
    for r in failed:  # the only replica is out: the reason names it and why
        assert r.error.startswith("ReplicasDownError: all 1 reader replicas are down: "
                                  f"{server.base_url} (APIConnectionError"), r.error
        assert r.prediction is None
        # In flight at the kill: sent once; later: never sent (the replica was already out
        # and its health checks failed through the bounded backoff rounds).
        assert r.attempts <= 1
    assert elapsed < 60  # backoff is bounded: 0.2 + 0.4 s per failed question
    assert len(read_answers(out)) == 20
    # Leaving the `with` killed the group: the orphaned engine processes are gone too.
    assert server.alive_pids() == [] and not _group_alive(leader)


# --- never healthy: stand-in processes, short timeouts ----------------------------------

_UNHEALTHY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503); self.end_headers()
    def log_message(self, *a):
        pass
print("stand-in server: loading weights forever", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_never_healthy_server_fails_clearly_within_timeout(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path, health_timeout_s=3.0)
    server = ManagedServer(
        settings,
        command=[sys.executable, "-c", _UNHEALTHY, str(settings.port)],
        log_path=tmp_path / "server.log",
        poll_s=0.2,
    )
    t0 = time.perf_counter()
    with pytest.raises(ReaderError) as info:
        server.start()
    assert time.perf_counter() - t0 < 3.0 + 12.0  # timeout + the stop grace at most
    message = str(info.value)
    assert "did not become healthy within 3 s" in message
    assert "stand-in server: loading weights forever" in message  # the log's last lines
    assert server.alive_pids() == []


def test_server_exiting_at_start_fails_with_its_log(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path, health_timeout_s=30.0)
    crash = "import sys; print('ValueError: head_dim 16 is not supported'); sys.exit(3)"
    server = ManagedServer(
        settings, command=[sys.executable, "-c", crash], log_path=tmp_path / "s.log", poll_s=0.1
    )
    t0 = time.perf_counter()
    with pytest.raises(ReaderError, match=r"exited with code 3(.|\n)*head_dim 16"):
        server.start()
    assert time.perf_counter() - t0 < 10.0
