"""The cache's record schema: one video's captions with their provenance, checked on load."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cache.keys import (
    _KEY_RE,
    SCHEMA_VERSION,
    CacheError,
    _normalize,
    cache_key,
    package_versions,
)
from pipeline.records import FrameCaption, Transcript

if TYPE_CHECKING:

    from pipeline.config import SamplingSettings

logger = logging.getLogger(__name__)

# --- records ----------------------------------------------------------------------------


def _caption_to_dict(caption: FrameCaption) -> dict[str, Any]:
    return {
        # float()/int()/str(): numpy scalars from the decoder would not serialize.
        "timestamp": float(caption.timestamp),
        "caption": caption.caption,
        "coarse_caption": caption.coarse_caption,
        "refine_passes": int(caption.refine_passes),
        "tags": [str(t) for t in caption.tags],
    }


def _caption_from_dict(data: Any, where: str) -> FrameCaption:
    if not isinstance(data, Mapping):
        raise CacheError(f"{where}: expected an object, got {type(data).__name__}")
    timestamp, caption = data.get("timestamp"), data.get("caption")
    coarse, passes = data.get("coarse_caption"), data.get("refine_passes", 0)
    tags = data.get("tags", [])
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        raise CacheError(f"{where}.timestamp: expected a number, got {timestamp!r}")
    if not isinstance(caption, str):
        raise CacheError(f"{where}.caption: expected a string, got {caption!r}")
    if coarse is not None and not isinstance(coarse, str):
        raise CacheError(f"{where}.coarse_caption: expected a string or null, got {coarse!r}")
    if isinstance(passes, bool) or not isinstance(passes, int):
        raise CacheError(f"{where}.refine_passes: expected an int, got {passes!r}")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise CacheError(f"{where}.tags: expected a list of strings, got {tags!r}")
    return FrameCaption(float(timestamp), caption, coarse, passes, tuple(tags))


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class CacheRecord:
    """Everything cached about one video for one sampling and one captioner.

    `captions` are in time order, one per sampled frame (the per-frame timestamps are
    theirs). `paths` are absolute paths the video had when captioned (more are added by
    `CaptionCache.add_path` when a moved copy hits). `timings` are seconds, e.g.
    ``{"decode_seconds": 1.2, "caption_seconds": 30.5}``. `created` is ISO 8601 UTC.
    """

    key: str
    fingerprint: str
    video_id: str
    paths: list[str]
    duration: float
    captions: list[FrameCaption]
    sampling: dict[str, Any]
    captioner: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    created: str = ""

    @classmethod
    def create(
        cls,
        *,
        fingerprint: str,
        video_id: str,
        path: str | Path,
        duration: float,
        captions: Sequence[FrameCaption],
        sampling: SamplingSettings | Mapping[str, Any],
        captioner: Mapping[str, Any],
        timings: Mapping[str, float] | None = None,
    ) -> CacheRecord:
        """A new record with its key, versions and creation time filled in."""
        if dataclasses.is_dataclass(sampling) and not isinstance(sampling, type):
            sampling = dataclasses.asdict(sampling)
        sampling = _normalize(dict(sampling), "sampling")
        captioner = _normalize(dict(captioner), "captioner")
        return cls(
            key=cache_key(fingerprint, sampling, captioner),
            fingerprint=fingerprint,
            video_id=str(video_id),
            paths=[os.path.abspath(path)],
            duration=float(duration),
            captions=sorted(captions, key=lambda c: c.timestamp),
            sampling=sampling,
            captioner=captioner,
            timings={k: float(v) for k, v in (timings or {}).items()},
            versions=dict(package_versions()),
            created=_utc_now(),
        )

    @property
    def frames(self) -> int:
        return len(self.captions)

    @property
    def latest_path(self) -> str | None:
        """The most recently added path: where the video was last seen."""
        return self.paths[-1] if self.paths else None

    @property
    def captioner_name(self) -> str:
        return str(self.captioner.get("name", ""))

    def to_transcript(self, video_id: str | None = None) -> Transcript:
        """The reader's view of the video; `video_id` overrides the one cached (a moved or
        renamed copy of a video may be known under another id)."""
        return Transcript(
            video_id=video_id if video_id is not None else self.video_id,
            duration=self.duration,
            captions=list(self.captions),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "key": self.key,
            "fingerprint": self.fingerprint,
            "video_id": self.video_id,
            "paths": list(self.paths),
            "duration": self.duration,
            "captions": [_caption_to_dict(c) for c in self.captions],
            "sampling": self.sampling,
            "captioner": self.captioner,
            "timings": self.timings,
            "versions": self.versions,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> CacheRecord:
        """Parse and validate; raises CacheError naming `where` and the bad field."""
        if not isinstance(data, Mapping):
            raise CacheError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA_VERSION:
            raise CacheError(
                f"{where}: schema {data.get('schema')!r}, this version reads {SCHEMA_VERSION}"
            )
        expected = {
            "key": str, "fingerprint": str, "video_id": str, "paths": list,
            "duration": (int, float), "captions": list, "sampling": dict, "captioner": dict,
            "timings": dict, "versions": dict, "created": str,
        }  # fmt: skip
        for name, tp in expected.items():
            if name not in data:
                raise CacheError(f"{where}: field '{name}' is missing")
            if not isinstance(data[name], tp) or isinstance(data[name], bool):
                raise CacheError(f"{where}: field '{name}' has the wrong type: {data[name]!r}")
        if not all(isinstance(p, str) for p in data["paths"]):
            raise CacheError(f"{where}: field 'paths' must be a list of strings")
        record = cls(
            key=data["key"],
            fingerprint=data["fingerprint"],
            video_id=data["video_id"],
            paths=list(data["paths"]),
            duration=float(data["duration"]),
            captions=[
                _caption_from_dict(c, f"{where}: captions[{i}]")
                for i, c in enumerate(data["captions"])
            ],
            sampling=dict(data["sampling"]),
            captioner=dict(data["captioner"]),
            timings=dict(data["timings"]),
            versions=dict(data["versions"]),
            created=data["created"],
        )
        record.check(where)
        return record

    def check(self, where: str = "record") -> None:
        """Raise CacheError unless `key` is the key of this record's own contents."""
        if not _KEY_RE.match(self.key):
            raise CacheError(f"{where}: key {self.key!r} is not 64 lowercase hex digits")
        expected = cache_key(self.fingerprint, self.sampling, self.captioner)
        if expected != self.key:
            raise CacheError(
                f"{where}: key {self.key} does not match its fingerprint, sampling and "
                f"captioner (they give {expected})"
            )


