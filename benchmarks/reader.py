"""Reader throughput: questions/s at concurrency 1 vs 8 against a tiny vLLM CPU server.

    python -m benchmarks.reader            # or: make bench-reader
    python -m benchmarks.reader --questions 32 --templates standard

Starts vLLM's OpenAI server on a tiny random Qwen2 (qa.tiny) and answers EgoSchema-shaped
questions (180 one-second captions each, 5 options) one at a time and then 8 in flight,
for each template: `standard` (the default: one structured A-E letter) and LLoVi's
`summarize_then_answer` (a free-text summary of up to --max-tokens tokens, then the
letter). Writes `benchmarks/results/reader.json` with `concurrency_speedup` = q/s(8) /
q/s(1) for the first template and `concurrency_speedup_by_template`, plus the CPU each
process used: whether concurrency had idle cores left to use. Every measurement uses fresh
transcripts, so vLLM's prefix cache cannot make a rerun look fast. The model's weights are
random: this measures serving throughput, never answer quality."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil

from pipeline.records import FrameCaption, Question, Transcript
from qa.reader import Reader
from qa.server import ManagedServer
from qa.settings import ReaderSettings
from qa.tiny import build_tiny_reader

RESULTS = Path(__file__).resolve().parent / "results" / "reader.json"
_WORDS = (
    "C picks up a knife from the table cuts the onion walks to the sink washes a plate "
    "opens the fridge pours water into a cup puts the bag on the floor looks around"
).split()


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores visible, no GPU"


def make_questions(n: int, captions: int, seed: int) -> list[tuple[Question, Transcript]]:
    """EgoSchema-shaped items with word salad captions, distinct for every `seed`."""
    import random

    rng = random.Random(seed)
    items = []
    for i in range(n):
        vid = f"bench-{seed}-{i}"
        caps = [
            FrameCaption(float(t), " ".join(rng.choice(_WORDS) for _ in range(12)))
            for t in range(captions)
        ]
        options = tuple(" ".join(rng.choice(_WORDS) for _ in range(8)) for _ in range(5))
        question = Question(vid, vid, "What is C mainly doing in the video?", options)
        items.append((question, Transcript(vid, float(captions), caps)))
    return items


async def measure(
    settings: ReaderSettings, base_url: str, items: list[tuple[Question, Transcript]]
) -> tuple[float, int, int]:
    """(seconds, failed, completion tokens) to answer `items` at `settings.concurrency`."""
    reader = Reader(settings, base_url)
    try:
        t0 = time.perf_counter()
        records = await reader.answer_all(items, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        await reader.close()
    return seconds, sum(r.failed for r in records), sum(r.completion_tokens for r in records)


def role(process: psutil.Process, server_pid: int) -> str:
    """Which part of the serving stack a process is (vLLM names its children)."""
    if process.pid == os.getpid():
        return "client"
    if process.pid == server_pid:
        return "api_server"
    name = process.name()
    if "EngineCore" in name:
        return "engine_core"
    if "Worker" in name:
        return "worker"
    return "other"


def cpu_seconds(processes: list[psutil.Process], server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far, summed per role."""
    totals: dict[str, float] = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        key = role(process, server_pid)
        totals[key] = totals.get(key, 0.0) + times.user + times.system
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48, help="questions per measurement")
    parser.add_argument("--captions", type=int, default=180, help="captions per transcript")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--templates", nargs="+", default=["standard", "summarize_then_answer"],
                        help="qa/prompts.py templates; the first gives concurrency_speedup")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="length cap of free-text stages (summaries, chain of thought)")
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    model_dir = build_tiny_reader(Path(tempfile.gettempdir()) / "mmser-bench-tiny-reader")
    settings = ReaderSettings(
        model=str(model_dir),
        served_name="tiny-reader",
        port=args.port,
        max_model_len=16384,  # the product's default context budget
        # vLLM's CPU default (2048) splits each ~3k-token prompt over two engine steps and
        # batches nothing; qa/settings.py documents the knob.
        max_num_batched_tokens=16384,
        extra_args=["--enforce-eager"],
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        health_timeout_s=600.0,
        reserve_tokens=64 + args.max_tokens,
        max_tokens=args.max_tokens,
    )
    rows = []
    seed = 0
    with ManagedServer(settings) as server:
        tree = psutil.Process(server.process.pid)
        for template in args.templates:
            settings.template = template
            seed += 1  # warm-up: this template's first requests (grammar compile), not timed
            asyncio.run(measure(settings, server.base_url, make_questions(4, args.captions, seed)))
            processes = [psutil.Process(), tree, *tree.children(recursive=True)]
            for concurrency in args.concurrency:
                settings.concurrency = concurrency
                seed += 1  # fresh transcripts: vLLM's prefix cache cannot help a rerun
                items = make_questions(args.questions, args.captions, seed)
                before = cpu_seconds(processes, tree.pid)
                seconds, failed, generated = asyncio.run(
                    measure(settings, server.base_url, items)
                )
                after = cpu_seconds(processes, tree.pid)
                used = {key: after[key] - before.get(key, 0.0) for key in after}
                rows.append(
                    {
                        "template": template,
                        "concurrency": concurrency,
                        "questions": args.questions,
                        "seconds": round(seconds, 3),
                        "questions_per_s": round(args.questions / seconds, 3),
                        "failed": failed,
                        "completion_tokens_per_question": round(generated / args.questions, 1),
                        # Cores kept busy, and CPU ms per question by process: on a small
                        # CPU box this says whether concurrency still had idle cores to use.
                        "cores_busy": round(sum(used.values()) / seconds, 2),
                        "cpu_ms_per_question": {
                            key: round(1000 * value / args.questions, 1)
                            for key, value in used.items()
                        },
                    }
                )

    def speedup(template: str) -> float:
        qps = [r["questions_per_s"] for r in rows if r["template"] == template]
        return round(qps[-1] / qps[0], 3)

    result = {
        "machine": machine(),
        "model": "tiny random Qwen2 (2 layers, hidden 64, 2 heads), vLLM CPU, --enforce-eager",
        "server": {
            "max_model_len": settings.max_model_len,
            "max_num_batched_tokens": settings.max_num_batched_tokens,
        },
        "captions_per_question": args.captions,
        "max_tokens": args.max_tokens,
        "rows": rows,
        # The product's default template (one structured letter per question).
        "template": args.templates[0],
        "concurrency_speedup": speedup(args.templates[0]),
        "concurrency_speedup_by_template": {t: speedup(t) for t in args.templates},
        "note": "random weights: throughput only, never answer quality",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"machine: {result['machine']}\nwritten: {args.out}\n")
    roles = ("client", "api_server", "engine_core", "worker")
    print(
        f"{'template':>21} {'conc.':>5} {'q/s':>7} {'failed':>6} {'gen tok/q':>9} "
        f"{'cores busy':>10} | CPU ms per question: " + " ".join(f"{r:>11}" for r in roles)
    )
    for row in rows:
        ms = row["cpu_ms_per_question"]
        print(
            f"{row['template']:>21} {row['concurrency']:>5} {row['questions_per_s']:>7.2f} "
            f"{row['failed']:>6} {row['completion_tokens_per_question']:>9.1f} "
            f"{row['cores_busy']:>10.2f} | {'':>20}"
            + " ".join(f"{ms.get(r, 0.0):>11.1f}" for r in roles)
        )
    print(f"cores on this machine: {os.cpu_count()}")
    for template in args.templates:
        label = f"{args.concurrency[-1]} vs {args.concurrency[0]}, {template}"
        print(f"concurrency_speedup ({label}): {speedup(template):.2f}x")
    print(f"concurrency_speedup = {result['concurrency_speedup']:.2f}x (default template)")


if __name__ == "__main__":
    main()
