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
random: this measures serving throughput, never answer quality.

Two more measurements in the same server session:
- option-order debiasing: on --bias-questions questions, the share of the most frequent
  predicted letter with one option order (`position_bias_raw`; a random model has a strong
  position bias) and with `reader.permutations` 5 cyclic shifts averaged
  (`position_bias_debiased`, goal <= 0.3), and the tokens each costs per question;
- the caption digest, on the demo dataset as captioned by the demo captioner (made and
  cached by `make demo`; built here when missing): transcript tokens per question with the
  digest on / off (`digest_token_ratio`, goal <= 0.5) and the share of distinct captions
  (after normalisation) still in the prompt with it on (`digest_distinct_kept`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

from benchmarks.machine import cpu_capability, machine_line
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


def make_questions(n: int, captions: int, seed: int) -> list[tuple[Question, Transcript]]:
    """EgoSchema-shaped items with word salad captions, distinct for every `seed`."""

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


async def answer(settings: ReaderSettings, base_url: str,
                 items: list[tuple[Question, Transcript]]) -> list:
    reader = Reader(settings, base_url)
    try:
        return await reader.answer_all(items, progress=False)
    finally:
        await reader.close()


def top_letter_share(records: list) -> float:
    """The share of answered questions whose predicted letter is the most frequent one."""

    letters = Counter(r.letter for r in records if r.letter)
    return max(letters.values()) / sum(letters.values()) if letters else 0.0


def debiasing(settings: ReaderSettings, base_url: str, n: int, captions: int,
              seed: int) -> dict[str, object]:
    """Position bias and token cost, one option order vs 5 cyclic shifts, same questions."""

    items = make_questions(n, captions, seed)
    out: dict[str, object] = {"questions": n}
    for label, permutations in (("raw", 1), ("debiased", 5)):
        run = dataclasses.replace(settings, permutations=permutations, template="standard")
        records = asyncio.run(answer(run, base_url, items))
        out[f"position_bias_{label}"] = round(top_letter_share(records), 3)
        out[f"letters_{label}"] = dict(sorted(Counter(r.letter for r in records).items(),
                                             key=lambda kv: str(kv[0])))
        out[f"tokens_per_question_{label}"] = round(
            sum(r.prompt_tokens + r.completion_tokens for r in records) / n, 1)
        out[f"failed_{label}"] = sum(r.failed for r in records)
        out[f"invalid_{label}"] = sum(1 for r in records if not r.failed and not r.valid)
    out["token_cost_ratio"] = round(
        out["tokens_per_question_debiased"] / out["tokens_per_question_raw"], 2)  # type: ignore[operator]
    return out


def demo_items() -> list[tuple[Question, Transcript]]:
    """The demo dataset's questions with the demo captioner's transcripts (cached)."""
    from pipeline.captioning import caption_videos_cached
    from pipeline.config import load_config
    from pipeline.datasets import load_dataset
    from pipeline.demo import demo_overrides
    from pipeline.demo_data import generate_demo_dataset, train_demo_captioner

    base = load_config()
    root = Path(base.datasets["demo"].root)
    generate_demo_dataset(root)
    captioner = train_demo_captioner(root)
    config = load_config(None, demo_overrides(root / "models", captioner))
    dataset = load_dataset("demo", config.datasets)
    videos = [dataset.videos[v] for v in sorted({q.video_id for q in dataset.questions})]
    outcome = caption_videos_cached(videos, config, "mmser")
    return [(q, outcome.transcripts[q.video_id]) for q in dataset.questions
            if q.video_id in outcome.transcripts]


def digest_figures(items: list[tuple[Question, Transcript]],
                   settings: ReaderSettings) -> dict[str, object]:
    """Transcript tokens with the digest on / off, and the distinct captions kept."""

    from qa.prompts import prompt_fields
    from qa.transcript import fit_transcript, normalise, render_lines

    reader = Reader(dataclasses.replace(settings, template="standard"), "http://unused/v1")
    tokens = {"on": 0, "off": 0}
    kept_shares, lines = [], {"in": 0, "on": 0}
    for question, transcript in items:
        fields = prompt_fields(question, "", transcript.duration, 0, settings.summary_words)
        budget = reader.budget_tokens(fields, question.q_uid)
        for label, similarity in (("on", settings.digest_similarity), ("off", None)):
            kept, _ = fit_transcript(transcript, budget, reader.count_tokens,
                                     settings.dedup_threshold, similarity)
            tokens[label] += reader.count_tokens(render_lines(kept))
            if label == "on":
                distinct = {normalise(c.caption) for c in transcript.captions}
                in_prompt = {normalise(line.text) for line in kept}
                kept_shares.append(len(distinct & in_prompt) / len(distinct))
                lines["on"] += len(kept)
        lines["in"] += len(transcript.captions)
    n = len(items)
    return {
        "questions": n,
        "captions_per_question": round(lines["in"] / n, 1),
        "lines_per_question_digest": round(lines["on"] / n, 1),
        "transcript_tokens_per_question_digest_off": round(tokens["off"] / n, 1),
        "transcript_tokens_per_question_digest_on": round(tokens["on"] / n, 1),
        "digest_token_ratio": round(tokens["on"] / tokens["off"], 3),
        "digest_distinct_kept": round(min(kept_shares), 3),
        "example": render_lines(fit_transcript(items[0][1], None, reader.count_tokens)[0])[:600],
    }


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
    parser.add_argument("--bias-questions", type=int, default=120,
                        help="questions of the debiasing measurement (>= 100)")
    parser.add_argument("--no-digest", action="store_true",
                        help="skip the digest measurement (it needs the demo's captions)")
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
    digest = None
    if not args.no_digest:  # before the server: it may train the demo captioner
        digest = digest_figures(demo_items(), settings)
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

        bias = debiasing(settings, server.base_url, args.bias_questions, 60, seed + 100)

    def speedup(template: str) -> float:
        qps = [r["questions_per_s"] for r in rows if r["template"] == template]
        return round(qps[-1] / qps[0], 3)

    result = {
        "machine": machine_line(),
        "cpu_capability": cpu_capability(),
        # vLLM's --dtype auto serves the checkpoint's own dtype: the tiny reader is float32.
        "dtype": f"{settings.dtype} (tiny reader saved in float32)",
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
        "debiasing": bias,
        "position_bias_raw": bias["position_bias_raw"],
        "position_bias_debiased": bias["position_bias_debiased"],
        "digest": digest,
        "digest_token_ratio": digest["digest_token_ratio"] if digest else None,
        "digest_distinct_kept": digest["digest_distinct_kept"] if digest else None,
        "note": "random weights: throughput and position bias only, never answer quality",
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
    print(f"\noption-order debiasing, {bias['questions']} questions (goal: debiased <= 0.3):")
    for label in ("raw", "debiased"):
        print(f"  {label:>8}: top letter share {bias[f'position_bias_{label}']:.3f}, "
              f"letters {bias[f'letters_{label}']}, "
              f"{bias[f'tokens_per_question_{label}']:.0f} tokens/question")
    print(f"  token cost of debiasing: {bias['token_cost_ratio']:.2f}x")
    if digest:
        print(f"caption digest on the demo dataset ({digest['questions']} questions, "
              f"{digest['captions_per_question']} captions each; goal: ratio <= 0.5):")
        off = digest["transcript_tokens_per_question_digest_off"]
        on = digest["transcript_tokens_per_question_digest_on"]
        print(f"  transcript tokens/question: off {off}, on {on}; "
              f"digest_token_ratio {digest['digest_token_ratio']:.3f}; "
              f"digest_distinct_kept {digest['digest_distinct_kept']:.3f}")


if __name__ == "__main__":
    main()
