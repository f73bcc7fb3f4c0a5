"""Reader throughput: questions/s at concurrency 1 vs 8 against a tiny vLLM CPU server.

    python -m benchmarks.reader            # or: make bench-reader
    python -m benchmarks.reader --questions 32 --captions 180

Starts vLLM's OpenAI server on a tiny random Qwen2 (qa.tiny), answers EgoSchema-shaped
questions (180 one-second captions each, 5 options, the `standard` template with the
structured A-E choice) one at a time and then 8 in flight, and writes
`benchmarks/results/reader.json` with `concurrency_speedup` = q/s(8) / q/s(1). Every
measurement uses fresh transcripts, so vLLM's prefix cache cannot make a rerun look fast.
The model's weights are random: this measures serving throughput, never answer quality.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

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
) -> tuple[float, int]:
    """(seconds, failed) to answer `items` at `settings.concurrency`."""
    reader = Reader(settings, base_url)
    try:
        t0 = time.perf_counter()
        records = await reader.answer_all(items, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        await reader.close()
    return seconds, sum(r.failed for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=24, help="questions per measurement")
    parser.add_argument("--captions", type=int, default=180, help="captions per transcript")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
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
        reserve_tokens=64,
    )
    rows = []
    with ManagedServer(settings) as server:
        asyncio.run(measure(settings, server.base_url, make_questions(4, args.captions, seed=0)))
        for k, concurrency in enumerate(args.concurrency, 1):
            settings.concurrency = concurrency
            items = make_questions(args.questions, args.captions, seed=k)
            seconds, failed = asyncio.run(measure(settings, server.base_url, items))
            rows.append(
                {
                    "concurrency": concurrency,
                    "questions": args.questions,
                    "seconds": round(seconds, 3),
                    "questions_per_s": round(args.questions / seconds, 3),
                    "failed": failed,
                }
            )
    base = rows[0]["questions_per_s"]
    top = rows[-1]["questions_per_s"]
    result = {
        "machine": machine(),
        "model": "tiny random Qwen2 (2 layers, hidden 64, 2 heads), vLLM CPU, --enforce-eager",
        "server": {"max_model_len": settings.max_model_len,
                   "max_num_batched_tokens": settings.max_num_batched_tokens},
        "captions_per_question": args.captions,
        "template": settings.template,
        "rows": rows,
        "concurrency_speedup": round(top / base, 3),
        "note": "random weights: throughput only, never answer quality",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"machine: {result['machine']}\nwritten: {args.out}\n")
    print(f"{'concurrency':>11} {'questions':>9} {'seconds':>8} {'q/s':>7} {'failed':>6}")
    for row in rows:
        print(
            f"{row['concurrency']:>11} {row['questions']:>9} {row['seconds']:>8.2f} "
            f"{row['questions_per_s']:>7.2f} {row['failed']:>6}"
        )
    label = f"concurrency_speedup ({args.concurrency[-1]} vs {args.concurrency[0]})"
    print(f"{label}: {result['concurrency_speedup']:.2f}x")


if __name__ == "__main__":
    main()
