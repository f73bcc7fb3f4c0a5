"""bench-learn's statistics and report: per-image outcomes, paired bootstrap intervals over
images and seeds, the goals, the table and the plot."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

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


