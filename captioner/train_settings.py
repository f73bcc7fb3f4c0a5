"""Settings of MM-SeR training (the `train:` section of config.yaml).

`mmser train --stage align|caption|refine` reads them; every field is documented in
config.yaml. Stages follow LLaVA-1.5 and the MM-SeR paper (captioner/training.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from captioner.perturb import PerturbSettings
from captioner.train_data import DataSource

Stage = Literal["align", "caption", "refine"]
STAGES: tuple[str, ...] = ("align", "caption", "refine")
# What trains in each stage unless `train.trainable` says otherwise (LLaVA-1.5: stage 1 the
# projector, stage 2 projector + LM; the paper's refinement: connector + LM).
DEFAULT_TRAINABLE: dict[str, list[str]] = {
    "align": ["projector"],
    "caption": ["projector", "language_model"],
    "refine": ["connector", "language_model"],
}
PARTS = ("projector", "language_model", "connector", "vision_tower")
# LLaVA-1.5's rates (stage 1: 1e-3 at batch 256; stage 2: 2e-5 at batch 128, for a 7B LM).
# OPT-125M is 56x smaller than LLaMA-7B: sweep these for it (no published values).
DEFAULT_LEARNING_RATE: dict[str, float] = {"align": 1e-3, "caption": 2e-5, "refine": 2e-5}


@dataclass
class TrainData:
    """Where the stage's images and captions come from (captioner/train_data.py formats)."""

    train: list[DataSource] = field(default_factory=list)
    # Validation data: eval loss every `eval_steps`, and the checkpoint kept at the end.
    eval: list[DataSource] = field(default_factory=list)
    # Open every image's header once before training (a bad file is listed, not fatal).
    verify_images: bool = True
    # Each reference caption of an image is its own sample (COCO has five).
    expand_captions: bool = True


@dataclass
class RefinePairs:
    """The refine stage's (pseudo-initial caption -> target) pairs, as shares of samples."""

    # A perturbed ground truth (`train.perturb`, or a file from `mmser perturb`).
    perturbed: float = 0.6
    # The ground truth itself: the model learns to keep a right caption.
    identity: float = 0.2
    # The starting model's own caption of the image (its real errors).
    own: float = 0.2
    # Images the starting model captions for the `own` pairs (null: all training images).
    own_max: int | None = 5000
    # A JSONL from `mmser perturb` (llm or rules); null: rules on the fly, a new draw each
    # time an image comes round.
    perturbations: str | None = None
    # Share of training pairs whose image gets a random box replaced by noise (random
    # erasing). The pair's target still describes the whole image, so what the box hides
    # can only come from the input caption: it teaches the refinement to keep what the
    # image does not contradict. Such rows are left out of the caption loss. 0: off.
    erase: float = 0.0
    erase_area: list[float] = field(default_factory=lambda: [0.1, 0.3])  # box area range

    def validate(self) -> None:
        shares = (self.perturbed, self.identity, self.own)
        if min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(
                f"train.pairs shares must be >= 0 with a positive sum, got perturbed "
                f"{self.perturbed}, identity {self.identity}, own {self.own}"
            )
        if not 0.0 <= self.erase <= 1.0:
            raise ValueError(f"train.pairs.erase must be in [0, 1], got {self.erase}")
        if len(self.erase_area) != 2 or not 0 < self.erase_area[0] <= self.erase_area[1] < 1:
            raise ValueError(f"train.pairs.erase_area must be [low, high] in (0, 1), "
                             f"got {self.erase_area}")
        if self.own_max is not None and self.own_max < 1:
            raise ValueError(f"train.pairs.own_max must be null or >= 1, got {self.own_max}")


@dataclass
class TrainSettings:
    """One training stage: what trains, on what data, how long, where it is written."""

    stage: Stage = "caption"
    # Each stage writes {output_dir}/{stage}/: Trainer checkpoints (checkpoint-N/), the
    # final Hugging Face checkpoint (model/), metrics.jsonl, loss.png, summary.json.
    output_dir: str = "runs/train"
    # The checkpoint to start from; null: align builds from the component ids below,
    # caption starts from {output_dir}/align/model, refine from {output_dir}/caption/model.
    init_from: str | None = None
    # Components for the align stage (null: captioner.simple.vision_model / language_model).
    vision_model: str | None = None
    language_model: str | None = None
    # Refine stage: SeR-Connector fields of MMSeRConfig (e.g. connector_hidden_size,
    # num_refine_tokens); empty: the real-size defaults (~52M parameters).
    connector: dict[str, Any] = field(default_factory=dict)
    data: TrainData = field(default_factory=TrainData)
    # Parts that train: projector, language_model, connector, vision_tower (null: the
    # stage's default, DEFAULT_TRAINABLE).
    trainable: list[str] | None = None
    # Caption stage: also train the vision tower's last N blocks (0: CLIP stays frozen).
    vision_trainable_blocks: int = 0
    learning_rate: float | None = None  # null: DEFAULT_LEARNING_RATE of the stage
    lr_scheduler: str = "cosine"  # any transformers scheduler name
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 32  # per training process
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    # auto: bf16 on a GPU that has it and on CPUs with native bf16 (AMX, AVX512-BF16),
    # else fp32 (emulated bf16 is ~95x slower: docs/ARCHITECTURE.md).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_caption_tokens: int = 64  # captions cut to this many tokens (EOS included)
    logging_steps: int = 10
    eval_steps: int = 200  # validation loss every N steps (needs data.eval)
    save_steps: int = 200  # a resumable checkpoint every N steps (a multiple of eval_steps)
    save_total_limit: int = 2
    # Keep the checkpoint with the lowest validation loss as model/ (needs data.eval).
    select_best: bool = True
    seed: int = 0
    # auto: continue from the newest checkpoint in the stage folder; never: start over;
    # or a checkpoint-N folder.
    resume: str = "auto"
    dataloader_workers: int = 2  # processes decoding images
    # Training processes: 1 trains in this process; more run the same Trainer inside Ray
    # Train's TorchTrainer (one per GPU; on CPU, processes talking over gloo).
    num_workers: int = 1
    use_gpu: bool | None = None  # null: when CUDA is present
    gradient_checkpointing: bool = False
    # Refine stage: loss = refinement loss + caption_loss_weight x caption loss (without
    # the caption loss the coarse pass collapsed in a pilot).
    caption_loss_weight: float = 1.0
    pairs: RefinePairs = field(default_factory=RefinePairs)
    perturb: PerturbSettings = field(default_factory=PerturbSettings)

    def validate(self) -> None:
        positive = ("batch_size", "gradient_accumulation_steps", "logging_steps",
                    "eval_steps", "save_steps", "num_workers", "max_caption_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be null or >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0, got {self.epochs}")
        if self.dataloader_workers < 0 or self.vision_trainable_blocks < 0:
            raise ValueError("train.dataloader_workers and train.vision_trainable_blocks "
                             "must be >= 0")
        if self.trainable is not None:
            bad = sorted(set(self.trainable) - set(PARTS))
            if bad or not self.trainable:
                raise ValueError(f"train.trainable: unknown or empty {bad or self.trainable}; "
                                 f"parts: {', '.join(PARTS)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.pairs.validate()
        self.perturb.validate()
        for source in (*self.data.train, *self.data.eval):
            source.validate()
        if self.select_best and self.data.eval and self.save_steps % self.eval_steps:
            raise ValueError(
                f"train.save_steps ({self.save_steps}) must be a multiple of train.eval_steps "
                f"({self.eval_steps}) when train.select_best is true"
            )
        if self.resume == "":
            raise ValueError("train.resume must be auto, never or a checkpoint folder")

    def parts(self) -> list[str]:
        """What trains in this stage."""
        return list(self.trainable or DEFAULT_TRAINABLE[self.stage])

    def rate(self) -> float:
        return self.learning_rate or DEFAULT_LEARNING_RATE[self.stage]


__all__ = [
    "DEFAULT_LEARNING_RATE", "DEFAULT_TRAINABLE", "PARTS", "STAGES", "RefinePairs",
    "TrainData", "TrainSettings",
]  # fmt: skip
