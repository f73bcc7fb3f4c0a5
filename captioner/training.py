"""Training MM-SeR with transformers' Trainer: the stages, their data, the loss.

    from captioner.training import train_stage
    result = train_stage(train_settings, captioner_settings)   # one process
    result.model_dir   # {output_dir}/{stage}/model: a checkpoint captioner.mmser.checkpoint loads

Stages (LLaVA-1.5, then the paper's refinement; `train.stage`):
  align    only the projector trains: CLIP features -> OPT's embedding space (both frozen)
  caption  projector + OPT train on image -> caption (CLIP frozen, or its last N blocks):
           the simple model
  refine   SeR-Connector + OPT train on (image, pseudo-initial caption) -> right caption,
           with the caption loss on the same batch (a pilot without it collapsed the coarse
           pass). Pairs mix perturbed ground truth, identity pairs and the starting model's
           own captions (`train.pairs`).

Losses come from the model's own forward (`MMSeRForConditionalGeneration.training_forward`)
on the sequences captioner/sequence.py lays out for inference too. The same `Trainer` runs
inside Ray Train's TorchTrainer for several processes (pipeline/train.py passes Ray's
callback and `prepare_trainer`); this module holds no distributed code of its own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from captioner.base import image_backend, native_bf16_cpu
from captioner.configuration_mmser import MMSeRConfig
from captioner.errors import CaptionerError
from captioner.modeling_mmser import MMSeRForConditionalGeneration, register_auto_classes
from captioner.sequence import build_layout
from captioner.settings import CaptionerSettings
from captioner.train_data import (
    ImageCaptionDataset,
)
from captioner.train_settings import TrainSettings
from captioner.training_data import (
    CaptionCollator,
    PixelTransform,
    RefineCollator,
    RefinePairDataset,
    _Retrying,
    erase_box,
    load_data,
    own_captions,
    read_perturbations,
)
from captioner.training_paths import (
    MODEL_DIR,
    PREVIOUS_STAGE,
    resume_checkpoint,
    stage_dir,
    start_checkpoint,
)

log = logging.getLogger("mmser.train")



# --- the model to start from --------------------------------------------------------------


def load_start(
    settings: TrainSettings, captioner: CaptionerSettings
) -> tuple[MMSeRForConditionalGeneration, Any, Any]:
    """(model, image processor, tokenizer) the stage starts from. The model records the
    prompts it is trained with, so a checkpoint is captioned the way it learned."""
    start = start_checkpoint(settings)
    if start is None:
        from captioner.mmser import from_components

        vision = settings.vision_model or captioner.simple.vision_model
        language = settings.language_model or captioner.simple.language_model
        model, processor, tokenizer = from_components(vision, language, refine=False)
    else:
        if not (start / "config.json").is_file():
            previous = PREVIOUS_STAGE.get(settings.stage)
            hint = f"; run `mmser train --stage {previous}` first" if previous else ""
            raise CaptionerError(f"{settings.stage} stage: no checkpoint at {start}{hint}")
        fresh_connector = (settings.stage == "refine"
                           and not MMSeRConfig.from_pretrained(start).refine)
        overrides = {"refine": True, **settings.connector} if fresh_connector else {}
        verbosity = hf_logging.get_verbosity()
        if fresh_connector:  # its "missing keys" table would list every new weight
            hf_logging.set_verbosity_error()
        try:
            model = MMSeRForConditionalGeneration.from_pretrained(start, **overrides)
        finally:
            hf_logging.set_verbosity(verbosity)
        if fresh_connector:
            count = sum(p.numel() for p in model.ser_connector.parameters())
            log.info("a new SeR-Connector (%.2fM parameters) joins %s", count / 1e6, start)
        register_auto_classes()  # the Auto loaders below read the checkpoint's config.json
        processor = AutoImageProcessor.from_pretrained(start, backend=image_backend())
        tokenizer = AutoTokenizer.from_pretrained(start)
    model.config.caption_prompt = captioner.generation.prompt
    model.config.refine_prompt = captioner.mmser.refine_prompt
    model.set_attn_implementation("sdpa")
    return model, processor, tokenizer


def model_parts(model: MMSeRForConditionalGeneration) -> dict[str, nn.Module | None]:
    return {
        "projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
        "connector": model.ser_connector,
        "vision_tower": model.model.vision_tower,
    }


def deepest_vision_layer(model: MMSeRForConditionalGeneration) -> int:
    """How many CLIP blocks feed the LM: the projector reads hidden state
    `vision_feature_layer` (-2: all but the last block), the connector its
    `connector_layers`; blocks after the deepest of them get no gradient."""
    cfg = model.config
    count = cfg.vision_config.num_hidden_layers
    used = [cfg.vision_feature_layer % (count + 1)]
    if model.ser_connector is not None:
        used += [i % (count + 1) for i in cfg.connector_layers]
    return max(used)


def set_trainable(
    model: MMSeRForConditionalGeneration, parts: Sequence[str], vision_blocks: int = 0
) -> dict[str, int]:
    """Freeze everything but `parts` (and the vision tower's last `vision_blocks` blocks that
    feed the LM); returns the trainable parameter count per part. The LM head is tied to
    OPT's input embeddings, so it trains with the language model. Vision blocks past the
    deepest layer read, and CLIP's post-layernorm (only its pooled output uses it), stay
    frozen whatever `parts` says: they would get no gradient, which DDP refuses."""
    model.requires_grad_(False)
    modules = model_parts(model)
    for part in parts:
        module = modules[part]
        if module is None:
            raise CaptionerError(f"train.trainable names {part!r}, but this model has none "
                                 "(a simple model has no SeR-Connector: stage refine adds it)")
        module.requires_grad_(True)
    tower = model.model.vision_tower
    deepest = deepest_vision_layer(model)
    layers = tower.encoder.layers
    if vision_blocks:
        for layer in layers[max(0, deepest - vision_blocks) : deepest]:
            layer.requires_grad_(True)
    for layer in layers[deepest:]:
        layer.requires_grad_(False)
    tower.post_layernorm.requires_grad_(False)
    counts = {
        name: sum(p.numel() for p in module.parameters() if p.requires_grad)
        for name, module in modules.items() if module is not None
    }
    return {name: n for name, n in counts.items() if n}


# --- the Trainer --------------------------------------------------------------------------


class MMSeRTrainer(Trainer):
    """transformers' Trainer with MM-SeR's loss (from the model's own forward), the loss
    parts logged, and the processor and tokenizer saved with every checkpoint."""

    # The model returns per-batch means: the Trainer divides by accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, caption_weight: float = 1.0, image_processor: Any = None,
                 caption_tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.caption_weight = caption_weight
        self.image_processor, self.caption_tokenizer = image_processor, caption_tokenizer
        self._parts: dict[str, list[float]] = {}
        self._eval_parts: dict[str, list[float]] = {}

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if "coarse_ids" in inputs:
            inputs = {**inputs, "caption_weight": self.caption_weight}
        outputs = model(**inputs)
        parts = self._parts if model.training else self._eval_parts
        for name in ("caption_loss", "refine_loss"):
            value = getattr(outputs, name, None)
            if value is not None:
                parts.setdefault(name, []).append(float(value.detach()))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs.update({k: float(np.mean(v)) for k, v in self._parts.items() if v})
            self._parts = {}
        super().log(logs, *args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._eval_parts = {}
        metrics = super().evaluate(*args, **kwargs)
        parts = {f"eval_{k}": float(np.mean(v)) for k, v in self._eval_parts.items() if v}
        if parts:
            metrics.update(parts)
            self.log(parts)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        folder = output_dir or self.args.output_dir
        if self.image_processor is not None:
            self.image_processor.save_pretrained(folder)
        if self.caption_tokenizer is not None:
            self.caption_tokenizer.save_pretrained(folder)


class MetricsLog(TrainerCallback):
    """Every log line (loss, its parts, learning rate, eval loss) as one JSON line in
    metrics.jsonl, and the loss curve as loss.png at the end (main process only)."""

    def __init__(self, folder: Path, stage: str) -> None:
        self.path, self.png, self.stage = folder / "metrics.jsonl", folder / "loss.png", stage

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"stage": self.stage, "step": state.global_step, "epoch": state.epoch,
                  "time": time.time(), **logs}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            plot_losses(self.path, self.png, self.stage)


def plot_losses(metrics: Path, png: Path, title: str) -> Path | None:
    """Training and validation loss against step, from metrics.jsonl."""
    if not metrics.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("loss", "-"), ("caption_loss", ":"), ("refine_loss", "--"),
                       ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title(f"mmser train --stage {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# --- one stage ----------------------------------------------------------------------------


@dataclass
class StageResult:
    """What a stage did; written to {stage_dir}/summary.json."""

    stage: str
    model_dir: str
    started_from: str | None
    resumed_from: str | None
    steps: int
    train_loss: float | None
    best_eval_loss: float | None
    trainable: dict[str, int]
    data: str
    precision: str
    wall_s: float
    processes: int = 1
    pair_kinds: dict[str, float] = field(default_factory=dict)


def resolve_precision(precision: str, gpu: bool) -> str:
    if precision != "auto":
        return precision
    if gpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_bf16_cpu() else "fp32"


def training_arguments(settings: TrainSettings, folder: Path, gpu: bool, precision: str,
                       has_eval: bool) -> TrainingArguments:
    steps = settings.max_steps if settings.max_steps is not None else -1
    return TrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.rate(),
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a share of all steps
        weight_decay=settings.weight_decay,
        num_train_epochs=settings.epochs,
        max_steps=steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        load_best_model_at_end=settings.select_best and has_eval,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=settings.seed,
        dataloader_num_workers=settings.dataloader_workers,
        dataloader_pin_memory=gpu,
        remove_unused_columns=False,  # the batch holds MM-SeR's own keys
        prediction_loss_only=True,
        # The eval loop computes a loss only for batches holding the "labels": ours are the
        # ground-truth captions (present in every stage's batch).
        label_names=["caption_ids"],
        report_to="none",
        use_cpu=not gpu,
        gradient_checkpointing=settings.gradient_checkpointing,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def train_stage(
    settings: TrainSettings,
    captioner: CaptionerSettings,
    callbacks: Sequence[TrainerCallback] = (),
    prepare: Callable[[Trainer], Trainer] | None = None,
    resume_from: str | None = None,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
) -> StageResult:
    """Train one stage and write its final checkpoint to {stage_dir}/model.

    `callbacks` and `prepare` let a launcher hook in (Ray Train's report callback and
    `prepare_trainer`); `resume_from` overrides `train.resume` (Ray's restored checkpoint);
    rank / world / barrier describe the process group for the sharded own-caption pass.
    """
    settings.validate()
    t0 = time.perf_counter()
    folder = stage_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() if settings.use_gpu is None else settings.use_gpu
    precision = resolve_precision(settings.precision, gpu)
    model, processor, tokenizer = load_start(settings, captioner)
    if settings.stage == "refine" and model.ser_connector is None:
        raise CaptionerError("the refine stage needs a SeR-Connector (config.refine)")
    trainable = set_trainable(model, settings.parts(), settings.vision_trainable_blocks)
    layout = build_layout(tokenizer, model.config.image_token_index,
                          model.config.image_seq_length, model.config.caption_prompt,
                          model.config.refine_prompt)
    if model.config.text_config.eos_token_id != layout.eos_token_id:
        # The training forward ends captions with the config's EOS: make it the tokenizer's.
        model.config.text_config.eos_token_id = layout.eos_token_id
    train_data, eval_data = load_data(settings)
    if rank == 0:
        log.info("training data: %s", train_data.summary())
        if eval_data is not None:
            log.info("validation data: %s", eval_data.summary())
    transform = PixelTransform(processor)
    expand = settings.data.expand_captions
    train_set: Dataset = _Retrying(ImageCaptionDataset(train_data.samples, expand, transform))
    eval_set: Dataset | None = None
    if eval_data is not None and eval_data.samples:
        eval_set = _Retrying(ImageCaptionDataset(eval_data.samples, False, transform))
    collator: CaptionCollator = CaptionCollator(tokenizer, layout, settings.max_caption_tokens)
    pair_kinds: dict[str, float] = {}
    if settings.stage == "refine":
        own: dict[str, str] = {}
        if settings.pairs.own > 0:
            own = own_captions(model, processor, tokenizer, train_data.samples, captioner,
                               settings, folder, rank, world, barrier)
        given = read_perturbations(settings.pairs.perturbations) if settings.pairs.perturbations \
            else {}
        train_set = RefinePairDataset(train_set, settings, own, given, fixed=False)
        if eval_set is not None:
            eval_set = RefinePairDataset(eval_set, settings, {}, given, fixed=True)
        collator = RefineCollator(tokenizer, layout, settings.max_caption_tokens)
        pair_kinds = _pair_mix(train_set) if rank == 0 else {}
    model.train()
    trainer = MMSeRTrainer(
        model=model,
        args=training_arguments(settings, folder, gpu, precision, eval_set is not None),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        callbacks=[MetricsLog(folder, settings.stage), *callbacks],
        caption_weight=settings.caption_loss_weight,
        image_processor=processor,
        caption_tokenizer=tokenizer,
    )
    if prepare is not None:
        trainer = prepare(trainer)
    resumed = resume_from or resume_checkpoint(settings)
    if resumed and rank == 0:
        log.info("resuming from %s", resumed)
    output = trainer.train(resume_from_checkpoint=resumed)
    final = folder / MODEL_DIR
    trainer.save_model(str(final))
    best = trainer.state.best_metric
    result = StageResult(
        stage=settings.stage, model_dir=str(final),
        started_from=None if start_checkpoint(settings) is None
        else str(start_checkpoint(settings)),
        resumed_from=resumed, steps=trainer.state.global_step,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        best_eval_loss=float(best) if best is not None else None,
        trainable=trainable, data=train_data.summary(), precision=precision,
        wall_s=time.perf_counter() - t0, processes=world, pair_kinds=pair_kinds,
    )
    if rank == 0:
        (folder / "summary.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _pair_mix(dataset: RefinePairDataset, draws: int = 64) -> dict[str, float]:
    """The shares of pair kinds the training set actually yields (a sample of draws), so a
    share that cannot be met (no own captions, nothing to perturb) shows in the summary."""
    counts: dict[str, int] = {}
    picks = np.random.default_rng(0).integers(0, len(dataset), size=min(draws, len(dataset)))
    for index in picks:
        kind = dataset[int(index)]["pair"]
        counts[kind] = counts.get(kind, 0) + 1
    total = sum(counts.values())
    return {k: round(v / total, 3) for k, v in sorted(counts.items())}


__all__ = [
    "CaptionCollator", "MMSeRTrainer", "RefineCollator", "RefinePairDataset", "StageResult",
    "erase_box", "load_start", "own_captions", "read_perturbations", "set_trainable",
    "stage_dir", "train_stage",
]  # fmt: skip
