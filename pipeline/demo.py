"""`mmser demo` (`make demo`): the bundled synthetic dataset, its trained tiny captioner and a
tiny random reader, through the whole pipeline; one question shown end to end."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

from pipeline.config import Config, load_config

log = logging.getLogger("mmser")



def _free_port() -> int:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# What `make demo` changes from config.yaml: tiny local models instead of the real ones,
# and vLLM-on-CPU flags (docs/ARCHITECTURE.md, machine facts). Shown before the run.
def demo_overrides(models_dir: Path, captioner: Path) -> list[str]:
    return [
        "captioner.name=mmser",
        f"captioner.mmser.checkpoint={captioner}",
        "captioner.batch_size=16",
        "captioner.generation.max_new_tokens=16",
        f"reader.model={models_dir / 'reader-tiny'}",
        "reader.served_name=tiny-reader",
        "reader.mode=managed",
        f"reader.port={_free_port()}",
        "reader.max_model_len=4096",
        "reader.extra_args=[--enforce-eager]",
        "reader.env={VLLM_CPU_KVCACHE_SPACE: '1'}",
        "reader.health_timeout_s=600",
        "reader.max_tokens=64",
        "reader.reserve_tokens=128",
    ]


def _show_one_question(config: Config, folder: Path) -> None:
    """Print one question the way it flowed: captions (from the cache) -> answer."""
    from captioner.base import captioner_identity
    from pipeline.cache import CaptionCache, sampling_identity
    from qa.transcript import caption_line

    lines = (folder / "predictions.jsonl").read_text().splitlines()
    if not lines:
        return
    answer = json.loads(lines[0])
    cache = CaptionCache(config.cache.dir, fingerprint_mode=config.cache.fingerprint)
    video = Path(config.datasets["demo"].root) / "videos" / f"{answer['video_id']}.mp4"
    # The record by its key, as the run found it (no scan of a possibly large cache).
    record = cache.get(cache.key_for(video, sampling_identity(config.sampling),
                                     captioner_identity(config.captioner)))
    print(f"\none question, end to end ({answer['q_uid']}):")
    if record:
        for caption in record.captions[:3]:
            if caption.coarse_caption is not None and caption.coarse_caption != caption.caption:
                print(f"  coarse   {caption.timestamp:.0f}: {caption.coarse_caption[:84]}")
            print(f"  caption  {caption_line(caption)[:90]}")
        print(f"  ... {len(record.captions)} captions in all")
    probs = answer.get("option_probs") or []
    print(f"  answer   {answer['letter']} (option probabilities "
          f"{', '.join(f'{p:.2f}' for p in probs)}; correct: "
          f"{'ABCDE'[answer['answer']] if answer['answer'] is not None else 'unknown'})")


def run_demo(config_path: str | None, overrides: list[str]) -> int:
    """Generate the demo dataset, train its captioner and build a tiny reader once, then
    run videoqa on them."""
    from pipeline.demo_data import generate_demo_dataset, train_demo_captioner
    from pipeline.run import run_videoqa
    from qa.tiny import build_tiny_reader

    base = load_config(config_path, overrides)
    root = Path(base.datasets["demo"].root) if "demo" in base.datasets else Path("data/demo")
    t0 = time.perf_counter()
    generate_demo_dataset(root)
    models = root / "models"
    if not (root / "captioner" / "refine" / "model" / "config.json").exists():
        print("training the demo captioner on the demo world (once, a few minutes) ...")
    captioner = train_demo_captioner(root, config_path)
    if not (models / "reader-tiny" / "config.json").exists():
        build_tiny_reader(models / "reader-tiny")
    print(f"demo dataset, captioner and reader ready in {root} "
          f"({time.perf_counter() - t0:.1f} s)")
    demo_settings = demo_overrides(models, captioner)
    print("demo settings (on top of config.yaml):\n  " + "\n  ".join(demo_settings))
    print(
        "NOTE: the demo's captioner is a tiny MM-SeR trained here by `mmser train` on the\n"
        "      demo's synthetic world: its captions describe the frames of this world only.\n"
        "      The reader is a tiny model with RANDOM weights: its answers are at chance\n"
        "      level (20%). The demo shows the pipeline working, not the product's quality."
    )
    config = load_config(config_path, demo_settings + list(overrides))
    folder = run_videoqa(config, "demo", "mmser", new=False)
    _show_one_question(config, folder)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; outputs in {folder}")
    print("(random-weights reader: the accuracy above is chance level, not a quality figure)")
    return 0


