"""Where a training stage's things are: its folder, the checkpoint it starts from, and the
checkpoint a killed run resumes from."""

from __future__ import annotations

import logging
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.train_settings import TrainSettings

log = logging.getLogger("mmser.train")

PREVIOUS_STAGE = {"caption": "align", "refine": "caption"}
MODEL_DIR = "model"  # {output_dir}/{stage}/model: the stage's final checkpoint



# --- where things are ---------------------------------------------------------------------


def stage_dir(settings: TrainSettings) -> Path:
    return Path(settings.output_dir) / settings.stage


def start_checkpoint(settings: TrainSettings) -> Path | None:
    """The checkpoint the stage starts from (None: the align stage builds from components)."""
    if settings.init_from:
        return Path(settings.init_from)
    previous = PREVIOUS_STAGE.get(settings.stage)
    return None if previous is None else Path(settings.output_dir) / previous / MODEL_DIR


def _complete(checkpoint: Path) -> bool:
    """A checkpoint the Trainer finished writing: its state and its weights are there (a
    run killed while saving leaves a folder without them)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (checkpoint / "trainer_state.json").is_file() and any(
        (checkpoint / name).is_file() for name in weights)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint-N in `folder` (None when there is none)."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True)
    for checkpoint in found:
        if _complete(checkpoint):
            return str(checkpoint)
        log.warning("%s was not finished (killed while saving?): not resumed from", checkpoint)
    return None


def resume_checkpoint(settings: TrainSettings) -> str | None:
    """The Trainer checkpoint to continue from (`train.resume`), or None to start over."""
    if settings.resume == "never":
        return None
    if settings.resume == "auto":
        return last_complete_checkpoint(stage_dir(settings))
    path = Path(settings.resume)
    if not (path / "trainer_state.json").is_file():
        raise CaptionerError(f"train.resume: {path} is not a Trainer checkpoint folder "
                             "(no trainer_state.json)")
    return str(path)


