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

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path("data/bench-learn")
QUICK_WORK = Path("data/bench-learn-quick")  # a quick run never overwrites a real one
TYPES = ("entity", "attribute", "relation")
CONDITIONS = ("image", "mismatched", "zeroed")
# Measures also reported apart for test images whose colour-shape pairs all occur in
# training ("seen") and those with a pair no training image shows ("unseen").
SPLIT_MEASURES = ("simple_exact", "coarse_exact", "refined_exact", "kept", "overall_image",
                  "overall_mismatched", "overall_zeroed", "fixed", "broken")
GOALS = {
    "correction above control (points)": 30.0, "wrong changes at most": 0.05,
    "kept at least": 0.90, "exact gain at least (points)": 5.0,
    "zeroed removes at least (share of gain)": 0.5, "fixed to broken at least": 3.0,
}


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


def _batched(fn: Any, *columns: list, size: int = 200, **kwargs: Any) -> list:
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
    record["simple"] = [r.caption for r in _batched(simple.caption_batch, images)]
    own = _batched(mmser.caption_batch, images)
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
            results = _batched(mmser.refine_given, pixels, texts,
                               zero_refinement=condition == "zeroed")
            full: list[str | None] = [None] * len(truth)
            for i, r in zip(idx, results, strict=True):
                full[i] = r.caption
            outputs[condition] = full
        record["refined_given"][kind] = outputs
    record["identity"] = [r.caption for r in _batched(mmser.refine_given, images, truth)]
    # Adaptive stopping, thresholds from the VALIDATION split's coarse confidences.
    val_conf = _confidences(mmser, [decode_rgb(s.image) for s in val])
    record["adaptive"] = {}
    for q in (25, 50, 75):
        t = float(np.percentile(val_conf, q))
        settings.mmser.confidence_threshold = t
        adaptive = build(settings, "mmser", checkpoint=out / "refine" / "model")
        results = _batched(adaptive.caption_batch, images)
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


# --- statistics ---------------------------------------------------------------------------


class Outcomes:
    """Per (seed, test image) values of every measure, NaN where a measure does not apply
    (e.g. a caption with nothing of that type to perturb)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        from pipeline.world import LEARN_WORLD

        self.spec = LEARN_WORLD
        self.records = records
        self.values: dict[str, np.ndarray] = {}
        for name in self._measures(records[0]):
            self.values[name] = np.array([self._measures(r)[name] for r in records], float)

    def _slots(self, text: str | None) -> dict[str, str]:
        from pipeline.world import parse_caption

        return (parse_caption(text, self.spec) or {}) if text is not None else {}

    def _measures(self, r: dict[str, Any]) -> dict[str, list[float]]:
        if "_measures" in r:
            return r["_measures"]
        from pipeline.world import parse_caption

        truth = r["truth"]
        n = len(truth)
        m: dict[str, list[float]] = {}
        exact = lambda a, b: float(a is not None and a.strip() == b.strip())  # noqa: E731
        truth_slots = [parse_caption(t, self.spec) for t in truth]
        m["simple_exact"] = [exact(a, t) for a, t in zip(r["simple"], truth, strict=True)]
        m["simple_slots"] = [
            float(np.mean([self._slots(a).get(k) == v for k, v in ts.items()]))
            for a, ts in zip(r["simple"], truth_slots, strict=True)
        ]
        m["coarse_exact"] = [exact(a, t) for a, t in zip(r["coarse"], truth, strict=True)]
        m["refined_exact"] = [exact(a, t) for a, t in zip(r["refined"], truth, strict=True)]
        m["exact_gain"] = [b - a for a, b in zip(m["coarse_exact"], m["refined_exact"],
                                                 strict=True)]
        m["fixed"] = [float(a == 0 and b == 1) for a, b in zip(m["coarse_exact"],
                                                               m["refined_exact"], strict=True)]
        m["broken"] = [float(a == 1 and b == 0) for a, b in zip(m["coarse_exact"],
                                                                m["refined_exact"], strict=True)]
        m["held_out_refined_exact"] = [v if h else np.nan for v, h in zip(
            m["refined_exact"], r["held_out"], strict=True)]
        m["kept"] = [exact(a, t) for a, t in zip(r["identity"], truth, strict=True)]
        correct_slots, wrong_changes = [0.0] * n, [0.0] * n
        for kind, given in r["perturbed"].items():
            for condition, outputs in r["refined_given"][kind].items():
                m[f"{kind}_{condition}"] = [
                    np.nan if g is None else exact(o, t)
                    for g, o, t in zip(given, outputs, truth, strict=True)
                ]
            for i, (g, o) in enumerate(zip(given, r["refined_given"][kind]["image"],
                                           strict=True)):
                if g is None:
                    continue
                before, after = self._slots(g), self._slots(o)
                for k, v in truth_slots[i].items():
                    if before.get(k) == v:
                        correct_slots[i] += 1
                        wrong_changes[i] += float(after.get(k) != v)
        m["correct_input_slots"], m["wrong_changes"] = correct_slots, wrong_changes
        for t, run in r["adaptive"].items():
            m[f"adaptive_{t}_refined"] = [float(x) for x in run["refined"]]
            m[f"adaptive_{t}_exact"] = [exact(a, b) for a, b in zip(run["caption"], truth,
                                                                    strict=True)]
        held = np.array(r["held_out"], bool)
        for name in SPLIT_MEASURES:
            values = np.array(m[name], float)
            m[f"{name}@seen"] = np.where(held, np.nan, values).tolist()
            m[f"{name}@unseen"] = np.where(held, values, np.nan).tolist()
        r["_measures"] = m
        return m

    def thresholds(self) -> list[str]:
        return list(self.records[0]["adaptive"])


def bootstrap(outcomes: Outcomes, stat: Any, replicates: int = 1000,
              seed: int = 0) -> tuple[float, float, float]:
    """(value, low, high): `stat(values, seeds, images)` on all data, and its 95% interval
    over replicates that resample seeds and test images together (paired: every measure
    of a replicate sees the same seeds and images)."""
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # all-NaN resamples: NaN
    rng = np.random.default_rng(seed)
    S, N = next(iter(outcomes.values.values())).shape
    every_seed, every_image = np.arange(S), np.arange(N)
    value = stat(outcomes.values, every_seed, every_image)
    draws = [stat(outcomes.values, rng.integers(0, S, S), rng.integers(0, N, N))
             for _ in range(replicates)]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(value), float(low), float(high)


def mean_of(name: str) -> Any:
    return lambda v, s, i: float(np.nanmean(v[name][np.ix_(s, i)]))


def diff_of(a: str, b: str) -> Any:
    return lambda v, s, i: float(np.nanmean(v[a][np.ix_(s, i)]) - np.nanmean(v[b][np.ix_(s, i)]))


def ratio_of(a: str, b: str) -> Any:
    def stat(v: dict, s: np.ndarray, i: np.ndarray) -> float:
        top, bottom = np.nansum(v[a][np.ix_(s, i)]), np.nansum(v[b][np.ix_(s, i)])
        if not bottom:
            return float("inf") if top else float("nan")
        return float(top / bottom)

    return stat


def removed_share(v: dict, s: np.ndarray, i: np.ndarray) -> float:
    """Share of the correction gain over the control that zeroing the refinement tokens
    removes: (image - zeroed) / (image - mismatched), on the overall perturbations."""
    sel = np.ix_(s, i)
    full, ctrl, zero = (np.nanmean(v[f"overall_{c}"][sel]) for c in CONDITIONS)
    return float((full - zero) / (full - ctrl)) if full != ctrl else float("nan")


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes = Outcomes(records)
    ci: dict[str, list[float]] = {}

    def fig(key: str, stat: Any) -> float:
        value, low, high = bootstrap(outcomes, stat)
        ci[key] = [low, high]
        return value

    out: dict[str, Any] = {
        "simple_slot_accuracy": fig("simple_slot_accuracy", mean_of("simple_slots")),
        "simple_exact": fig("simple_exact", mean_of("simple_exact")),
        "coarse_exact": fig("coarse_exact", mean_of("coarse_exact")),
        "refined_exact": fig("refined_exact", mean_of("refined_exact")),
        "held_out_refined_exact": fig("held_out_refined_exact",
                                      mean_of("held_out_refined_exact")),
        "exact_gain": fig("exact_gain", mean_of("exact_gain")),
        "correction_rate": fig("correction_rate", mean_of("overall_image")),
        "control_correction_rate": fig("control_correction_rate", mean_of("overall_mismatched")),
        "zeroed_correction_rate": fig("zeroed_correction_rate", mean_of("overall_zeroed")),
        "correction_above_control": fig("correction_above_control",
                                        diff_of("overall_image", "overall_mismatched")),
        "zeroed_removed_share": fig("zeroed_removed_share", removed_share),
        "wrong_change_rate": fig("wrong_change_rate", ratio_of("wrong_changes",
                                                               "correct_input_slots")),
        "kept_rate": fig("kept_rate", mean_of("kept")),
        "fixed_to_broken": fig("fixed_to_broken", ratio_of("fixed", "broken")),
        "fixed": fig("fixed", mean_of("fixed")),
        "broken": fig("broken", mean_of("broken")),
    }
    out["exact_gain_ci_low"] = ci["exact_gain"][0]
    out["per_type"] = {}
    for kind in TYPES:
        row = {c: fig(f"{kind}_{c}", mean_of(f"{kind}_{c}")) for c in CONDITIONS}
        row["above_control"] = fig(f"{kind}_above_control",
                                   diff_of(f"{kind}_image", f"{kind}_mismatched"))
        row["cases_per_seed"] = int(np.isfinite(outcomes.values[f"{kind}_image"][0]).sum())
        out["per_type"][kind] = row
    out["adaptive"] = {}
    for t in outcomes.thresholds():
        out["adaptive"][t] = {
            "thresholds": [r["adaptive"][t]["threshold"] for r in records],
            "refined_share": fig(f"adaptive_{t}_refined", mean_of(f"adaptive_{t}_refined")),
            "exact": fig(f"adaptive_{t}_exact", mean_of(f"adaptive_{t}_exact")),
        }
    out["by_pair"] = {
        split: {name: fig(f"{name}@{split}", mean_of(f"{name}@{split}"))
                for name in SPLIT_MEASURES}
        for split in ("seen", "unseen")
    }
    out["ci95"] = ci
    out["test_images"] = len(records[0]["truth"])
    out["held_out_test_images"] = int(sum(records[0]["held_out"]))
    return out


def goals(summary: dict[str, Any]) -> dict[str, bool]:
    per_type_ok = all(row["above_control"] >= 0.30 for row in summary["per_type"].values())
    return {
        "correction >= control + 30 points, overall": summary["correction_above_control"] >= 0.30,
        "correction >= control + 30 points, every type": per_type_ok,
        "wrong changes <= 5%": summary["wrong_change_rate"] <= 0.05,
        "kept >= 90%": summary["kept_rate"] >= 0.90,
        "exact gain >= 5 points, interval above 0": summary["exact_gain"] >= 0.05
        and summary["exact_gain_ci_low"] > 0,
        "zeroed tokens remove >= half the gain": summary["zeroed_removed_share"] >= 0.5,
        "fixed : broken >= 3 : 1": summary["fixed_to_broken"] >= 3.0,
    }


# --- report -------------------------------------------------------------------------------


def _pct(summary: dict[str, Any], key: str, value: float | None = None) -> str:
    value = summary[key] if value is None else value
    low, high = summary["ci95"][key]
    return f"{100 * value:5.1f}% [{100 * low:5.1f}, {100 * high:5.1f}]"


def table(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"bench-learn: {len(s['seeds'])} seeds x {s['test_images']} held-out test images "
        f"({s['held_out_test_images']} with an unseen colour-shape pair); "
        "free-running greedy decoding; 95% paired bootstrap intervals",
        f"machine: {s['machine']['cpu']} ({s['machine']['capability']}), "
        f"{s['machine']['dtype']}; wall {s['wall_s'] / 60:.1f} min",
        "A tiny model on a synthetic world: learnability, not real-world caption quality.",
        "",
        f"{'simple model: slot accuracy':<44}{_pct(s, 'simple_slot_accuracy')}",
        f"{'simple model: exact match':<44}{_pct(s, 'simple_exact')}",
        f"{'MM-SeR coarse -> refined exact match':<44}{_pct(s, 'coarse_exact')} -> "
        f"{_pct(s, 'refined_exact')}",
        f"{'exact gain (refined - coarse)':<44}{_pct(s, 'exact_gain')}",
        f"{'refined exact, unseen colour-shape pairs':<44}{_pct(s, 'held_out_refined_exact')}",
        f"{'own captions fixed / broken (ratio)':<44}{_pct(s, 'fixed')} / "
        f"{_pct(s, 'broken')} ({s['fixed_to_broken']:.1f}:1)",
        "",
        f"{'correction of perturbed ground truth':<28}{'image':>24}{'mismatched image':>24}"
        f"{'zeroed tokens':>24}",
    ]
    for kind, row in s["per_type"].items():
        lines.append(f"{kind + ' (1 edit)':<28}" + "".join(
            f"{_pct(s, f'{kind}_{c}', row[c]):>24}" for c in CONDITIONS))
    lines.append(f"{'overall (1-3 edits)':<28}{_pct(s, 'correction_rate'):>24}"
                 f"{_pct(s, 'control_correction_rate'):>24}{_pct(s, 'zeroed_correction_rate'):>24}")
    lines += [
        f"{'correction - control, overall':<44}{_pct(s, 'correction_above_control')}",
        f"{'share of that gain zeroed tokens remove':<44}{_pct(s, 'zeroed_removed_share')}",
        f"{'correct input slots wrongly changed':<44}{_pct(s, 'wrong_change_rate')}",
        f"{'right inputs kept unchanged':<44}{_pct(s, 'kept_rate')}",
        "",
        f"{'by colour-shape pairs of the test image':<36}{'seen in training':>24}"
        f"{'never seen':>24}",
    ]
    labels = {"simple_exact": "simple exact", "coarse_exact": "MM-SeR coarse exact",
              "refined_exact": "MM-SeR refined exact", "kept": "right inputs kept",
              "overall_image": "corrected", "overall_mismatched": "corrected, mismatched",
              "overall_zeroed": "corrected, zeroed tokens", "fixed": "own captions fixed",
              "broken": "own captions broken"}
    for name, label in labels.items():
        lines.append(f"{label:<36}" + "".join(
            f"{_pct(s, f'{name}@{split}', s['by_pair'][split][name]):>24}"
            for split in ("seen", "unseen")))
    lines += [
        "",
        "adaptive refinement (threshold: a percentile of the coarse captions' confidence on",
        "the validation split, per seed):",
    ]
    for t, row in s["adaptive"].items():
        refined = _pct(s, f"adaptive_{t}_refined", row["refined_share"])
        exact = _pct(s, f"adaptive_{t}_exact", row["exact"])
        values = "/".join(f"{v:.3f}" for v in row["thresholds"])
        lines.append(f"  {t} ({values}): refined {refined}  exact {exact}")
    lines += ["", "goals:"] + [f"  {'met ' if ok else 'MISSED'} {name}"
                               for name, ok in s["goals"].items()]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    kinds = [*TYPES, "overall"]
    width = 0.27
    for k, condition in enumerate(CONDITIONS):
        keys = [f"{kind}_{condition}" for kind in TYPES]
        keys.append({"image": "correction_rate", "mismatched": "control_correction_rate",
                     "zeroed": "zeroed_correction_rate"}[condition])
        values = [summary["per_type"][kind][condition] for kind in TYPES]
        values.append(summary[keys[-1]])
        lows = [v - summary["ci95"][key][0] for v, key in zip(values, keys, strict=True)]
        highs = [summary["ci95"][key][1] - v for v, key in zip(values, keys, strict=True)]
        ax.bar(np.arange(len(kinds)) + (k - 1) * width, values, width, yerr=[lows, highs],
               label=condition, capsize=3)
    ax.set_xticks(np.arange(len(kinds)), kinds)
    ax.set_ylabel("perturbed captions corrected")
    ax.set_ylim(0, 1)
    ax.set_title("MM-SeR refinement on the synthetic world (tiny model; 95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine_info() -> dict[str, Any]:
    import torch

    from benchmarks.captioner import cpu_model

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
