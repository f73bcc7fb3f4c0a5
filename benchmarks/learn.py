"""Does MM-SeR's refinement learn to correct a caption by LOOKING AT THE IMAGE?

    make bench-learn                       # 3 seeds, about 30 minutes on 2 CPU cores
    python -m benchmarks.learn --quick     # the plumbing in ~2 minutes (no figure means anything)

On the synthetic world (pipeline/world.py: two objects, their colours, shapes, sizes and
relation, one canonical caption per image; some colour-shape pairs never seen in
training), for each seed it trains a tiny simple model and a tiny MM-SeR through
`mmser train` (align -> caption -> refine; the checkpoint kept is the one with the lowest
VALIDATION loss), then, on held-out test images, free-running (greedy decoding, never
teacher-forced), measures:

- the simple model (caption stage): slot accuracy and exact match;
- MM-SeR on its own coarse captions: exact match before / after refinement, captions fixed
  vs broken by it;
- refinement of perturbed ground truth (one entity, attribute or relation edit, and 1-3
  edits of any kind for "overall"): the correction rate (output == ground truth); the
  same with a MISMATCHED image (another test image, same checkpoint: what a language prior
  alone corrects), and with the refinement tokens ZEROED (what the SeR-Connector adds);
- the share of correct input slots the refinement wrongly changes, and the share of
  already-right inputs (the ground truth itself) kept unchanged;
- adaptive refinement at 3 confidence thresholds (quartiles of the coarse captions'
  confidence on the validation split): share of frames refined, exact match.

Every figure carries a 95% interval from a paired bootstrap over test images and seeds
(the same test images for every seed, resampled together). The vision tower and LM stand
in for pretrained CLIP / OPT (stage 0, captioner/stand_in.py): trained once on the
world's labels and captions, shared by all seeds, as one pretrained checkpoint is shared
by every real run. A model trained on a synthetic world shows LEARNABILITY of the
mechanism, not caption quality on real images.

Writes benchmarks/results/learn.json (keys: correction_rate, control_correction_rate,
zeroed_correction_rate, wrong_change_rate, kept_rate, exact_gain, exact_gain_ci_low,
fixed_to_broken, per_type, adaptive, seeds, wall_s, ...) and learn.png; the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.learn_stats import CONDITIONS, TYPES, goals, plot, summarise, table

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path("data/bench-learn")
QUICK_WORK = Path("data/bench-learn-quick")  # a quick run never overwrites a real one
@dataclass
class Budget:
    """Steps and sizes of one benchmark run."""

    train: int = 4000
    val: int = 300
    test: int = 1000
    vision_steps: int = 1500
    text_steps: int = 300
    align_steps: int = 150
    caption_steps: int = 600
    refine_steps: int = 750
    batch_size: int = 32
    learning_rate: float = 1e-3


QUICK = Budget(train=96, val=16, test=24, vision_steps=10, text_steps=5, align_steps=4,
               caption_steps=6, refine_steps=6, batch_size=8)


# --- one seed: train, then evaluate -------------------------------------------------------


def train_overrides(world: Any, out: Path, budget: Budget, seed: int) -> list[str]:
    """`mmser train` settings for the world (all on the command line, nothing hidden)."""
    root = world.root
    return [
        f"train.vision_model={world.vision_model}", f"train.language_model={world.language_model}",
        f"train.output_dir={out}", f"train.seed={seed}",
        f"train.data.train=[{{format: llava, path: {root}/train.json}}]",
        f"train.data.eval=[{{format: llava, path: {root}/val.json}}]",
        f"train.batch_size={budget.batch_size}", f"train.learning_rate={budget.learning_rate}",
        "train.eval_steps=100", "train.save_steps=100", "train.logging_steps=25",
        "train.save_total_limit=1", "train.dataloader_workers=0", "train.precision=fp32",
        f"train.perturb.word_lists={root}/word_lists.json",
        # "to the left of" -> "above" changes a caption's length by ~17%; real captions
        # have both, so length gives nothing away. Two objects may share a size.
        "train.perturb.max_length_change=0.3", "train.perturb.repeatable=[size]",
        "train.pairs.perturbed=0.5", "train.pairs.identity=0.3", "train.pairs.own=0.2",
        "train.pairs.own_max=1500", "train.pairs.erase=0.3", "train.max_caption_tokens=24",
        "captioner.generation.max_new_tokens=24",
        "train.connector={connector_hidden_size: 64, connector_num_layers: 2, "
        "connector_num_heads: 2, num_refine_tokens: 8, connector_layers: [1, 2, 3, 4]}",
    ]


def train_seed(world: Any, out: Path, budget: Budget, seed: int) -> dict[str, float]:
    """align -> caption -> refine through the `mmser train` command; seconds per stage."""
    from pipeline.cli import main

    seconds = {}
    steps = {"align": budget.align_steps, "caption": budget.caption_steps,
             "refine": budget.refine_steps}
    for stage, n in steps.items():
        if (out / stage / "model" / "config.json").exists():
            continue  # a finished stage of an interrupted benchmark
        t0 = time.perf_counter()
        args = ["train", "--stage", stage]
        for item in [*train_overrides(world, out, budget, seed), f"train.max_steps={n}"]:
            args += ["--set", item]
        if main(args) != 0:
            raise RuntimeError(f"mmser train --stage {stage} failed (seed {seed})")
        seconds[stage] = time.perf_counter() - t0
    return seconds


def batched(fn: Any, *columns: list, size: int = 200, **kwargs: Any) -> list:
    out: list = []
    for i in range(0, len(columns[0]), size):
        out += fn(*[c[i : i + size] for c in columns], **kwargs).results
    return out


def _confidences(captioner: Any, images: list[np.ndarray]) -> list[float]:
    """Mean token probability of each coarse caption (what the adaptive stop reads)."""
    import torch

    out: list[float] = []
    model = captioner.model
    for i in range(0, len(images), 200):
        part = images[i : i + 200]
        pixels = captioner.processor(images=part, return_tensors="pt")["pixel_values"]
        ids = captioner.prompt_ids[None].expand(len(part), -1)
        with torch.inference_mode():
            features = model.encode_images(pixels)
            state = model.caption_pass(ids, torch.ones_like(ids), features,
                                       captioner.generation, keep_state=False)
        out += state.confidence.tolist()
    return out


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point: image i is refined with image perm[i]'s pixels."""
    while True:
        perm = rng.permutation(n)
        if n < 2 or not (perm == np.arange(n)).any():
            return perm


def evaluate_seed(world: Any, out: Path, seed: int) -> dict[str, Any]:
    """Per-test-image outcomes of one seed's models (lists aligned with the test split)."""
    from captioner.mmser import build
    from captioner.perturb import PerturbSettings, RulePerturber, WordLists
    from captioner.settings import CaptionerSettings
    from captioner.train_data import DataSource, decode_rgb, load_caption_source
    from pipeline.world import LEARN_WORLD, parse_caption

    spec = LEARN_WORLD
    test = load_caption_source(DataSource("llava", str(world.root / "test.json"))).samples
    val = load_caption_source(DataSource("llava", str(world.root / "val.json"))).samples
    images = [decode_rgb(s.image) for s in test]
    truth = [s.captions[0] for s in test]
    settings = CaptionerSettings(device="cpu", dtype="float32")
    settings.generation.max_new_tokens = 24
    simple = build(settings, "simple", checkpoint=out / "caption" / "model")
    mmser = build(settings, "mmser", checkpoint=out / "refine" / "model")

    def slots_of(text: str) -> dict[str, str]:
        return parse_caption(text, spec) or {}

    record: dict[str, Any] = {"truth": truth, "held_out": [s.extra["held_out"] for s in test]}
    record["simple"] = [r.caption for r in batched(simple.caption_batch, images)]
    own = batched(mmser.caption_batch, images)
    record["coarse"] = [r.coarse_caption for r in own]
    record["refined"] = [r.caption for r in own]
    perturber = RulePerturber(
        WordLists.from_json(world.root / "word_lists.json"),
        PerturbSettings(max_length_change=0.3, repeatable=["size"]),
    )
    perm = derangement(len(images), np.random.default_rng(seed))
    mismatched = [images[j] for j in perm]
    cases: dict[str, list[str | None]] = {}
    for kind in (*TYPES, "overall"):
        made = [
            perturber.perturb(t, random.Random(f"test:{kind}:{i}"),
                              kinds=None if kind == "overall" else [kind],
                              n_edits=None if kind == "overall" else 1)
            for i, t in enumerate(truth)
        ]
        cases[kind] = [m.perturbed if m else None for m in made]
    record["perturbed"] = cases
    record["refined_given"] = {}
    for kind, given in cases.items():
        idx = [i for i, g in enumerate(given) if g is not None]
        texts = [given[i] for i in idx]
        outputs = {}
        for condition in CONDITIONS:
            pixels = [mismatched[i] if condition == "mismatched" else images[i] for i in idx]
            results = batched(mmser.refine_given, pixels, texts,
                               zero_refinement=condition == "zeroed")
            full: list[str | None] = [None] * len(truth)
            for i, r in zip(idx, results, strict=True):
                full[i] = r.caption
            outputs[condition] = full
        record["refined_given"][kind] = outputs
    record["identity"] = [r.caption for r in batched(mmser.refine_given, images, truth)]
    # Adaptive stopping, thresholds from the VALIDATION split's coarse confidences.
    val_conf = _confidences(mmser, [decode_rgb(s.image) for s in val])
    record["adaptive"] = {}
    for q in (25, 50, 75):
        t = float(np.percentile(val_conf, q))
        settings.mmser.confidence_threshold = t
        adaptive = build(settings, "mmser", checkpoint=out / "refine" / "model")
        results = batched(adaptive.caption_batch, images)
        record["adaptive"][f"q{q}"] = {
            "threshold": t,
            "refined": [r.refine_passes > 0 for r in results],
            "caption": [r.caption for r in results],
        }
    record["slots"] = {name: [slots_of(c) for c in record[name]]
                       for name in ("simple", "coarse", "refined")}
    return record


def run_one_seed(args: argparse.Namespace) -> int:
    """Child process: one seed, one thread (seeds run side by side)."""
    import torch

    torch.set_num_threads(1)
    from pipeline.world import LEARN_WORLD, build_world

    budget = QUICK if args.quick else Budget()
    work = Path(args.work)
    # The parent built the world and its stage-0 components; a child only reads them.
    world = build_world(work / "world", LEARN_WORLD, _splits(budget), seed=0,
                        vision_steps=budget.vision_steps, text_steps=budget.text_steps,
                        components=False)
    out = work / f"seed-{args.one_seed}"
    stamp = out / "budget.json"
    if stamp.exists() and json.loads(stamp.read_text()) != asdict(budget):
        import shutil

        shutil.rmtree(out)  # trained under another budget: start this seed over
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(asdict(budget)))
    t0 = time.perf_counter()
    seconds = train_seed(world, out, budget, args.one_seed)
    t1 = time.perf_counter()
    record = evaluate_seed(world, out, args.one_seed)
    record["seconds"] = {**seconds, "evaluate": time.perf_counter() - t1, "train": t1 - t0}
    (out / "eval.json").write_text(json.dumps(record))
    return 0


def _splits(budget: Budget) -> dict[str, int]:
    return {"train": budget.train, "val": budget.val, "test": budget.test}


def machine_info() -> dict[str, Any]:
    import torch

    from benchmarks.machine import cpu_model

    return {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "dtype": "float32", "torch": torch.__version__}


def run(args: argparse.Namespace) -> int:
    from pipeline.world import LEARN_WORLD, build_world

    t0 = time.perf_counter()
    budget = QUICK if args.quick else Budget()
    work = Path(args.work)
    seeds = list(range(args.seeds))
    # Stage 0 once, shared by every seed (as one pretrained checkpoint is).
    world = build_world(work / "world", LEARN_WORLD, _splits(budget), seed=0,
                        vision_steps=budget.vision_steps, text_steps=budget.text_steps)
    stage0 = time.perf_counter() - t0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    children = []
    for seed in seeds:
        if (work / f"seed-{seed}" / "eval.json").exists() and not args.fresh:
            continue
        cmd = [sys.executable, "-m", "benchmarks.learn", "--one-seed", str(seed),
               "--work", str(work)] + (["--quick"] if args.quick else [])
        log = (work / f"seed-{seed}.log").open("w")
        children.append((seed, subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
    for seed, child, log in children:
        if child.wait() != 0:
            print(f"seed {seed} failed: see {work}/seed-{seed}.log", file=sys.stderr)
            return 1
        log.close()
    records = [json.loads((work / f"seed-{s}" / "eval.json").read_text()) for s in seeds]
    summary = summarise(records)
    summary.update(
        seeds=seeds, wall_s=time.perf_counter() - t0, stage0_s=stage0,
        stage0=world.stand_in, budget=asdict(budget),
        seconds_per_seed=[r["seconds"] for r in records], machine=machine_info(),
        quick=bool(args.quick),
    )
    summary["goals"] = goals(summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learn.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "learn.png")
    from pipeline.report_captions import learn_view

    print(f"view: {learn_view(work / 'view', world.root, records[0], seeds[0])[0]}")
    if args.quick:
        print("QUICK RUN: a few steps only; the figures below mean nothing.")
    print(table(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", default=None,
                        help=f"world, checkpoints, per-seed results (default {WORK}; "
                        f"--quick: {QUICK_WORK})")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="the plumbing only, in minutes")
    parser.add_argument("--fresh", action="store_true", help="re-evaluate finished seeds too")
    parser.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work = args.work or str(QUICK_WORK if args.quick else WORK)
    if args.one_seed is not None:
        return run_one_seed(args)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
