"""All four captioners timed on the same frames: the paper's Time column, reproduced.

    python -m benchmarks.captioner_comparison                  # CPU quick check, depth / 4
    python -m benchmarks.captioner_comparison --device cuda    # GPU, real sizes, bf16, SDPA
    BENCH_OUT=/tmp/bench python -m benchmarks.captioner_comparison --device cuda --frames 256
    make bench-captioners ARGS="--device cuda"

Weights are random (the hub is not needed): what a captioner costs is set by its
architecture, its caption length and our implementation, not by its weights. Every
caption is exactly `--new-tokens` long (min_new_tokens == max_new_tokens, so random
weights cannot stop early), every captioner sees the same frames, the same dtype and the
same batch size (LLaVA-1.5-7B's is capped on GPU for memory). Tag2Text decodes with its
settings' beams (3, the reference's) unless `--tag2text-beams` says otherwise.

Each captioner is built through its module's real `build()`: a random-weights checkpoint
in the real format is written to a temporary folder first by `captioner.random_weights`
(llava-hf directory, MM-SeR directory, Tag2Text `.pth`), so the timed code is exactly the
product's. LLaVA-1.5-7B at real size is built in memory instead (14 GB written and read
back would eat the 5-minute GPU budget) and wrapped in `Llava15Captioner` the way
`build()` does (`--direct`).

Presets: `real` (the published sizes, the cuda default), `reduced` (every transformer
stack's layer count divided by `--depth-div`, 4 by default; widths, image sizes, token
counts and vocabularies stay real, so the relative cost structure is kept up to the
embeddings and heads; the cpu default), `tiny` (everything shrunk, for the smoke test).

Timing is built for a shared machine: all captioners are built first (once) and warmed up
on one batch each; then `--repeats` rounds (3) go over the frames step by step (a step is
`--batch-size` frames), every captioner captioning the same step back to back, the first
one rotating. Other jobs' load thus falls on all captioners alike, and each captioner's
frames/s comes from its median turn (its fastest is kept too); ratios to the simple model
come from medians of the same rounds. On the CPU torch runs 1 thread by default
(`--threads`): with 2 threads on a busy 2-core box every parallel region waits for the
thread another job descheduled, and turns of the same model varied 6-23x (1.2-1.3x with
one thread, load average ~3). The JSON records the load average at start, before and after
timing, every turn's seconds and, on the CPU, this process's CPU seconds per turn (a
cross-check ratio that other jobs' load hardly moves).

Writes captioners.json, captioners.csv and captioners.png to `--out`, else $BENCH_OUT,
else benchmarks/results; prints the table last. No caption of a random model means
anything: speed only.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.captioner import timed
from benchmarks.captioners_report import GOAL_MMSER_RATIO, GOAL_SPEEDUP, plot, table
from benchmarks.machine import (
    Turns,
    benchmark_dtype,
    interleave,
    load_average,
    machine,
    weight_bytes,
)
from captioner.base import Captioner, build_captioner, parameter_counts
from captioner.random_weights import PRESETS, Preset, size_summary, write_mmser
from captioner.random_weights_baselines import llava_parts, write_llava, write_tag2text
from captioner.settings import CaptionerSettings
from pipeline.errors import CaptionerError

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = ("llava15", "tag2text", "simple", "mmser")
EGOSCHEMA_FRAMES_PER_VIDEO = 180  # 3-minute clips at 1 fps
EGOSCHEMA_SUBSET_VIDEOS = 500
# The paper's VideoQA table (EgoSchema 500 subset), seconds of captioning.
PAPER_SECONDS = {"llava15": 29 * 60 + 20, "tag2text": 7 * 60 + 14, "simple": 4 * 60 + 53,
                 "mmser": 5 * 60 + 10}
# --- one captioner -------------------------------------------------------------------------


@dataclass
class Options:
    """One benchmark run (see `parse_args` for the defaults per device)."""

    device: str = "cpu"
    dtype: str = "auto"  # auto: bfloat16 on a GPU or a CPU with native bf16, else float32
    dtype_reason: str = ""  # why this dtype (benchmarks.machine.benchmark_dtype)
    preset: Preset = field(default_factory=lambda: Preset("reduced", 4))
    captioners: tuple[str, ...] = NAMES
    frames: int = 8
    frame_size: tuple[int, int] = (480, 640)  # (H, W), EgoSchema-like
    batch_size: int = 8
    llava_batch_size: int = 8  # LLaVA-7B's KV cache limits its batch on one GPU
    new_tokens: int = 60
    tag2text_beams: int | None = None  # None: the settings' 3 (the reference's)
    direct: tuple[str, ...] = ()  # built in memory, not through a checkpoint and build()
    warmup_frames: int = 2
    repeats: int = 3  # interleaved rounds over all frames; frames/s from the median turn
    # torch intra-op threads (None: torch's default). On a shared CPU box 1: with 2 threads
    # every parallel region waits for whichever thread another job has descheduled.
    threads: int | None = None
    seed: int = 0


def settings_for(opts: Options) -> CaptionerSettings:
    settings = CaptionerSettings(device=opts.device, dtype=opts.dtype,
                                 batch_size=opts.batch_size)
    settings.generation.max_new_tokens = opts.new_tokens
    settings.generation.min_new_tokens = opts.new_tokens  # random weights cannot stop early
    settings.mmser.refine_steps = 1  # the paper's setting
    # A random model's refinement repeats its coarse caption, so a verified draft would
    # make MM-SeR look nearly free; time every refined token instead (bench-captioner has
    # the drafted figures and what they cost at a given agreement).
    settings.mmser.draft_tokens = 0
    if opts.tag2text_beams is not None:
        settings.tag2text.num_beams = opts.tag2text_beams
    return settings


def make_captioner(name: str, opts: Options, tmp: Path) -> tuple[Captioner, str]:
    """Captioner `name` with random weights, and how it was built."""
    dtype = getattr(torch, opts.dtype)
    settings = settings_for(opts)
    if name == "llava15" and name in opts.direct:
        from captioner.llava15 import Llava15Captioner

        model, processor = llava_parts(opts.preset, dtype, opts.device)
        model.to(opts.device)  # a no-op unless some buffer was made on the CPU
        captioner = Llava15Captioner(model.eval(), processor, settings, name)
        return captioner, "in memory, wrapped in Llava15Captioner as build() does"
    if name in opts.direct:
        raise CaptionerError(f"--direct supports llava15 only, not {name!r}")
    folder, p = tmp / name, opts.preset
    kwargs: dict[str, Any] = {"device": opts.device, "dtype": opts.dtype}
    if name in ("simple", "mmser"):
        refine = name == "mmser"
        kwargs["checkpoint"] = str(write_mmser(folder, p, refine, dtype, opts.device))
    elif name == "llava15":
        kwargs["checkpoint"] = str(write_llava(folder, p, dtype, opts.device))
    elif name == "tag2text":
        files = write_tag2text(folder, p, dtype, opts.device)
        settings.tag2text.architecture = files.architecture
        kwargs.update(checkpoint=str(files.checkpoint), tag_list=str(files.tag_list),
                      tokenizer=str(files.tokenizer))
    else:
        raise CaptionerError(f"unknown captioner {name!r}; known: {', '.join(NAMES)}")
    gc.collect()  # the checkpoint's model is gone before build() loads it back
    return build_captioner(settings, name, **kwargs), "checkpoint on disk -> module build()"


def beams(captioner: Captioner) -> int:
    """Beams the captioner decodes with (MM-SeR keeps them in its GenerationConfig)."""
    if hasattr(captioner, "num_beams"):
        return captioner.num_beams
    return captioner.generation.num_beams


# --- interleaved timing --------------------------------------------------------------------


@dataclass
class Contender:
    """One built captioner and every turn it took (one turn: the same step of frames that
    every other captioner also captions in that round)."""

    name: str
    captioner: Captioner
    how: str
    build_s: float
    batch: int  # its batch size: a step of `batch_size` frames is 1+ of its batches
    weights: int  # bytes
    turns: Turns = field(default_factory=Turns)


def build_contender(name: str, opts: Options, tmp: Path) -> Contender:
    """Build captioner `name` through `make_captioner`, once, for every round."""
    gc.collect()
    start = time.perf_counter()
    captioner, how = make_captioner(name, opts, tmp)
    build_s = time.perf_counter() - start
    gc.collect()  # the checkpoint-writing model is freed before the next build
    batch = min(opts.batch_size, opts.llava_batch_size) if name == "llava15" else opts.batch_size
    return Contender(name, captioner, how, build_s, batch, weight_bytes(captioner.model))


def time_contenders(contenders: list[Contender], frames: np.ndarray,
                    opts: Options) -> list[dict]:
    """`benchmarks.machine.interleave` over steps of `batch_size` frames: each turn
    captions one step with one captioner in its batches (wall and CPU seconds, stage
    seconds, memory above what was held). One record per round."""
    step = min(opts.batch_size, len(frames))
    steps = [frames[i : i + step] for i in range(0, len(frames), step)]

    def turn(c: Contender, chunk: np.ndarray, t0: float) -> None:
        c.turns.take(lambda: timed(c.captioner, chunk, c.batch)[:2], len(chunk),
                     opts.device, t0)

    return interleave(contenders, steps, opts.repeats, turn,
                      lambda c: f"{c.name} {c.turns.wall_s[-1]:.2f}")


def result_row(c: Contender, opts: Options) -> dict[str, Any]:
    """One captioner's row: frames/s from its median seconds per frame over all turns."""
    t = c.turns
    per_frame = np.array(t.wall_s) / np.array(t.items)
    median, best = float(np.median(per_frame)), float(per_frame.min())
    fps = 1 / median
    step = max(t.items)
    row = {
        "captioner": c.name,
        "frames": step,  # one step; every turn of every round captions a step
        "turns": len(t.wall_s),
        "batch_size": c.batch,
        "num_beams": beams(c.captioner),
        "step_s": t.wall_s,  # wall seconds per turn, in order
        "turn_started_s": t.started,  # seconds after timing began
        "median_step_s": median * step,
        "min_step_s": best * step,
        "spread": float(per_frame.max() / best),  # slowest turn / fastest: the noise seen
        "frames_per_s": fps,
        "frames_per_s_best": 1 / best,
        "s_per_video": EGOSCHEMA_FRAMES_PER_VIDEO / fps,
        "egoschema500_s": EGOSCHEMA_SUBSET_VIDEOS * EGOSCHEMA_FRAMES_PER_VIDEO / fps,
        "params_benchmarked": sum(p.numel() for p in c.captioner.model.parameters()),
        "params_real": parameter_counts(settings_for(opts), c.name)["total"],
        "weights_bytes": c.weights,
        "activation_peak_bytes": t.activation_peak,
        "peak_memory_bytes": c.weights + t.activation_peak,
        "build_s": c.build_s,
        "build_path": c.how,
        "stages_s_per_frame": t.median_stages(),
        "paper_s": PAPER_SECONDS[c.name],
    }
    if not opts.device.startswith("cuda"):  # on a GPU the CPU mostly waits: not a cost
        cpu_per_frame = np.array(t.cpu_s) / np.array(t.items)
        row["cpu_step_s"] = t.cpu_s
        row["median_cpu_step_s"] = float(np.median(cpu_per_frame)) * step
    return row


def ratios(rows: dict[str, dict[str, Any]], key: str) -> dict[str, float | None]:
    """Each captioner's `key` (seconds per step, same step for all) / the simple model's."""
    simple = rows.get("simple")
    return {n: r[key] / simple[key] if simple and key in r else None for n, r in rows.items()}


MEMORY_KIND = {
    "cuda": "weights + peak torch.cuda allocation above what was held at each turn's start",
    "cpu": "weights + peak RSS growth in a turn (VmHWM - VmRSS; memory reused from freed "
           "blocks is not seen)",
}


# --- the run -------------------------------------------------------------------------------


def run(opts: Options, out_dir: Path) -> dict[str, Any]:
    """Build every captioner in `opts.captioners` once, warm each up on one batch, then time
    them interleaved on the same frames for `opts.repeats` rounds; write JSON, CSV, PNG."""
    unknown = [n for n in opts.captioners if n not in NAMES]
    if unknown:
        raise CaptionerError(f"unknown captioners {unknown}; known: {', '.join(NAMES)}")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if opts.repeats < 1:
        raise CaptionerError(f"--repeats must be >= 1, got {opts.repeats}")
    if opts.dtype == "auto" or not opts.dtype_reason:
        opts.dtype, opts.dtype_reason = benchmark_dtype(opts.dtype, opts.device)
    print(f"dtype {opts.dtype} ({opts.dtype_reason})", flush=True)
    sizes = size_summary(opts.preset)  # before the long part: a broken import fails fast
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    frames = rng.integers(0, 256, (opts.frames, *opts.frame_size, 3), dtype=np.uint8)
    load = {"at_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="bench-captioners-") as tmp:
        contenders = []
        for name in opts.captioners:
            contenders.append(build_contender(name, opts, Path(tmp)))
            print(f"{name}: built in {contenders[-1].build_s:.1f} s", flush=True)
    for c in contenders:
        # Warm-up (allocator, kernels, lazy init), not timed; never more than one batch.
        c.captioner.caption_batch(frames[: max(1, min(opts.warmup_frames, c.batch, len(frames)))])
    load["before_timing"] = load_average()
    rounds = time_contenders(contenders, frames, opts)
    load["after_timing"] = load_average()
    rows = {c.name: result_row(c, opts) for c in contenders}
    del contenders
    gc.collect()

    paper_ratios = {n: PAPER_SECONDS[n] / PAPER_SECONDS["simple"] for n in NAMES}
    medians = ratios(rows, "median_step_s")
    for name, row in rows.items():
        row["ratio_to_simple"] = medians[name]
        row["paper_ratio_to_simple"] = paper_ratios[name]
        row["goal_s"] = PAPER_SECONDS[name] / GOAL_SPEEDUP
    real_gpu = opts.device.startswith("cuda") and opts.preset.name == "real"
    goals = None
    if real_gpu:
        goals = {n: r["egoschema500_s"] <= r["goal_s"] for n, r in rows.items()}
        if medians.get("mmser") is not None:
            goals["mmser_over_simple"] = medians["mmser"] <= GOAL_MMSER_RATIO
    result = {
        "machine": {**machine(torch.device(opts.device)),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "options": {**asdict(opts), "preset": opts.preset.name},
        "sizes": sizes,
        "captioners": rows,
        # Medians of the same interleaved rounds: the headline figures.
        "ratios_to_simple": medians,
        # Cross-checks: the fastest turns' ratio, and (CPU) this process's CPU time's ratio.
        "ratios_to_simple_min": ratios(rows, "min_step_s"),
        "ratios_to_simple_cpu_time": ratios(rows, "median_cpu_step_s")
        if not opts.device.startswith("cuda") else None,
        "paper_ratios_to_simple": paper_ratios,
        "paper_seconds": PAPER_SECONDS,
        "goals_met": goals,  # only for real sizes on a GPU: the goals
        "load_average": load,  # 1, 5, 15 minutes
        "rounds": rounds,
        "timing": "interleaved round-robin; per captioner the median over all turns",
        "peak_memory_kind": MEMORY_KIND["cuda" if opts.device.startswith("cuda") else "cpu"],
        "note": "random weights, speed only; fixed caption length; "
                + ("real sizes" if opts.preset.name == "real" else
                   f"preset {opts.preset.name}: absolute times are not the product's"),
    }
    write_outputs(result, out_dir)
    return result


CSV_COLUMNS = ("captioner", "frames", "turns", "batch_size", "num_beams", "median_step_s",
               "min_step_s", "spread", "frames_per_s", "frames_per_s_best", "s_per_video",
               "egoschema500_s", "params_benchmarked", "params_real", "peak_memory_bytes",
               "ratio_to_simple", "paper_ratio_to_simple", "paper_s", "goal_s", "build_path")


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "captioners.json").write_text(json.dumps(result, indent=2, default=str))
    with open(out_dir / "captioners.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["captioners"].values())
    try:
        plot(result, out_dir / "captioners.png")
    except ImportError as exc:  # a bare CUDA image may lack matplotlib: keep the numbers
        print(f"no captioners.png: {exc} (pip install matplotlib)", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, Path]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: bfloat16 on a GPU or a CPU with native bf16, else float32")
    parser.add_argument("--preset", choices=["real", "reduced", "tiny"], default=None,
                        help="default: reduced on cpu, real on cuda")
    parser.add_argument("--depth-div", type=int, default=4,
                        help="reduced preset: layers of every stack divided by this")
    parser.add_argument("--captioners", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--frames", type=int, default=None, help="default: 8 cpu, 512 cuda")
    parser.add_argument("--frame-size", type=int, nargs=2, default=[480, 640],
                        metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 cpu, 128 cuda")
    parser.add_argument("--llava-batch-size", type=int, default=None,
                        help="cap on LLaVA-1.5's batch (default: 8 cpu, 64 cuda)")
    parser.add_argument("--new-tokens", type=int, default=60, help="fixed caption length")
    parser.add_argument("--tag2text-beams", type=int, default=None,
                        help="default: Tag2Text's settings (3 beams, the reference's)")
    parser.add_argument("--direct", nargs="*", default=None, choices=["llava15"],
                        help="build in memory, not via a checkpoint (default: llava15 at "
                             "real size on cuda)")
    parser.add_argument("--warmup-frames", type=int, default=None,
                        help="frames captioned before timing (default: 2 cpu, 16 cuda)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds over all frames; frames/s from the median turn")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on cpu, which keeps other jobs' load "
                             "from stalling every parallel region; torch's default on cuda)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the files (default: $BENCH_OUT or benchmarks/results)")
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda")
    name = args.preset or ("real" if cuda else "reduced")
    preset = Preset("reduced", args.depth_div) if name == "reduced" else PRESETS[name]
    direct = args.direct
    if direct is None:
        direct = ["llava15"] if cuda and name == "real" else []
    dtype, dtype_reason = benchmark_dtype(args.dtype, args.device)
    opts = Options(
        device=args.device,
        dtype=dtype, dtype_reason=dtype_reason,
        preset=preset,
        captioners=tuple(args.captioners),
        frames=args.frames or (512 if cuda else 8),
        frame_size=tuple(args.frame_size),
        batch_size=args.batch_size or (128 if cuda else 8),
        llava_batch_size=args.llava_batch_size or (64 if cuda else 8),
        new_tokens=args.new_tokens,
        tag2text_beams=args.tag2text_beams,
        direct=tuple(direct),
        warmup_frames=args.warmup_frames or (16 if cuda else 2),
        repeats=args.repeats,
        threads=args.threads if args.threads is not None else (None if cuda else 1),
    )
    out = args.out or Path(os.environ.get("BENCH_OUT") or RESULTS)
    return opts, out


def main(argv: Sequence[str] | None = None) -> None:
    opts, out = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would bury the table
    if opts.device.startswith("cuda"):
        # TF32 for any float32 matmul left; bf16 work is unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
    result = run(opts, out)
    print(f"\nwrote {out / 'captioners.json'}, captioners.csv, captioners.png\n")
    print(table(result))


if __name__ == "__main__":
    main()
