"""`mmser train`: one MM-SeR training stage, in this process or on Ray Train.

    mmser train --stage align      # then caption, then refine; each starts from the last
    mmser train --stage refine --set train.num_workers=4    # 4 GPUs (or CPU processes)

With `train.num_workers` 1 the stage runs transformers' Trainer here
(captioner/training.py). With more, the same Trainer runs in every worker of Ray Train's
TorchTrainer (Ray sets up the process group: NCCL on GPUs, gloo on CPUs), with Ray's
transformers integration: `prepare_trainer` and `RayTrainReportCallback`, which hands
every checkpoint to Ray's storage so a failed worker group restarts from it. Ray 2.60
runs Train V2 by default (RAY_TRAIN_V2_ENABLED defaults to 1 in its constants). On a
cluster, `train.output_dir` and the data must be on storage every node reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from captioner.train_settings import STAGES
from captioner.training import StageResult, stage_dir, train_stage
from pipeline.config import Config, config_from_dict
from pipeline.errors import ConfigError

log = logging.getLogger("mmser.train")


def with_stage(config: Config, stage: str | None) -> Config:
    """A copy of `config` whose train.stage is `stage` (None keeps the config's)."""
    if stage is None:
        return config
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    config = dataclasses.replace(config)
    config.train = dataclasses.replace(config.train, stage=stage)
    return config


def run_training(config: Config, stage: str | None = None) -> StageResult:
    """Train `stage` (default: train.stage) and return what it did."""
    config = with_stage(config, stage)
    settings = config.train
    if settings.num_workers == 1:
        return train_stage(settings, config.captioner)
    return _train_on_ray(config)


def _train_on_ray(config: Config) -> StageResult:
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_cluster import ray_session

    settings = config.train
    gpu = torch.cuda.is_available() if settings.use_gpu is None else settings.use_gpu
    folder = stage_dir(settings).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    # Each worker resolves relative paths from its own working directory: make them absolute.
    payload = _absolute_paths(config.to_dict())
    # Ray Train V2 picks up a run of the same name where it stopped: that is
    # train.resume=auto; `never` starts a run of its own.
    name = f"train-{settings.stage}"
    if settings.resume == "never":
        name += time.strftime("-%Y%m%d-%H%M%S")
    with ray_session(config.ray):
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"config": payload},
            scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=gpu),
            run_config=RunConfig(
                name=name,
                storage_path=str(folder / "ray"),
                # A lost worker group restarts from the last reported checkpoint, once.
                failure_config=FailureConfig(max_failures=1),
            ),
        )
        trainer.fit()
    for restored in folder.glob("restored-*"):  # copies of Ray's checkpoints, now spent
        shutil.rmtree(restored, ignore_errors=True)
    return StageResult(**json.loads((folder / "summary.json").read_text()))


def _absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (a Config as a dict) with the train section's local paths made absolute;
    hub ids (no such local path) stay as they are."""
    train = values["train"]

    def local(value: str | None, always: bool = False) -> str | None:
        if value and (always or Path(value).exists()):
            return str(Path(value).resolve())
        return value

    train["output_dir"] = local(train["output_dir"], always=True)
    for key in ("init_from", "vision_model", "language_model"):
        train[key] = local(train[key])
    if train["resume"] not in ("auto", "never"):
        train["resume"] = local(train["resume"], always=True)
    for split in ("train", "eval"):
        for source in train["data"][split]:
            source["path"] = local(source["path"], always=True)
            source["image_root"] = local(source["image_root"])
    train["pairs"]["perturbations"] = local(train["pairs"]["perturbations"])
    train["perturb"]["word_lists"] = local(train["perturb"]["word_lists"])
    return values


def _report_callback() -> Any:
    """Ray's RayTrainReportCallback, with the checkpoint handed over by rank 0 only and
    only once every rank has finished writing it: each rank of the stock callback copies
    the newest checkpoint folder as soon as its own share is written, which can catch
    rank 0's optimizer state half-written, and uploads N copies of one checkpoint."""
    import ray.train
    import torch.distributed as dist
    from ray.train.huggingface.transformers import RayTrainReportCallback

    class RankZeroReport(RayTrainReportCallback):
        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            if dist.is_initialized():
                dist.barrier()
            if ray.train.get_context().get_world_rank() == 0:
                return super().on_save(args, state, control, **kwargs)
            metrics: dict[str, Any] = {}
            for entry in state.log_history:
                metrics.update(entry)
            ray.train.report(metrics=metrics, checkpoint=None)

    return RankZeroReport()


def _restored_checkpoint(settings: Any, rank: int) -> str | None:
    """The Trainer checkpoint inside Ray's restored checkpoint (when Ray restarts a failed
    worker group, or picks up a run of the same name), copied next to the stage's own;
    None when there is none or train.resume is never."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None or settings.resume == "never":
        return None
    with checkpoint.as_directory() as folder:
        source = Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME
        if not (source / "trainer_state.json").is_file():
            return None
        step = json.loads((source / "trainer_state.json").read_text())["global_step"]
        # Copied out of Ray's temporary view: the Trainer reads it after this block.
        target = stage_dir(settings) / f"restored-step{step}-rank{rank}"
        if not target.exists():
            shutil.copytree(source, target)
    return str(target)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same Trainer as a single process, told its rank."""
    import ray.train
    import torch.distributed as dist
    from ray.train.huggingface.transformers import prepare_trainer

    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    train_stage(
        config.train, config.captioner,
        callbacks=[_report_callback()],
        prepare=prepare_trainer,
        resume_from=_restored_checkpoint(config.train, rank),
        rank=rank,
        world=context.get_world_size(),
        barrier=dist.barrier if dist.is_initialized() else None,
    )


def describe(result: StageResult) -> str:
    """A short report of a finished stage for the terminal."""
    trainable = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in result.trainable.items())
    lines = [
        f"stage {result.stage}: {result.steps} steps in {result.wall_s:.0f} s "
        f"({result.processes} process{'es' if result.processes > 1 else ''}, {result.precision})",
        "  started from: "
        + (result.started_from or "components (train.vision_model / language_model)"),
        f"  trainable: {trainable}",
        f"  train loss {result.train_loss:.4f}" + (
            f", best validation loss {result.best_eval_loss:.4f}"
            if result.best_eval_loss is not None else ""
        ),
        f"  data: {result.data}",
    ]
    if result.resumed_from:
        lines.append(f"  resumed from {result.resumed_from}")
    if result.pair_kinds:
        lines.append("  refinement pairs: " + ", ".join(
            f"{k} {v:.0%}" for k, v in result.pair_kinds.items()))
    lines.append(f"  checkpoint: {result.model_dir}")
    return "\n".join(lines)


__all__ = ["describe", "run_training", "with_stage"]
