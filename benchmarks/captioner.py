"""Simple model vs MM-SeR: frames/s at the real architecture sizes, random weights.

    python -m benchmarks.captioner                       # CPU: batch 32, 60 tokens, 4 repeats
    python -m benchmarks.captioner --batch-sizes 1 4 --new-tokens 8     # a quick check
    python -m benchmarks.captioner --device cuda         # GPU, batches 64 128 256
    python -m benchmarks.captioner --drafts              # CPU, drafted refinement too

On a CPU the default run times what the product runs there (plain refinement; drafts are
the GPU default) and records the state one way each, so it fits 30 minutes on 2 cores.

Random weights cannot stop early: min_new_tokens == max_new_tokens fixes every caption's
length, so both captioners do the same decoding work per pass. Both use one model (CLIP
ViT-L/14-336 + OPT-125M + SeR-Connector); `simple` runs only the first pass. The ratio
`refine_overhead_ratio` is MM-SeR's time / the simple model's time at the largest batch
measured (one refinement pass). `flop_ratio` is the same ratio in operations executed on
one frame (benchmarks/flops.py): a floor for the time ratio wherever captioning is
compute-bound, and free of the load noise a shared machine puts on the timings.
No caption of a random model means anything: speed only.
Writes benchmarks/results/captioner.json (captioner_cuda.json with --device cuda).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessor

from benchmarks.flops import caption_flops
from benchmarks.machine import benchmark_dtype, machine
from captioner.configuration_mmser import real_config
from captioner.mmser import MMSeRCaptioner
from captioner.modeling_mmser import (
    MMSeRForConditionalGeneration,
    PassState,
    VisionFeatures,
    count_parameters,
)
from captioner.packed_linear import PackedDecodeLinear
from captioner.random_weights import gpt2_tokenizer
from captioner.settings import DEFAULT_DRAFT_TOKENS, CaptionerSettings

RESULTS = Path(__file__).resolve().parent / "results"


def build_captioners(
    device: torch.device, dtype: torch.dtype, new_tokens: int, compile_decode: bool = False
) -> tuple[dict[str, MMSeRCaptioner], dict[str, int]]:
    """The real-size model with random weights, wrapped as `simple`, `mmser` (the product's
    settings: the coarse caption is verified as a draft) and `mmser_plain` (draft_tokens 0:
    every refined token in its own LM call)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = gpt2_tokenizer(Path(tmp))
    config = real_config(image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = MMSeRForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    settings = CaptionerSettings(device=str(device))
    settings.generation.max_new_tokens = new_tokens
    settings.generation.min_new_tokens = new_tokens
    settings.mmser.refine_steps = 1
    settings.mmser.draft_tokens = DEFAULT_DRAFT_TOKENS  # the GPU default, on any device
    settings.simple.compile_decode = settings.mmser.compile_decode = compile_decode
    plain = copy.deepcopy(settings)
    plain.mmser.draft_tokens = 0
    captioners = {
        "simple": MMSeRCaptioner("simple", model, processor, tokenizer, settings),
        "mmser": MMSeRCaptioner("mmser", model, processor, tokenizer, settings),
        "mmser_plain": MMSeRCaptioner("mmser", model, processor, tokenizer, plain),
    }
    return captioners, count_parameters(model)


def abba(names: list[str], repeat: int) -> list[str]:
    """`names` in order on even repeats, reversed on odd ones (ABBA): a steady drift in the
    machine's speed favours none of them over two repeats."""
    return names if repeat % 2 == 0 else names[::-1]


def timed(
    captioner: MMSeRCaptioner, frames: np.ndarray, batch: int
) -> tuple[float, dict[str, float], dict[str, int]]:
    """Seconds to caption all frames in batches of `batch`, the summed stage timings and
    the batches' summed counters (draft tokens proposed and kept)."""
    stages: dict[str, float] = {}
    counters: dict[str, int] = {}
    start = time.perf_counter()
    for i in range(0, len(frames), batch):
        out = captioner.caption_batch(frames[i : i + batch])
        for k, v in out.timings.items():
            stages[k] = stages.get(k, 0.0) + v
        for k, v in out.counters.items():
            counters[k] = counters.get(k, 0) + v
    return time.perf_counter() - start, stages, counters


def perturbed(tokens: torch.Tensor, agreement: float, vocab: int, seed: int) -> torch.Tensor:
    """`tokens` (b, T) with each token replaced by a random one with p = 1 - agreement: a
    draft that a refinement keeps at rate `agreement` (localized substitutions)."""
    g = torch.Generator().manual_seed(seed)
    swap = torch.rand(tokens.shape, generator=g) >= agreement
    other = torch.randint(0, vocab, tokens.shape, generator=g)
    return torch.where(swap.to(tokens.device), other.to(tokens.device), tokens)


def agreement_sweep(
    mmser: MMSeRCaptioner, frames: np.ndarray, agreements: list[float]
) -> list[dict[str, float]]:
    """Refinement-pass seconds when the draft agrees with the refined caption at each rate.

    A random model's refinement rewrites its coarse caption, so the draft it really gets is
    useless; a trained MM-SeR (localized correction) keeps most of it. This times the same
    pass with the draft replaced by the plain greedy refined caption, perturbed at rate
    1 - agreement (the captions written stay the plain greedy ones; only the draft changes).
    """
    model = mmser.model
    pixels = mmser.processor(images=list(frames), return_tensors="pt")["pixel_values"]
    pixels = pixels.to(mmser.device, mmser.dtype)
    with torch.inference_mode():
        features = model.encode_images(pixels)
    ids = mmser.prompt_ids[None].expand(len(frames), -1)
    T, n_instr = mmser.generation.max_new_tokens, len(mmser.instruction_ids)
    vocab = model.config.text_config.vocab_size

    def refine_seconds(draft: torch.Tensor | None, max_draft: int) -> tuple[float, PassState]:
        state = model.caption_pass(
            ids, torch.ones_like(ids), features, mmser.generation, keep_state=True,
            cache_room=T, arena_room=model.cache_room(T, 1, n_instr, T),
        )
        if draft is not None:
            state.tokens = draft
        mmser._sync()
        start = time.perf_counter()
        out = model.refine_pass(
            state, features, mmser.instruction_ids, mmser.generation, keep_state=False,
            cache_room=2 * T, max_draft=max_draft,
        )
        mmser._sync()
        return time.perf_counter() - start, out

    plain_s, reference = refine_seconds(None, 0)
    rows = [{"agreement": None, "draft_tokens": 0, "refine_s": plain_s}]
    for k, agreement in enumerate(agreements):
        draft = perturbed(reference.tokens, agreement, vocab, seed=k)
        seconds, out = refine_seconds(draft, mmser.max_draft)
        if not torch.equal(out.tokens, reference.tokens):
            # Float rounding between a multi-token and a 1-token forward can flip a near
            # tie; say so rather than hide it.
            print(f"  note: agreement {agreement}: output differs from plain greedy")
        stats = out.draft_stats or {}
        rows.append({
            "agreement": agreement, "draft_tokens": mmser.max_draft,
            "refine_s": seconds, "lm_calls": stats.get("calls", 0),
            "kept": stats.get("accepted", 0) / max(1, stats.get("proposed", 0)),
            "same_output": bool(torch.equal(out.tokens, reference.tokens)),
        })
        print(f"  agreement {agreement}: refine {seconds:.2f} s (plain {plain_s:.2f} s)",
              flush=True)
    return rows


def recording_cost(
    mmser: MMSeRCaptioner, frames: np.ndarray, repeats: int
) -> dict[str, float | str]:
    """Seconds of MM-SeR's coarse pass when it records the next pass's state during decoding
    (hooks, then one step feeding the last token) or after it (one teacher-forced forward
    over the caption), interleaved `repeats` times (median); the cheaper is the default."""
    model = mmser.model
    # The features of two frames, repeated to the batch: the coarse pass does the same work
    # on any features (dense operations, fixed caption length), and the batch's vision pass
    # would cost more than the two coarse passes timed here on a CPU.
    pixels = mmser.processor(images=list(frames[:2]), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        features = model.encode_images(pixels.to(mmser.device, mmser.dtype))
    picks = torch.arange(len(frames), device=mmser.device) % 2
    features = VisionFeatures(features.image_embeds[picks], features.multi_layer[picks])
    ids = mmser.prompt_ids[None].expand(len(frames), -1)
    T, n_instr = mmser.generation.max_new_tokens, len(mmser.instruction_ids)
    seconds: dict[str, list[float]] = {"during": [], "after": []}
    for repeat in range(repeats):
        for mode in abba(list(seconds), repeat):
            mmser._sync()
            start = time.perf_counter()
            model.caption_pass(
                ids, torch.ones_like(ids), features, mmser.generation, keep_state=True,
                cache_room=T, arena_room=model.cache_room(T, 1, n_instr),
                record_after=mode == "after",
            )
            mmser._sync()
            seconds[mode].append(time.perf_counter() - start)
    during, after = (statistics.median(seconds[m]) for m in ("during", "after"))
    return {"record_during_s": during, "record_after_s": after,
            "cheaper": "during" if during <= after else "after"}


def median_run(runs: list[tuple[float, dict, dict]]) -> tuple[float, dict, dict]:
    """The run with the median total time (the lower middle for an even count), so its
    stage timings belong to the same run."""
    return sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: bfloat16 on a GPU or a CPU with native bf16, else float32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 32 on cpu (4 repeats fit 30 minutes), 64 128 256 on cuda")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per batch size (default: one batch)")
    parser.add_argument("--new-tokens", type=int, default=60, help="fixed caption length")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternate simple/mmser runs this many times (ABBA order) and "
                        "report medians (default: 4 on cpu, 3 on cuda)")
    parser.add_argument("--drafts", action=argparse.BooleanOptionalAction, default=None,
                        help="also time MM-SeR with drafted refinement and the agreement sweep "
                        "(default: on a GPU only; the product drafts only there)")
    parser.add_argument("--agreements", type=float, nargs="*", default=[1.0, 0.9, 0.75],
                        help="draft agreements to time the refinement pass at (largest batch)")
    parser.add_argument("--recording-repeats", type=int, default=None,
                        help="interleaved during/after recording measurements (default: 1 on "
                        "cpu, where one takes ~4 min, --repeats on cuda; 0 skips it)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="compiled decode steps (captioner.*.compile_decode; for GPUs)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    args.dtype, dtype_reason = benchmark_dtype(args.dtype, args.device)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"dtype {args.dtype} ({dtype_reason})", flush=True)
    cuda = device.type == "cuda"
    if args.repeats is None:
        args.repeats = 3 if cuda else 4
    batch_sizes = args.batch_sizes or ([64, 128, 256] if cuda else [32])
    out_path = args.out or RESULTS / ("captioner_cuda.json" if cuda else "captioner.json")
    # On a CPU (2 cores: ~3 min a batch of 32 per captioner) the default run times what the
    # product runs there, so 4 repeats fit 30 minutes: no drafts, one recording pair.
    drafts = cuda if args.drafts is None else args.drafts
    recording_repeats = args.recording_repeats
    if recording_repeats is None:
        recording_repeats = args.repeats if cuda else 1
    captioners, params = build_captioners(device, dtype, args.new_tokens, args.compile_decode)
    mmser = captioners["mmser"]
    if not drafts:
        del captioners["mmser"]
    packed = any(isinstance(m, PackedDecodeLinear) for m in mmser.model.modules())
    rng = np.random.default_rng(0)
    # Warm-up (allocator, kernels) on a small batch, not measured.
    warm = rng.integers(0, 256, (2, 336, 336, 3), dtype=np.uint8)
    for captioner in captioners.values():
        captioner.caption_batch(warm)
    # Operations each captioner executes on one frame: where captioning is compute-bound
    # (this CPU), MM-SeR's time over the simple model's cannot fall below their ratio.
    one = rng.integers(0, 256, (1, 336, 336, 3), dtype=np.uint8)
    flops = {name: caption_flops(captioner, one) for name, captioner in captioners.items()}
    counted = ", ".join(f"{name} {f['per_frame'] / 1e9:.1f}" for name, f in flops.items())
    print(f"GFLOPs per frame: {counted}", flush=True)
    refine_flops = flops["mmser_plain"]["per_frame"] - flops["simple"]["per_frame"]

    rows = []
    for batch in batch_sizes:
        n = args.frames or batch
        frames = rng.integers(0, 256, (n, 336, 336, 3), dtype=np.uint8)
        # Interleaved runs in ABBA order, each captioner's median: load from other jobs
        # hits all alike.
        runs: dict[str, list[tuple[float, dict, dict]]] = {name: [] for name in captioners}
        for repeat in range(args.repeats):
            for name in abba(list(captioners), repeat):
                runs[name].append(timed(captioners[name], frames, batch))
                print(f"  repeat {repeat + 1}/{args.repeats} {name}: "
                      f"{runs[name][-1][0]:.1f} s", flush=True)
        best = {name: median_run(name_runs) for name, name_runs in runs.items()}
        secs = {name: run[0] for name, run in best.items()}
        refine_s = best["mmser_plain"][1].get("refine", 0.0)
        # Each repeat's MM-SeR run over the simple model's run just before it: drift in the
        # machine's load between repeats cancels within a pair.
        pairs = list(zip(runs["simple"], runs["mmser_plain"], strict=True))
        row = {
            "batch_size": batch,
            "frames": n,
            "simple_fps": n / secs["simple"],
            "mmser_plain_fps": n / secs["mmser_plain"],
            "simple_s": secs["simple"],
            "mmser_plain_s": secs["mmser_plain"],
            # MM-SeR's first pass (vision + coarse caption) over the simple model's
            # identical pass: what the refinement machinery costs before it refines.
            "coarse_pass_ratio": (secs["mmser_plain"] - refine_s) / secs["simple"],
            "ratio_plain": secs["mmser_plain"] / secs["simple"],
            "repeat_s": {name: [run[0] for run in name_runs] for name, name_runs in runs.items()},
            "ratio_plain_pairs": [plain[0] / simple[0] for simple, plain in pairs],
            "coarse_pass_ratio_pairs": [
                (plain[0] - plain[1].get("refine", 0.0)) / simple[0] for simple, plain in pairs],
            # Operations per second: the simple model's whole pass, and plain MM-SeR's
            # refinement stage (its extra operations over its refine seconds).
            "simple_gflop_per_s": n * flops["simple"]["per_frame"] / secs["simple"] / 1e9,
            "refine_gflop_per_s": n * refine_flops / refine_s / 1e9,
            "simple_stages_s": best["simple"][1],
            "mmser_plain_stages_s": best["mmser_plain"][1],
        }
        for key in ("ratio_plain", "coarse_pass_ratio"):
            row[f"{key}_paired"] = statistics.median(row[f"{key}_pairs"])
        if drafts:
            counters = best["mmser"][2]
            row.update({
                "mmser_fps": n / secs["mmser"],
                "mmser_s": secs["mmser"],
                "ratio": secs["mmser"] / secs["simple"],
                # How much of its own coarse caption this random model's refinement kept.
                "draft_kept": counters.get("draft_accepted", 0)
                / max(1, counters.get("draft_proposed", 0)),
                "mmser_stages_s": best["mmser"][1],
            })
        rows.append(row)
        drafted = f", drafted {n / secs['mmser']:.2f}" if drafts else ""
        print(f"batch {batch}: simple {n / secs['simple']:.2f} fps, mmser plain "
              f"{n / secs['mmser_plain']:.2f} fps{drafted}", flush=True)

    # What a draft the refinement keeps would save: the largest batch, same frames.
    top = rows[-1]
    # The headline first, in case a cap on the run's time stops the extras below.
    drafted = f" (drafted {top['ratio']:.3f})" if drafts else ""
    print(f"batch {top['batch_size']}: coarse_pass_ratio {top['coarse_pass_ratio']:.3f}, "
          f"refine_overhead_ratio {top['ratio_plain']:.3f}{drafted}; "
          f"stages {top['mmser_plain_stages_s']}", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"partial": True, "machine": machine(device), "rows": rows},
                                   indent=2))
    recording = (recording_cost(captioners["mmser_plain"], frames, recording_repeats)
                 if recording_repeats > 0 else None)
    sweep = agreement_sweep(mmser, frames, args.agreements) if drafts and args.agreements else []
    first_pass_s = top["mmser_plain_s"] - top["mmser_plain_stages_s"].get("refine", 0.0)
    for row in sweep:
        # MM-SeR's time with this refinement pass, over the simple model's, same run.
        row["ratio_to_simple"] = (first_pass_s + row["refine_s"]) / top["simple_s"]

    result = {
        "machine": machine(device),
        "dtype": args.dtype,
        "dtype_reason": dtype_reason,
        "new_tokens": args.new_tokens,
        "refine_steps": 1,
        "repeats": args.repeats,
        "reuse_cache": mmser.settings.mmser.reuse_cache,
        "draft_tokens": mmser.max_draft if drafts else None,
        "compile_decode": args.compile_decode,
        # Decode steps' linears on prepacked oneDNN weights (captioner.packed_linears).
        "packed_linears": packed,
        "parameters": params,
        # Counted on one frame (benchmarks/flops.py): total, connector, lm_head, attention.
        "flops_per_frame": flops,
        # The floor for the time ratio where captioning is compute-bound: no draft or cache
        # trick removes operations (a draft's rejected tokens add some).
        "flop_ratio": flops["mmser_plain"]["total"] / flops["simple"]["total"],
        "rows": rows,
        # The headline: the largest batch, refinement WITHOUT draft help. A random model's
        # refinement repeats its coarse caption (draft_kept), which no trained model does;
        # the drafted ratio is in rows[-1]["ratio"] and the sweep below says what it costs
        # at a given agreement.
        "refine_overhead_ratio": top["ratio_plain"],
        "coarse_pass_ratio": top["coarse_pass_ratio"],
        # The same two as the median over repeats of each repeat's pair (see rows).
        "refine_overhead_ratio_paired": top["ratio_plain_paired"],
        "coarse_pass_ratio_paired": top["coarse_pass_ratio_paired"],
        "refine_overhead_ratio_drafted": top.get("ratio"),
        # The refinement pass at the largest batch when its draft agrees with the refined
        # caption at each rate (agreement null: plain greedy); see agreement_sweep().
        "agreement_sweep": sweep,
        # MM-SeR's coarse pass at the largest batch, recording during vs after decoding
        # (`recording_repeats` interleaved pairs, medians; null when skipped).
        "recording": recording,
        "recording_repeats": recording_repeats,
        "note": "random weights, speed only; CPU figures depend on other load on the machine",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))

    print(
        f"\n{result['machine']['cpu']} ({result['machine']['cores']} cores), "
        f"{device}, {args.dtype}, {args.new_tokens} new tokens, torch {torch.__version__}"
    )
    print(
        f"{'batch':>6} {'simple f/s':>11} {'mmser f/s':>10} {'ratio':>7} {'kept':>5} "
        f"{'plain f/s':>10} {'ratio':>7} {'vision s':>9} {'coarse s':>9} {'refine s':>9} "
        f"{'GFLOP/s':>13}"
    )
    for r in rows:
        st = r["mmser_plain_stages_s"]
        drafted = (f"{r['mmser_fps']:>10.3f} {r['ratio']:>7.3f} {r['draft_kept']:>5.2f}"
                   if drafts else f"{'-':>10} {'-':>7} {'-':>5}")
        print(
            f"{r['batch_size']:>6} {r['simple_fps']:>11.3f} {drafted} "
            f"{r['mmser_plain_fps']:>10.3f} "
            f"{r['ratio_plain']:>7.3f} {st.get('vision', 0):>9.2f} {st.get('coarse', 0):>9.2f} "
            f"{st.get('refine', 0):>9.2f} "
            f"{r['simple_gflop_per_s']:>6.0f} /{r['refine_gflop_per_s']:>5.0f}"
        )
    print("(mmser: drafts from the coarse caption, `kept` of them kept, timed with --drafts; "
          "plain: draft_tokens 0;"
          " stage seconds are plain MM-SeR's; GFLOP/s: the simple model / plain refinement)")
    if sweep:
        print(
            f"\nrefinement pass at batch {top['batch_size']} by draft agreement "
            "(draft = the plain refined caption with 1 - agreement of its tokens swapped)"
        )
        print(f"{'agreement':>9} {'refine s':>9} {'LM calls':>9} {'kept':>6} {'MM-SeR/simple':>14}")
        for row in sweep:
            label = "plain" if row["agreement"] is None else f"{row['agreement']:.2f}"
            calls = row.get("lm_calls", mmser.generation.max_new_tokens - 1)
            kept = f"{row['kept']:.2f}" if "kept" in row else "-"
            print(
                f"{label:>9} {row['refine_s']:>9.2f} {calls:>9} {kept:>6} "
                f"{row['ratio_to_simple']:>14.3f}"
            )
    f = {name: v["per_frame"] / 1e9 for name, v in flops.items()}
    print(
        f"\nGFLOPs per frame: simple {f['simple']:.1f}, MM-SeR {f['mmser_plain']:.1f} (connector "
        f"{flops['mmser_plain']['connector'] / 1e9:.1f}); flop_ratio {result['flop_ratio']:.3f}"
        " = the time ratio's floor where captioning is compute-bound"
    )
    if recording:
        print(
            f"recording the state: during decoding {recording['record_during_s']:.2f} s, after "
            f"it {recording['record_after_s']:.2f} s (coarse pass, batch {top['batch_size']}): "
            f"{recording['cheaper']} is cheaper"
        )
    drafted = f", drafted = {top['ratio']:.3f}" if drafts else ""

    def spread(key: str) -> str:
        """The range of a ratio over the repeats' pairs."""
        return f"[{min(top[key]):.3f}, {max(top[key]):.3f}]"

    print(
        f"coarse_pass_ratio = {result['coarse_pass_ratio']:.3f} (MM-SeR's first pass / the "
        f"simple model's), refine_overhead_ratio (plain) = {result['refine_overhead_ratio']:.3f}"
        f"{drafted}; medians of per-repeat pairs: {top['coarse_pass_ratio_paired']:.3f} "
        f"{spread('coarse_pass_ratio_pairs')} and {top['ratio_plain_paired']:.3f} "
        f"{spread('ratio_plain_pairs')} -> {out_path}"
    )


if __name__ == "__main__":
    main()
