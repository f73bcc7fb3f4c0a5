"""What the training stages feed the model: image-caption and refinement-pair datasets
(perturbed, identity and own-caption pairs, random erasing), their collators, and the
starting model's own captions of the training images (sharded, resumable)."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from captioner.base import checkpoint_fingerprint
from captioner.errors import CaptionerError
from captioner.modeling_mmser import MMSeRForConditionalGeneration
from captioner.perturb import RulePerturber, load_word_lists
from captioner.sequence import SequenceLayout, encode_captions
from captioner.settings import CaptionerSettings
from captioner.train_data import (
    CaptionSample,
    LoadedCaptions,
    decode_rgb,
    load_caption_sources,
)
from captioner.train_settings import TrainSettings
from captioner.training_paths import start_checkpoint

log = logging.getLogger("mmser.train")




# --- data ---------------------------------------------------------------------------------


class PixelTransform:
    """The image processor on one frame (runs in the DataLoader workers)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class _Retrying(Dataset):
    """An item whose image fails to decode (logged by the dataset) is replaced by the next
    good one, so one bad file costs one sample, never a batch or the run."""

    def __init__(self, base: Dataset, tries: int = 16) -> None:
        self.base, self.tries = base, tries

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for k in range(self.tries):
            item = self.base[(index + k) % len(self.base)]
            if item is not None:
                return item
        raise CaptionerError(f"{self.tries} images in a row failed to decode from item {index}")


class RefinePairDataset(Dataset):
    """Items of a caption dataset with a pseudo-initial caption ("coarse") and its kind
    ("pair": perturbed, identity or own) drawn by the `train.pairs` shares.

    Training draws afresh each time an item comes round (from torch's per-worker RNG, so
    a seed reproduces a run); validation (`fixed`) draws from the item's index only, so the
    validation loss of every evaluation is taken on the same pairs."""

    def __init__(
        self,
        base: Dataset,
        settings: TrainSettings,
        own: dict[str, str],
        perturbations: dict[str, list[str]],
        fixed: bool,
    ) -> None:
        self.base = base
        self.shares = settings.pairs
        self.perturber = RulePerturber(load_word_lists(settings.perturb), settings.perturb)
        self.own, self.perturbations = own, perturbations
        self.seed, self.fixed = settings.seed, fixed

    def __len__(self) -> int:
        return len(self.base)

    def _rng(self, index: int) -> random.Random:
        if self.fixed:
            return random.Random(f"{self.seed}:{index}")
        return random.Random(int(torch.randint(0, 2**62, (1,)).item()))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[index])
        rng = self._rng(index)
        truth = item["caption"]
        own = self.own.get(item["id"])
        kinds = ["perturbed", "identity"] + (["own"] if own is not None else [])
        weights = [self.shares.perturbed, self.shares.identity, self.shares.own][: len(kinds)]
        kind = rng.choices(kinds, weights=weights)[0] if sum(weights) > 0 else "identity"
        coarse = truth
        if kind == "own":
            coarse = own
        elif kind == "perturbed":
            given = self.perturbations.get(truth)
            if given:
                coarse = rng.choice(given)
            else:
                made = self.perturber.perturb(truth, rng)
                coarse = made.perturbed if made is not None else truth
        if coarse.strip() == truth.strip():
            kind = "identity"
        item.update(coarse=coarse, pair=kind, erased=False)
        if not self.fixed and rng.random() < self.shares.erase:
            pixels = erase_box(item["pixel_values"], rng, self.shares.erase_area)
            item.update(pixel_values=pixels, erased=True)
        return item


def erase_box(pixels: torch.Tensor, rng: random.Random, area: Sequence[float]) -> torch.Tensor:
    """A copy of `pixels` (C, H, W), as the vision tower sees them (after resize and crop),
    with one random box (a share of the area drawn from `area`, aspect 1:2 to 2:1)
    replaced by standard-normal noise (random erasing, in the normalised space)."""
    _, H, W = pixels.shape
    share, aspect = rng.uniform(*area), rng.uniform(0.5, 2.0)
    h = max(1, min(H, round((share * H * W * aspect) ** 0.5)))
    w = max(1, min(W, round((share * H * W / aspect) ** 0.5)))
    top, left = rng.randint(0, H - h), rng.randint(0, W - w)
    out = pixels.clone()
    noise = torch.randn(pixels.shape[0], h, w, generator=torch.Generator().manual_seed(
        rng.getrandbits(32)))
    out[:, top : top + h, left : left + w] = noise.to(pixels.dtype)
    return out


def read_perturbations(path: str | Path) -> dict[str, list[str]]:
    """Original caption -> its perturbed versions, from an `mmser perturb` JSONL. Keyed by
    the text: a perturbation rewrites words, whichever image the caption belongs to."""
    out: dict[str, list[str]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d: not JSON (a torn last line?), skipped", path, n)
            continue
        if record.get("perturbed"):
            out.setdefault(record["caption"], []).append(record["perturbed"])
    return out


class CaptionCollator:
    """Items -> the caption loss's batch: pixel values, the prompt, EOS-terminated captions."""

    def __init__(self, tokenizer: Any, layout: SequenceLayout, max_tokens: int) -> None:
        self.tokenizer, self.layout, self.max_tokens = tokenizer, layout, max_tokens

    def captions(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_captions(self.tokenizer, texts, self.max_tokens, self.layout)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        B = len(items)
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": self.layout.prompt_tensor(B).clone(),
            "caption_ids": self.captions([item["caption"] for item in items]),
        }


class RefineCollator(CaptionCollator):
    """Adds the refinement pairs: the pseudo-initial caption, the target, the instruction."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        batch["coarse_ids"] = self.captions([item["coarse"] for item in items])
        batch["target_ids"] = batch["caption_ids"]
        instruction = self.layout.instruction_tensor()
        batch["instruction_ids"] = instruction[None].expand(len(items), -1).clone()
        batch["caption_rows"] = torch.tensor([not item.get("erased", False) for item in items])
        return batch


def load_data(settings: TrainSettings) -> tuple[LoadedCaptions, LoadedCaptions | None]:
    """The training and validation samples; skipped items are listed, never fatal."""
    if not settings.data.train:
        raise CaptionerError("train.data.train is empty: name at least one data source")
    train = load_caption_sources(settings.data.train, settings.data.verify_images)
    if not train.samples:
        raise CaptionerError(f"no usable training samples: {train.summary()}")
    evaluation = None
    if settings.data.eval:
        evaluation = load_caption_sources(settings.data.eval, settings.data.verify_images)
    return train, evaluation


# --- the starting model's own captions (refine stage) -------------------------------------


def own_captions(
    model: MMSeRForConditionalGeneration, processor: Any, tokenizer: Any,
    samples: Sequence[CaptionSample], captioner: CaptionerSettings, settings: TrainSettings,
    out_dir: Path, rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None,
) -> dict[str, str]:
    """The starting model's own caption of each training image (first pass only), for the
    `own` pairs: its real errors to learn from. Written to own_captions.rank{R}.jsonl as it
    goes (a killed run resumes); each of `world` processes captions every world-th image,
    then all read all the files."""
    from captioner.mmser import MMSeRCaptioner

    limit = settings.pairs.own_max
    chosen = list(samples)[:limit] if limit else list(samples)
    # Captions of another starting model are stale: the files are keyed by its content.
    stamp = out_dir / "own_captions.json"
    start = start_checkpoint(settings)
    key = {"start": checkpoint_fingerprint(str(start)) if start else None,
           "max_new_tokens": settings.max_caption_tokens}
    if rank == 0 and stamp.exists() and json.loads(stamp.read_text()) != key:
        for old in out_dir.glob("own_captions.rank*.jsonl"):
            old.unlink()
    if barrier is not None:
        barrier()
    if rank == 0:
        stamp.write_text(json.dumps(key))
    path = out_dir / f"own_captions.rank{rank}.jsonl"
    done = _read_own(path)
    todo = [s for s in chosen[rank::world] if s.id not in done]
    if todo:
        own_settings = copy.deepcopy(captioner)
        own_settings.generation.max_new_tokens = settings.max_caption_tokens
        own_settings.generation.min_new_tokens = 0
        own_settings.generation.num_beams = 1
        device = torch.device("cpu")
        if torch.cuda.is_available() and settings.use_gpu is not False:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        model.to(device)  # the Trainer moves it there anyway; captioning on CPU would crawl
        captioner_ = MMSeRCaptioner("simple", model, processor, tokenizer, own_settings)

        with path.open("a") as fh, tqdm(total=len(todo), desc="own captions",
                                        disable=rank != 0) as bar:
            for i in range(0, len(todo), settings.batch_size):
                part = todo[i : i + settings.batch_size]
                images = [(s, decode_rgb(s.image)) for s in part]
                images = [(s, im) for s, im in images if im is not None]
                if images:
                    batch = captioner_.caption_batch([im for _, im in images])
                    for (sample, _), result in zip(images, batch.results, strict=True):
                        fh.write(json.dumps({"id": sample.id, "caption": result.caption}) + "\n")
                    fh.flush()
                bar.update(len(part))
        model.train()
    if barrier is not None:
        barrier()
    out: dict[str, str] = {}
    for shard in sorted(out_dir.glob("own_captions.rank*.jsonl")):
        out.update(_read_own(shard))
    return out


def _read_own(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of a killed run: captioned again
            continue
        out[record["id"]] = record["caption"]
    return out


