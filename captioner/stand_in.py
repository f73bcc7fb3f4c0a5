"""Stage 0: tiny stand-ins for pretrained CLIP and OPT, trained on a synthetic world.

A real user starts `mmser train --stage align` from openai/clip-vit-large-patch14-336 and
facebook/opt-125m: a vision tower that already sees shapes and colours, a language model
that already writes English. Tiny random components have neither, and a pilot here found
that a tiny vision tower trained from scratch through the caption loss learns colours but
not shapes or relations in minutes. So, for the synthetic worlds only (bench-learn, the
demo captioner), this stage STANDS IN FOR PRETRAINING:

- the vision tower learns the world's labels from its patch features at the layer the
  projector reads: per patch, the shape, colour and size of the object covering it; per
  image, the relation and the background;
- the language model learns the world's caption text (causal LM loss): text only, drawn
  from the world's whole grammar, so, like a pretrained LM that knows "a red triangle" is
  English, it has read colour-shape pairs that no training image shows.

Both run through transformers' Trainer and are saved back into their component folders,
which then play the part of the hub checkpoints. This is not part of MM-SeR's recipe.

    from captioner.stand_in import pretrain_components
    report = pretrain_components(vision_dir, text_dir, train_samples, val_samples)
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    OPTForCausalLM,
    Trainer,
    TrainingArguments,
)

from captioner.base import image_backend
from captioner.errors import CaptionerError
from captioner.train_data import CaptionSample, decode_rgb
from captioner.vision_layers import vision_hidden_states

log = logging.getLogger("mmser.stand_in")


@dataclass
class StandInReport:
    """What stage 0 reached, on the validation samples."""

    vision_steps: int
    vision_accuracy: dict[str, float]  # per-patch object attributes, per-image slots
    text_steps: int
    text_val_loss: float
    wall_s: float


PATCH_ATTRIBUTES = ("shape", "colour", "size")  # what the object covering a patch is


class PatchClassifier(nn.Module):
    """Heads over one vision layer's patch features. Per patch, shared by all positions:
    the shape, colour and size of the object covering it (class 0: none), so each patch
    feature learns what lies there, translation by translation, as the projector will
    read it. Per image, from the mean patch feature: the slots that belong to no object
    (the relation, the background)."""

    def __init__(self, vision: CLIPVisionModel, layer: int, patch_classes: dict[str, list[str]],
                 image_classes: dict[str, list[str]]) -> None:
        super().__init__()
        dim = vision.config.hidden_size
        self.vision, self.layer = vision, layer
        self.patch_names, self.image_names = list(patch_classes), list(image_classes)
        self.patch_heads = nn.ModuleList(nn.Linear(dim, len(v) + 1) for v in patch_classes.values())
        self.image_heads = nn.ModuleList(nn.Linear(dim, len(v)) for v in image_classes.values())

    def forward(self, pixel_values: torch.Tensor, patch_labels: torch.Tensor,
                image_labels: torch.Tensor) -> dict[str, Any]:
        """pixel_values (B, 3, H, W); patch_labels (B, A, N) class per attribute and patch
        (0: no object); image_labels (B, S) -> loss and predictions."""
        hidden = vision_hidden_states(self.vision, pixel_values, [self.layer])[self.layer]
        patches = hidden[:, 1:]  # (B, N, D), CLS dropped as LLaVA-1.5 drops it
        patch_logits = [head(patches) for head in self.patch_heads]  # A x (B, N, C)
        image_logits = [head(patches.mean(1)) for head in self.image_heads]  # S x (B, C)
        ce = nn.functional.cross_entropy
        losses = [ce(lg.flatten(0, 1), patch_labels[:, a].flatten())
                  for a, lg in enumerate(patch_logits)]
        losses += [ce(lg, image_labels[:, s]) for s, lg in enumerate(image_logits)]
        return {
            "loss": sum(losses) / len(losses),
            "patch_predictions": torch.stack([lg.argmax(-1) for lg in patch_logits], 1),
            "image_predictions": torch.stack([lg.argmax(-1) for lg in image_logits], 1)
            if image_logits else image_labels,
        }


def patch_labels(objects: Sequence[dict], grid: int, classes: dict[str, list[str]]) -> torch.Tensor:
    """(A, grid * grid) class per attribute of the object covering each patch (0: none): a
    patch is covered when its centre lies within the object's ellipse grown by half a
    patch (small objects span only a few patches)."""
    centres = (torch.arange(grid) + 0.5) / grid
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    out = torch.zeros(len(classes), grid * grid, dtype=torch.long)
    half = 0.5 / grid
    for obj in objects:
        inside = (((xs - obj["cx"]) / (obj["rx"] + half)) ** 2
                  + ((ys - obj["cy"]) / (obj["ry"] + half)) ** 2 <= 1).flatten()
        for a, (name, values) in enumerate(classes.items()):
            if obj[name] in values:
                out[a, inside] = values.index(obj[name]) + 1
    return out


class _VisionData(Dataset):
    def __init__(self, samples: Sequence[CaptionSample], processor: Any, grid: int,
                 patch_classes: dict[str, list[str]], image_classes: dict[str, list[str]]):
        self.samples, self.processor, self.grid = list(samples), processor, grid
        self.patch_classes, self.image_classes = patch_classes, image_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        image = decode_rgb(sample.image)
        if image is None:
            raise CaptionerError(f"{sample.image}: unreadable image in stage 0")
        slots = sample.extra["slots"]
        image_labels = [values.index(slots[n]) for n, values in self.image_classes.items()]
        return {
            "pixel_values": self.processor(images=image, return_tensors="pt")["pixel_values"][0],
            "patch_labels": patch_labels(sample.extra["objects"], self.grid, self.patch_classes),
            "image_labels": torch.tensor(image_labels, dtype=torch.long),
        }


class _TextData(Dataset):
    def __init__(self, captions: Sequence[str]) -> None:
        self.captions = list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> str:
        return self.captions[index]


class _TextCollator:
    """Captions -> BOS + caption + EOS (the tokenizer's own convention), loss on all but
    padding."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        eos = self.tokenizer.eos_token
        batch = self.tokenizer([c + eos for c in captions], padding=True,
                               padding_side="right", return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return dict(batch)


def _arguments(folder: str, steps: int, batch: int, lr: float, seed: int,
               workers: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=folder, max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01,
        logging_steps=max(1, steps // 10), save_strategy="no", report_to="none",
        seed=seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=workers,
        remove_unused_columns=False, disable_tqdm=False,
    )


def world_classes(
    samples: Sequence[CaptionSample],
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The world's label space: per-patch object attributes, and per-image slots (those not
    about one object: relation, background), each with its sorted values."""
    if not samples or "objects" not in samples[0].extra or "slots" not in samples[0].extra:
        raise CaptionerError("stage 0 needs samples carrying 'objects' and 'slots' "
                             "(a synthetic world written by pipeline.world)")
    patch: dict[str, set[str]] = {name: set() for name in PATCH_ATTRIBUTES}
    image: dict[str, set[str]] = {}
    for sample in samples:
        for obj in sample.extra["objects"]:
            for name in PATCH_ATTRIBUTES:
                if obj[name]:
                    patch[name].add(obj[name])
        for name, value in sample.extra["slots"].items():
            if not name.startswith("obj"):
                image.setdefault(name, set()).add(value)
    patch = {k: v for k, v in patch.items() if len(v) > 1}  # one size only: nothing to learn
    return ({k: sorted(v) for k, v in patch.items()}, {k: sorted(v) for k, v in image.items()})


@torch.no_grad()
def _accuracy(model: PatchClassifier, data: _VisionData, batch: int) -> dict[str, float]:
    """Per-patch accuracy on the patches an object covers, per attribute; per-image accuracy
    of the other slots."""
    model.eval()
    hits = torch.zeros(len(model.patch_names))
    covered = torch.zeros(len(model.patch_names))
    image_hits = torch.zeros(len(model.image_names))
    for i in range(0, len(data), batch):
        items = [data[j] for j in range(i, min(i + batch, len(data)))]
        stacked = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        out = model(**stacked)
        labels = stacked["patch_labels"]
        on_object = labels > 0
        hits += ((out["patch_predictions"] == labels) & on_object).float().sum((0, 2))
        covered += on_object.float().sum((0, 2))
        if model.image_names:
            image_hits += (out["image_predictions"] == stacked["image_labels"]).float().sum(0)
    result = {f"patch_{n}": float(h / c.clamp_min(1))
              for n, h, c in zip(model.patch_names, hits, covered, strict=True)}
    result.update({n: float(h / len(data)) for n, h in zip(model.image_names, image_hits,
                                                            strict=True)})
    return result


def pretrain_components(
    vision_dir: str | Path, text_dir: str | Path,
    train: Sequence[CaptionSample], val: Sequence[CaptionSample],
    vision_steps: int = 400, text_steps: int = 200, batch_size: int = 64,
    vision_lr: float = 3e-3, text_lr: float = 2e-3, seed: int = 0, workers: int = 0,
    feature_layer: int = -2, text: Sequence[str] | None = None,
) -> StandInReport:
    """Train the tiny vision tower on the world's labels and the tiny LM on caption text
    (`text`, default the training captions), and save both back into their folders.
    Returns the validation figures."""

    t0 = time.perf_counter()
    vision_dir, text_dir = Path(vision_dir), Path(text_dir)
    patch_classes, image_classes = world_classes(train)
    processor = AutoImageProcessor.from_pretrained(vision_dir, backend=image_backend())
    vision = CLIPVisionModel.from_pretrained(vision_dir)
    grid = vision.config.image_size // vision.config.patch_size
    classifier = PatchClassifier(vision, feature_layer, patch_classes, image_classes)
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(
            model=classifier,
            args=_arguments(tmp, vision_steps, batch_size, vision_lr, seed, workers),
            train_dataset=_VisionData(train, processor, grid, patch_classes, image_classes),
        ).train()
    val_data = _VisionData(val, processor, grid, patch_classes, image_classes)
    accuracy = _accuracy(classifier, val_data, batch_size)
    vision.save_pretrained(vision_dir)

    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    lm = OPTForCausalLM.from_pretrained(text_dir)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=lm,
            args=_arguments(tmp, text_steps, batch_size, text_lr, seed, 0),
            train_dataset=_TextData(list(text) if text is not None
                                    else [s.captions[0] for s in train]),
            eval_dataset=_TextData([s.captions[0] for s in val]),
            data_collator=_TextCollator(tokenizer),
        )
        trainer.train()
        text_loss = float(trainer.evaluate()["eval_loss"])
    lm.save_pretrained(text_dir)
    report = StandInReport(vision_steps, accuracy, text_steps, text_loss,
                           time.perf_counter() - t0)
    (vision_dir.parent / "stand_in.json").write_text(json.dumps(asdict(report), indent=1))
    log.info("stage 0: slot accuracy %s, caption-text loss %.3f", accuracy, text_loss)
    return report


__all__ = ["PatchClassifier", "StandInReport", "patch_labels", "pretrain_components",
           "world_classes"]
