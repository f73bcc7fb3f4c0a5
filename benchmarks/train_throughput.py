"""Training throughput of the three MM-SeR stages at real size (random weights).

    python -m benchmarks.train_throughput --device cuda     # real sizes, bf16 (a GPU run)
    python -m benchmarks.train_throughput --preset tiny     # the plumbing, on a CPU

CLIP ViT-L/14-336 + OPT-125M (+ the ~52M SeR-Connector) with random weights: what a step
costs depends on the architecture and sequence lengths, not on the weights. Each stage
trains what `mmser train` trains in it (align: projector; caption: projector + OPT;
refine: SeR-Connector + OPT, with the caption loss on the same batch) through the same
`MMSeRTrainer` and collators, on synthetic 336 px images with captions of
`--caption-tokens` tokens. After `--warmup` steps, `--steps` steps are timed (CUDA
synchronised at each step's end): samples/s, tokens/s (prompt + caption tokens the LM
reads per sample, and for refine also the second pass), and peak memory.

Writes train_throughput.json to `--out` (default benchmarks/results); the table last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import CLIPImageProcessor, TrainingArguments

from benchmarks.machine import StepTimer
from captioner.configuration_mmser import real_config
from captioner.modeling_mmser import MMSeRForConditionalGeneration
from captioner.random_weights import TinySizes, build_tiny_checkpoint, opt_style_tokenizer
from captioner.sequence import build_layout
from captioner.settings import CaptionerSettings
from captioner.train_settings import DEFAULT_TRAINABLE
from captioner.training import CaptionCollator, MMSeRTrainer, RefineCollator, set_trainable

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("a man woman dog red blue small large table cup holding next to on under the "
         "wooden glass standing sitting near two three bright dark room street").split()


class _Synthetic(Dataset):
    """Random images and word-salad captions of a fixed length (speed only)."""

    def __init__(self, n: int, size: int, processor: Any, words: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        self.captions = [" ".join(rng.choice(WORDS, words)) for _ in range(n)]
        self.coarse = [" ".join(rng.choice(WORDS, words)) for _ in range(n)]
        self.processor = processor

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        pixels = self.processor(images=self.images[i], return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "caption": self.captions[i], "coarse": self.coarse[i]}


def build_model(preset: str, device: torch.device, dtype: torch.dtype, tmp: Path):
    """(model, processor, tokenizer, image size) at `preset` size, random weights."""
    if preset == "tiny":
        from captioner.mmser import build

        folder = build_tiny_checkpoint(tmp / "tiny", sizes=TinySizes(init_std=0.02,
                                                                     eos_scale=1.0))
        captioner = build(CaptionerSettings(device="cpu"), "mmser", checkpoint=folder)
        return captioner.model.to(device), captioner.processor, captioner.tokenizer, 32
    tokenizer = opt_style_tokenizer(tmp / "tok", None)
    config = real_config(image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = MMSeRForConditionalGeneration(config).to(device)
    model.set_attn_implementation("sdpa")
    processor = CLIPImageProcessor(size={"shortest_edge": 336},
                                   crop_size={"height": 336, "width": 336})
    return model, processor, tokenizer, 336


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    precision = "bf16" if gpu else "fp32"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, processor, tokenizer, size = build_model(args.preset, device, torch.float32,
                                                        Path(tmp))
        settings = CaptionerSettings()
        model.config.caption_prompt = settings.generation.prompt
        model.config.refine_prompt = settings.mmser.refine_prompt
        layout = build_layout(tokenizer, model.config.image_token_index,
                              model.config.image_seq_length, settings.generation.prompt,
                              settings.mmser.refine_prompt)
        words = max(1, int(args.caption_tokens * 0.75))  # ~1.3 BPE tokens per word
        data = _Synthetic(args.batch_size * (args.steps + args.warmup), size, processor, words)
        for stage in ("align", "caption", "refine"):
            trainable = set_trainable(model, DEFAULT_TRAINABLE[stage])
            collator = (RefineCollator if stage == "refine" else CaptionCollator)(
                tokenizer, layout, args.caption_tokens)
            timer = StepTimer(args.warmup, device)
            trainer = MMSeRTrainer(
                model=model,
                args=TrainingArguments(
                    output_dir=str(Path(tmp) / stage), per_device_train_batch_size=args.batch_size,
                    max_steps=args.warmup + args.steps, learning_rate=1e-5, bf16=gpu,
                    save_strategy="no", report_to="none", use_cpu=not gpu,
                    remove_unused_columns=False, dataloader_num_workers=args.workers,
                    logging_steps=10_000, disable_tqdm=True,
                ),
                train_dataset=data, data_collator=collator, callbacks=[timer],
            )
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            model.train()
            trainer.train()
            step = float(np.median(timer.times))
            batch = collator([data[i] for i in range(args.batch_size)])
            prompt = batch["input_ids"].shape[1]
            caption = int(batch["caption_ids"].shape[1])
            tokens = prompt + caption  # the caption loss's sequence
            if stage == "refine":  # the coarse read, then the whole refinement sequence
                tokens += prompt + caption + (prompt + 2 * caption
                                              + model.config.num_refine_tokens
                                              + batch["instruction_ids"].shape[1])
            results[stage] = {
                "step_s": step,
                "samples_per_s": args.batch_size / step,
                "lm_tokens_per_s": args.batch_size * tokens / step,
                "trainable_params": int(sum(trainable.values())),
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu
                else None,
            }
    return {"preset": args.preset, "device": str(device), "precision": precision,
            "batch_size": args.batch_size, "caption_tokens": args.caption_tokens,
            "steps_timed": args.steps,
            "gpu": torch.cuda.get_device_name(device) if gpu else None, "stages": results}


def table(result: dict[str, Any]) -> str:
    lines = [f"training throughput, {result['preset']} size, {result['device']} "
             f"({result['gpu'] or 'cpu'}), {result['precision']}, batch {result['batch_size']}, "
             f"captions {result['caption_tokens']} tokens; random weights (speed only)",
             f"{'stage':<8}{'step s':>9}{'samples/s':>11}{'LM tokens/s':>13}"
             f"{'trainable':>12}{'peak GiB':>10}"]
    for stage, row in result["stages"].items():
        peak = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
        lines.append(f"{stage:<8}{row['step_s']:>9.3f}{row['samples_per_s']:>11.1f}"
                     f"{row['lm_tokens_per_s']:>13.0f}{row['trainable_params'] / 1e6:>11.1f}M"
                     f"{peak:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=("real", "tiny"), default="real")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--caption-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = parser.parse_args(argv)
    result = measure(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
