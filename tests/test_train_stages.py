"""`mmser train`: every stage runs a few steps on tiny models built here and lowers the
loss; a trained checkpoint loads as a captioner and captions; a killed run resumes; the
Ray Train path runs with 2 CPU workers (gloo). The world is the synthetic one, at toy size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from captioner.mmser import build
from captioner.random_weights import TinySizes, build_tiny_components
from captioner.settings import CaptionerSettings
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import CaptionerError, ConfigError
from pipeline.train import run_training
from pipeline.world import LEARN_WORLD, write_world

SIZES = TinySizes(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2,
                  vision_heads=1, text_hidden=32, text_layers=2, text_heads=1,
                  connector_hidden=32, connector_layers=1, connector_heads=1, refine_tokens=4,
                  num_merges=2000, init_std=0.02, eos_scale=1.0)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    root = write_world(base / "world", LEARN_WORLD, {"train": 64, "val": 16, "test": 8})
    vision, text = build_tiny_components(base / "components", SIZES, seed=0)
    return base, root, vision, text


def overrides(world, out: Path, **extra: object) -> list[str]:
    base, root, vision, text = world
    values = {
        "train.vision_model": vision, "train.language_model": text, "train.output_dir": out,
        "train.data.train": f"[{{format: llava, path: {root}/train.json}}]",
        "train.data.eval": f"[{{format: llava, path: {root}/val.json}}]",
        "train.max_steps": 12, "train.eval_steps": 6, "train.save_steps": 6,
        "train.batch_size": 8, "train.learning_rate": 0.003, "train.logging_steps": 2,
        "train.dataloader_workers": 0, "train.perturb.word_lists": f"{root}/word_lists.json",
        "train.perturb.max_length_change": 0.3, "train.pairs.own_max": 16,
        "train.max_caption_tokens": 20, "captioner.generation.max_new_tokens": 20,
        "train.connector": "{connector_hidden_size: 32, connector_num_layers: 1, "
                           "connector_num_heads: 1, num_refine_tokens: 4}",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def losses(stage_dir: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def trained(world):
    out = world[0] / "run"
    results = {}
    for stage in ("align", "caption", "refine"):
        results[stage] = run_training(load_config(None, overrides(world, out)), stage)
    return out, results


def test_each_stage_lowers_its_loss(trained):
    out, results = trained
    for stage in ("align", "caption", "refine"):
        folder = out / stage
        train, evaluation = losses(folder), losses(folder, "eval_loss")
        assert train[-1] < train[0], (stage, train)
        assert evaluation and evaluation[-1] < evaluation[0], (stage, evaluation)
        assert (folder / "loss.png").stat().st_size > 0
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["steps"] == 12 and summary["stage"] == stage
    assert set(results["align"].trainable) == {"projector"}
    assert set(results["caption"].trainable) == {"projector", "language_model"}
    assert set(results["refine"].trainable) == {"connector", "language_model"}
    refine = losses(out / "refine", "refine_loss")
    assert refine[-1] < refine[0] and losses(out / "refine", "caption_loss")
    # The pairs mix what train.pairs asks for (own captions exist for 16 images only).
    assert set(results["refine"].pair_kinds) == {"identity", "own", "perturbed"}


def test_trained_checkpoints_load_as_captioners(trained, world):
    out, _ = trained
    settings = CaptionerSettings(device="cpu", dtype="float32")
    settings.generation.max_new_tokens = 12
    frames = [np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB"))
              for p in sorted((world[1] / "images" / "test").glob("*.png"))[:3]]
    simple = build(settings, "simple", checkpoint=out / "caption" / "model")
    mmser = build(settings, "mmser", checkpoint=out / "refine" / "model")
    assert mmser.prompt == settings.generation.prompt  # the prompt the checkpoint recorded
    assert mmser.model.config.refine_prompt == settings.mmser.refine_prompt
    assert len(simple.caption_batch(frames).results) == 3
    results = mmser.caption_batch(frames).results
    assert all(r.coarse_caption is not None and r.refine_passes == 1 for r in results)


def test_caption_command_prints_coarse_and_refined(trained, world, capsys):
    out, _ = trained
    image = sorted((world[1] / "images" / "test").glob("*.png"))[0]
    missing = world[0] / "missing.png"
    code = main(["caption", str(image), str(missing), "--checkpoint", str(out / "refine/model"),
                 "--set", "captioner.generation.max_new_tokens=8", "--set",
                 "captioner.device=cpu"])
    text = capsys.readouterr().out
    assert code == 0
    assert f"{image}\n  coarse:  " in text and "  refined: " in text
    assert f"{missing}: FAILED" in text


def test_stage_without_its_start_checkpoint_says_so(world, tmp_path):
    config = load_config(None, overrides(world, tmp_path / "empty"))
    with pytest.raises(CaptionerError, match=r"no checkpoint at .*caption/model.*--stage caption"):
        run_training(config, "refine")
    with pytest.raises(ConfigError, match="train.trainable"):
        load_config(None, overrides(world, tmp_path, **{"train.trainable": "[wheels]"}))
    with pytest.raises(ConfigError, match="save_steps"):
        load_config(None, overrides(world, tmp_path, **{"train.save_steps": 5}))


def test_killed_run_resumes_from_its_last_checkpoint(world, trained, tmp_path):
    """SIGKILL mid-run, then the same command: it continues from the newest checkpoint."""
    out = tmp_path / "resume"
    args = [sys.executable, "-m", "pipeline", "train", "--stage", "caption"]
    for item in overrides(world, out, **{
        "train.init_from": trained[0] / "align" / "model", "train.max_steps": 400,
        "train.save_steps": 4, "train.eval_steps": 4, "train.batch_size": 4,
    }):
        args += ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    stage = out / "caption"

    def saved_steps() -> list[int]:
        states = stage.glob("checkpoint-*/trainer_state.json")
        return [int(p.parent.name.split("-")[1]) for p in states]

    # Any checkpoint from step 8 on: with save_total_limit a given one may already be rotated
    # out between two looks on a fast machine.
    while not any(step >= 8 for step in saved_steps()):
        assert first.poll() is None and time.monotonic() < deadline, "no checkpoint >= 8 appeared"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    kept = sorted(int(p.name.split("-")[1]) for p in stage.glob("checkpoint-*")
                  if (p / "trainer_state.json").exists() and (p / "model.safetensors").exists())
    assert kept and max(kept) < 400
    args[args.index("train.max_steps=400")] = f"train.max_steps={max(kept) + 4}"
    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {stage}/checkpoint-{max(kept)}" in second.stdout
    state = json.loads((stage / f"checkpoint-{max(kept) + 4}" / "trainer_state.json").read_text())
    steps = [r["step"] for r in state["log_history"] if "loss" in r]
    assert steps[0] < max(kept) < steps[-1]  # one history: before the kill, then after


def test_ray_train_with_two_cpu_workers(world, trained, tmp_path):
    """The same Trainer inside Ray Train's TorchTrainer, 2 CPU processes over gloo."""
    out = tmp_path / "ray"
    config = load_config(None, overrides(world, out, **{
        "train.init_from": trained[0] / "align" / "model", "train.num_workers": 2,
        "train.max_steps": 6, "train.eval_steps": 3, "train.save_steps": 3,
        "ray.num_cpus": 2,
    }))
    result = run_training(config, "caption")
    assert result.processes == 2 and result.steps == 6
    train = losses(out / "caption")
    assert train[-1] < train[0]
    settings = CaptionerSettings(device="cpu", dtype="float32")
    settings.generation.max_new_tokens = 6
    captioner = build(settings, "simple", checkpoint=result.model_dir)
    assert captioner.caption_batch([np.zeros((32, 32, 3), np.uint8)]).results[0].caption
    # Ray kept the reported checkpoints in its storage.
    assert list((out / "caption" / "ray").rglob("checkpoint_*"))


def test_perturb_command_writes_pairs_training_reads(world, tmp_path, capsys):
    """`mmser perturb` (rules) over train.data.train, then train.pairs.perturbations."""
    from captioner.training import read_perturbations

    out = tmp_path / "perturbed.jsonl"
    args = ["perturb", str(out), "--limit", "20"]
    for item in overrides(world, tmp_path / "unused"):
        args += ["--set", item]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "20 written" in text and "train.pairs.perturbations=" in text
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 20 and all(r["perturbed"] != r["caption"] for r in records)
    pairs = read_perturbations(out)
    assert sum(len(v) for v in pairs.values()) == 20
    assert main(args) == 0  # resumed: nothing left to do
    assert "20 done before, 0 written" in capsys.readouterr().out


def test_training_throughput_benchmark_runs(tmp_path):
    from benchmarks.train_throughput import main as throughput

    out = tmp_path / "throughput.json"
    assert throughput(["--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--steps",
                       "2", "--warmup", "1", "--workers", "0", "--caption-tokens", "12",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["stages"]) == {"align", "caption", "refine"}
    assert all(row["samples_per_s"] > 0 for row in result["stages"].values())
    assert result["stages"]["align"]["trainable_params"] < \
        result["stages"]["caption"]["trainable_params"]
