"""bench-captioners' outputs: the table printed last, the plot, and small formatters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# The goal on one H100: the paper's time / 2.5, and MM-SeR / simple <= 1.05.
GOAL_SPEEDUP = 2.5
GOAL_MMSER_RATIO = 1.05


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels: projected EgoSchema-500 minutes, and time ratios to the simple model
    next to the paper's."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rows = result["captioners"]
    names = list(rows)
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(x - 0.2, [rows[n]["egoschema500_s"] / 60 for n in names], 0.4, label="measured")
    left.bar(x + 0.2, [rows[n]["paper_s"] / 60 for n in names], 0.4, label="paper")
    left.set_yscale("log")
    left.set_ylabel("minutes, EgoSchema 500 at 1 fps (projected)")
    ratios = result["ratios_to_simple"]
    right.bar(x - 0.2, [ratios[n] or 0 for n in names], 0.4, label="measured")
    right.bar(x + 0.2, [rows[n]["paper_ratio_to_simple"] for n in names], 0.4, label="paper")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_ylabel("time / simple model's")
    for axis in (left, right):
        axis.set_xticks(x, names)
        axis.legend()
    m = result["machine"]
    fig.suptitle(f"{m.get('gpu') or m['cpu']} | {result['options']['dtype']} | "
                 f"preset {result['options']['preset']} | {result['note'].split(';')[0]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    """The results as a plain-text table, machine, sizes and timing method first."""
    m, o, s = result["machine"], result["options"], result["sizes"]
    rows, load = result["captioners"], result["load_average"]
    turns = {r["turns"] for r in rows.values()}
    cpu_ratios = result["ratios_to_simple_cpu_time"]
    lines = [
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), GPU "
        f"{m.get('gpu') or 'none'}, device {m['device']}, torch {m['torch']}, "
        f"transformers {m['transformers']}",
        f"{o['dtype']}, preset {o['preset']} (depth / {s['depth_div']}), {o['frames']} frames "
        f"{o['frame_size'][0]}x{o['frame_size'][1]}, {o['new_tokens']} new tokens "
        f"(min = max), batch {o['batch_size']} "
        f"(llava15 {min(o['batch_size'], o['llava_batch_size'])})",
        f"layers: CLIP {s['clip']['layers']}, OPT {s['opt']['layers']}, SeR-Connector "
        f"{s['ser_connector']['layers']}, Llama {s['llama']['layers']}, Swin "
        f"{s['tag2text']['swin_depths']}, BERT {s['tag2text']['bert_layers']}, tag head "
        f"{s['tag2text']['tag_head_layers']}",
        f"timing: {o['repeats']} interleaved rounds, {'/'.join(map(str, sorted(turns)))} turns "
        f"per captioner, median turn; load average (1/5/15 min) {fmt_load(load['at_start'])} "
        f"at start, {fmt_load(load['before_timing'])} before timing, "
        f"{fmt_load(load['after_timing'])} after",
        "",
        f"{'captioner':<9} {'params':>8} {'real':>7} {'beams':>5} {'med s':>7} {'min s':>7} "
        f"{'spread':>6} {'frames/s':>9} {'s/video':>8} {'ES-500':>9} {'peak GB':>8} "
        f"{'ratio':>6} {'r min':>6}" + (f" {'r cpu':>6}" if cpu_ratios else "")
        + f" {'paper':>6} {'paper t':>8}" + (f" {'goal':>8}" if result["goals_met"] else ""),
    ]
    for name, r in rows.items():
        line = (
            f"{name:<9} {r['params_benchmarked'] / 1e6:>7.1f}M {r['params_real'] / 1e9:>6.2f}B "
            f"{r['num_beams']:>5} {r['median_step_s']:>7.2f} {r['min_step_s']:>7.2f} "
            f"{r['spread']:>6.2f} {r['frames_per_s']:>9.3f} {r['s_per_video']:>8.1f} "
            f"{minutes(r['egoschema500_s']):>9} {r['peak_memory_bytes'] / 2**30:>8.2f} "
            f"{fmt_ratio(r['ratio_to_simple']):>6} "
            f"{fmt_ratio(result['ratios_to_simple_min'][name]):>6}"
        )
        if cpu_ratios:
            line += f" {fmt_ratio(cpu_ratios[name]):>6}"
        line += f" {r['paper_ratio_to_simple']:>6.3f} {minutes(r['paper_s']):>8}"
        if result["goals_met"]:
            ok = result["goals_met"][name]
            line += f" {minutes(r['goal_s']):>7}{'+' if ok else '-'}"
        lines.append(line)
    lines.append("med s / min s: median / fastest wall seconds of one turn (the same frames "
                 "for all); spread: slowest turn / fastest; frames/s from the median")
    lines.append("ES-500: projected captioning time for EgoSchema's 500-video subset at 1 fps "
                 "(90000 frames); ratio: median time / the simple model's (r min: fastest "
                 "turns'" + ("; r cpu: this process's CPU seconds'" if cpu_ratios else "")
                 + "); paper: 29m20s, 7m14s, 4m53s, 5m10s")
    if result["goals_met"]:
        lines.append(f"goal (paper / {GOAL_SPEEDUP}; + met, - missed); MM-SeR / simple <= "
                     f"{GOAL_MMSER_RATIO}: {result['goals_met'].get('mmser_over_simple')}")
    return "\n".join(lines)


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}"


def fmt_load(load: list[float] | None) -> str:
    return "?" if load is None else "/".join(f"{x:.2f}" for x in load)


def minutes(seconds: float) -> str:
    """29m20s; 6h08m from an hour up."""
    whole = round(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"


