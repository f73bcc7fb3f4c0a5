"""The caption data records: a data source (one entry of `train.data`), a sample (an image and
its references), a skipped item and its reason, and what loading gave."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)


FORMATS = ("llava", "coco", "dci", "folder")
KARPATHY_SPLITS = ("train", "restval", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_ASSISTANT_ROLES = ("gpt", "assistant")
_LLAVA_OWN_KEYS = ("id", "image", "conversations", "split")
_PROGRESS_OVER = 1000  # show a progress bar when checking more images than this
_CHECK_THREADS = 8  # image checks are file I/O: threads overlap it (network disks above all)
_CHECK_CHUNK = 256  # images checked per round, so a `limit` stops the checking early

# Reason kinds (the text before the first ": " of a reason; summary() groups by it).
NO_IMAGE_FIELD = "no image field (text-only conversation)"
IMAGE_NOT_FOUND = "image not found"
IMAGE_UNREADABLE = "image unreadable"
EMPTY_CAPTION = "empty caption"


@dataclass
class DataSource:
    """One entry of the config's `train.data` list: a caption dataset in one of FORMATS."""

    format: Literal["llava", "coco", "dci", "folder"] = "llava"
    # The JSON file (llava, coco), the DCI annotations folder or one of its files, or the
    # image folder (folder).
    path: str = ""
    # Folder the image paths in the file are relative to (null: the file's own folder; dci:
    # a "photos" folder beside the annotations if there is one; folder format: ignored).
    image_root: str | None = None
    # coco: Karpathy split (train | restval | val | test; null: all). llava: keep only items
    # whose "split" key matches (items without the key are kept). dci, folder: must be null.
    split: str | None = None
    limit: int | None = None  # keep only the first N valid samples (null: all)

    def validate(self) -> None:
        """Raise ValueError naming the field for a bad value."""
        if self.format not in FORMATS:
            raise ValueError(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"path: must name a file or folder, got {self.path!r}")
        if self.image_root is not None and (
            not isinstance(self.image_root, str) or not self.image_root.strip()
        ):
            raise ValueError(f"image_root: must be a folder or null, got {self.image_root!r}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise ValueError(f"limit: must be a whole number >= 1 or null, got {self.limit!r}")
        self._validate_split()

    def _validate_split(self) -> None:
        if self.split is None:
            return
        if self.format in ("dci", "folder"):
            raise ValueError(
                f"split: must be null for format {self.format!r} (it has no splits), "
                f"got {self.split!r}"
            )
        if self.format == "coco" and self.split not in KARPATHY_SPLITS:
            raise ValueError(
                f"split: {self.split!r} is not a Karpathy split ({', '.join(KARPATHY_SPLITS)}) "
                "or null"
            )
        if not isinstance(self.split, str) or not self.split.strip():
            raise ValueError(f"split: must be a split name or null, got {self.split!r}")


@dataclass(frozen=True)
class CaptionSample:
    """One image and every reference caption for it."""

    id: str  # the item's own id where the data has one, else derived from the image path
    image: str  # absolute path of the image file
    captions: tuple[str, ...]  # >= 1, stripped, non-empty
    source: str  # the file it came from
    split: str | None = None
    # Further per-item fields (e.g. a synthetic world's "slots"); JSON-serialisable.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class SkippedItem:
    """An item left out of a source, and why ("<kind>: <detail>", or just the kind)."""

    source: str  # file
    item: str  # the item's id, or its position where it has none
    reason: str

    @property
    def kind(self) -> str:
        return self.reason.split(": ", 1)[0]


@dataclass
class LoadedCaptions:
    """What loading one source, or several, gave."""

    samples: list[CaptionSample]
    skipped: list[SkippedItem]
    name: str = ""  # e.g. "coco /a/dataset_coco.json"; "3 sources" for a concatenation
    parts: list[LoadedCaptions] = field(default_factory=list)  # one per source when several

    @property
    def num_captions(self) -> int:
        return sum(len(s.captions) for s in self.samples)

    def skipped_by_kind(self) -> dict[str, int]:
        """Skipped-item counts by reason kind, most frequent first."""
        counts = Counter(s.kind for s in self.skipped)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        """One line per source, e.g. "coco /a/dataset_coco.json: 4 samples (12 captions),
        2 skipped: 1 image not found, 1 empty caption"; a total line first when several."""
        lines = [self._line()]
        if len(self.parts) > 1:
            lines += ["  " + part._line() for part in self.parts]
        return "\n".join(lines)

    def _line(self) -> str:
        line = (
            f"{self.name or 'captions'}: {len(self.samples)} samples "
            f"({self.num_captions} captions), {len(self.skipped)} skipped"
        )
        kinds = self.skipped_by_kind()
        if kinds:
            line += ": " + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        return line


Entry = CaptionSample | SkippedItem  # parsers give both, in file order


