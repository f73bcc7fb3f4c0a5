"""Training data for the captioner: caption datasets read from their released layouts into
one list of samples (an image and its reference captions), and a torch Dataset over them.

Usage::

    from torch.utils.data import DataLoader
    from captioner.train_data import (
        DataSource, ImageCaptionDataset, drop_failed, load_caption_sources,
    )

    loaded = load_caption_sources([
        DataSource("coco", "data/coco/dataset_coco.json", image_root="data/coco", split="train"),
        DataSource("llava", "data/sharegpt4v/sharegpt4v_instruct_gpt4-vision_cap100k.json",
                   image_root="data"),
        DataSource("dci", "data/densely_captioned_images/complete"),
        DataSource("folder", "data/my_frames", limit=5000),
    ])
    print(loaded.summary())   # samples, captions and skipped items per source, by reason
    dataset = ImageCaptionDataset(loaded.samples, expand_captions=True)
    loader = DataLoader(dataset, batch_size=32, num_workers=4, collate_fn=drop_failed)

A source that cannot be used at all (missing, not JSON, wrong top-level shape) raises
`DatasetError` naming the file; a bad item never raises: it is left out and listed in
`LoadedCaptions.skipped` with its reason ("<kind>: <detail>", grouped by kind in `summary()`).
A bad value in a `DataSource` raises ValueError naming the field.

The formats and where each fact about them comes from: captioner/caption_formats.py.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image
from tqdm import tqdm

from captioner.caption_formats import PARSERS
from captioner.caption_records import (
    _CHECK_CHUNK,
    _CHECK_THREADS,
    _PROGRESS_OVER,
    FORMATS,
    IMAGE_NOT_FOUND,
    IMAGE_UNREADABLE,
    KARPATHY_SPLITS,
    CaptionSample,
    DataSource,
    Entry,
    LoadedCaptions,
    SkippedItem,
)

# The records are this module's API too (most callers import them from here).
__all__ = ["FORMATS", "KARPATHY_SPLITS", "CaptionSample", "DataSource", "Entry",
           "ImageCaptionDataset", "LoadedCaptions", "SkippedItem", "decode_rgb",
           "drop_failed", "image_problem", "load_caption_source", "load_caption_sources"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- loading


def load_caption_source(source: DataSource, verify_images: bool = True) -> LoadedCaptions:
    """Read one source. `verify_images` opens each image's header with PIL (`verify()`, no
    full decode); False only checks that the file exists."""
    source.validate()
    path = Path(source.path).expanduser()
    entries = _unique_ids(PARSERS[source.format](source, path))
    loaded = _check_images(entries, verify_images, source.limit)
    loaded.name = f"{source.format} {path}"
    log.info("%s", loaded.summary())
    return loaded


def load_caption_sources(
    sources: Sequence[DataSource], verify_images: bool = True
) -> LoadedCaptions:
    """Read several sources and concatenate them in order. An id already used by an earlier
    source is prefixed with its source's index ("2:abc"), so ids are unique overall."""
    parts = [load_caption_source(s, verify_images) for s in sources]
    taken: set[str] = set()
    samples: list[CaptionSample] = []
    for index, part in enumerate(parts):
        for sample in part.samples:
            new_id = sample.id
            while new_id in taken:
                new_id = f"{index}:{new_id}"
            taken.add(new_id)
            samples.append(sample if new_id == sample.id else replace(sample, id=new_id))
    name = parts[0].name if len(parts) == 1 else f"{len(parts)} sources"
    skipped = [item for part in parts for item in part.skipped]
    return LoadedCaptions(samples, skipped, name=name, parts=parts)


def _unique_ids(entries: list[Entry]) -> list[Entry]:
    """Give a repeated id within one source "#2", "#3", ... in file order."""
    seen: Counter[str] = Counter()
    taken = {e.id for e in entries if isinstance(e, CaptionSample)}
    out: list[Entry] = []
    for entry in entries:
        if isinstance(entry, CaptionSample):
            seen[entry.id] += 1
            if seen[entry.id] > 1:
                n = seen[entry.id]
                while f"{entry.id}#{n}" in taken:
                    n += 1
                taken.add(f"{entry.id}#{n}")
                entry = replace(entry, id=f"{entry.id}#{n}")
        out.append(entry)
    return out


def image_problem(path: str, verify: bool = True) -> str | None:
    """Why the image at `path` cannot be used (a skip reason), or None if it can. verify()
    reads headers and chunk checksums only: a truncated PNG fails it, a truncated JPEG does
    not (its decode fails later, in the Dataset, which then returns None)."""
    if not os.path.isfile(path):
        return f"{IMAGE_NOT_FOUND}: {path}"
    if not verify:
        return None
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"{IMAGE_UNREADABLE}: {path}: {exc}"
    return None


def _check_images(entries: list[Entry], verify: bool, limit: int | None) -> LoadedCaptions:
    """Check each sample's image (in threads, in file order) until `limit` samples pass."""
    samples: list[CaptionSample] = []
    skipped: list[SkippedItem] = []
    total = sum(isinstance(e, CaptionSample) for e in entries)
    if limit is not None:
        total = min(total, limit)
    bar = tqdm(
        total=total,
        desc="check images",
        unit="image",
        leave=False,
        disable=total <= _PROGRESS_OVER,
    )
    with bar, ThreadPoolExecutor(_CHECK_THREADS) as pool:
        for chunk in _chunks(entries, _CHECK_CHUNK):
            paths = [e.image for e in chunk if isinstance(e, CaptionSample)]
            problems = iter(pool.map(partial(image_problem, verify=verify), paths))
            for entry in chunk:
                if isinstance(entry, SkippedItem):
                    skipped.append(entry)
                    continue
                problem = next(problems)
                bar.update()
                if problem is None:
                    samples.append(entry)
                    if limit is not None and len(samples) >= limit:
                        return LoadedCaptions(samples, skipped)
                else:
                    skipped.append(SkippedItem(entry.source, entry.id, problem))
    return LoadedCaptions(samples, skipped)


def _chunks(items: list[Entry], size: int) -> Iterator[list[Entry]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----------------------------------------------------------------------- torch dataset


def decode_rgb(path: str) -> np.ndarray | None:
    """The image at `path` as an (H, W, 3) uint8 RGB array, or None (with a warning naming
    the path and PIL's reason) when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        log.warning("image unreadable, item dropped: %s: %s", path, exc)
        return None


class ImageCaptionDataset(torch.utils.data.Dataset):
    """One item per (sample, caption) pair when expand_captions, else one per sample (first
    caption). __getitem__ decodes the image (PIL, converted to RGB) in the DataLoader worker
    and returns {"id": str, "image": np.ndarray (H, W, 3) uint8, "caption": str, "index": int,
    "extra": dict}, plus "pixel_values": transform(image) when `transform` is given.
    An image that fails to decode in the worker returns None (and logs a warning naming the
    path and reason); `drop_failed(batch)` removes such Nones inside a collate function."""

    def __init__(
        self,
        samples: Sequence[CaptionSample],
        expand_captions: bool = True,
        transform: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.expand_captions = expand_captions
        self.transform = transform
        counts = np.array(
            [len(s.captions) if expand_captions else 1 for s in self.samples], dtype=np.int64
        )
        # Item -> (sample, caption) as flat int arrays: no per-item Python objects for the
        # forked workers to copy-on-touch.
        self._sample_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        first_item = np.cumsum(counts) - counts
        self._caption_of = np.arange(len(self._sample_of)) - np.repeat(first_item, counts)

    def __len__(self) -> int:
        return len(self._sample_of)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        index = index % len(self)
        sample = self.samples[int(self._sample_of[index])]
        image = decode_rgb(sample.image)
        if image is None:
            return None
        item: dict[str, Any] = {
            "id": sample.id,
            "image": image,
            "caption": sample.captions[int(self._caption_of[index])],
            "index": index,
            "extra": dict(sample.extra),
        }
        if self.transform is not None:
            item["pixel_values"] = self.transform(image)
        return item


def drop_failed(batch: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The batch without the items whose image failed to decode (None); use it first thing
    in a collate function."""
    return [item for item in batch if item is not None]
