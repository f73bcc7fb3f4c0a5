"""The offline caption cache: one record per (video content, sampling settings, captioner).

Usage::

    cache = CaptionCache("data/cache")
    key = cache_key(video_fingerprint(path), sampling_settings, captioner.identity())
    record = cache.get(key)                  # CacheRecord or None (a miss)
    if record is None:
        ...decode, caption...
        record = CacheRecord.create(fingerprint=..., video_id=..., path=path, ...)
        cache.put(record)
    transcript = record.to_transcript(video_id)

The key is the SHA-256 of the canonical JSON of three things: the video's content
fingerprint (`captioner.fingerprint`: a renamed or moved file hits, an edited one misses),
the sampling settings that change which frames are decoded (see `sampling_identity`), and
the captioner's `identity()` (name, checkpoint fingerprint, generation settings).

Storage: ``<dir>/records/<key[:2]>/<key>.json``, one small JSON file per record. Chosen over
SQLite, one Parquet table or a shared JSONL log because it needs no lock and no server:
- a write is a temp file in the record's own folder, flushed and fsynced, then `os.replace`
  onto the final name. A rename within a folder is atomic, so a reader (or a process killed
  at any instant) sees the old record, the new one or none, never half of one;
- writers of different keys never touch the same file, so they cannot clobber each other;
  two writers of the same key both rename complete files and the last one wins. Both hold
  the same captions up to nondeterminism of the captioner, since the key fixes its input;
- Ray actors on several nodes can share the folder on a network file system (rename is
  atomic on NFS too), where SQLite's locking is unreliable and Parquet cannot be appended
  to by several processes. Tables are made on demand: `ls()` (pandas) and `export()`
  (Parquet, one row per frame);
- the two-hex-digit shard folders keep each folder under a few thousand entries for
  archives of up to a million videos.
A temp file left by a killed writer is invisible to readers (dot-prefixed, `.tmp`) and
removed by `gc()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.fingerprint import FingerprintMode, video_fingerprint
from pipeline.errors import PipelineError
from pipeline.records import FrameCaption, Transcript

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.config import SamplingSettings

__all__ = [
    "CacheError",
    "CacheRecord",
    "CaptionCache",
    "GcReport",
    "cache_key",
    "canonical_json",
    "package_versions",
    "sampling_identity",
    "video_fingerprint",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Sampling keys that cannot change the decoded frames: leaving them out of the key means a
# longer timeout or more decoder threads still hits the records made before.
NON_OUTPUT_SAMPLING_KEYS = frozenset({"decode_timeout_s", "num_threads"})
# Packages whose versions are stored with each record (provenance, not part of the key).
VERSIONED_PACKAGES = ("mmser-videoqa", "torch", "transformers", "decord")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_TEMP_SUFFIX = ".tmp"


class CacheError(PipelineError):
    """A cache record, key or argument is malformed: the message names the file or item."""


# --- keys -------------------------------------------------------------------------------


def _normalize(value: Any, where: str) -> Any:
    """JSON-ready copy of `value` in which equal settings look equal.

    Integral floats become ints (``fps: 1`` and ``fps: 1.0`` give one key), tuples become
    lists, numpy scalars become Python numbers, dataclasses become dicts.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise CacheError(f"{where}: {number} cannot be part of a cache key")
        return int(number) if number.is_integer() else number
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CacheError(f"{where}: key {k!r} is not a string")
            out[k] = _normalize(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_normalize(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise CacheError(
        f"{where}: a {type(value).__name__} ({value!r}) cannot be part of a cache key; "
        "use str, numbers, bools, None, lists and dicts"
    )


def canonical_json(value: Any) -> str:
    """Sorted-key, whitespace-free JSON of `value` after `_normalize`: equal in, equal out."""
    return json.dumps(
        _normalize(value, "value"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )


def sampling_identity(sampling: SamplingSettings | Mapping[str, Any]) -> dict[str, Any]:
    """The sampling settings that change the decoded frames, as a dict.

    Drops `NON_OUTPUT_SAMPLING_KEYS` (timeout, decoder threads). Everything else is kept,
    including fields the current policy ignores: decoding is another module's business, and
    a spurious miss is cheaper than a wrong hit.
    """
    if dataclasses.is_dataclass(sampling) and not isinstance(sampling, type):
        sampling = dataclasses.asdict(sampling)
    if not isinstance(sampling, Mapping):
        raise CacheError(f"sampling settings: expected a mapping, got {type(sampling).__name__}")
    return {k: v for k, v in sampling.items() if k not in NON_OUTPUT_SAMPLING_KEYS}


def cache_key(
    fingerprint: str,
    sampling: SamplingSettings | Mapping[str, Any],
    captioner_identity: Mapping[str, Any],
) -> str:
    """64 hex digits: SHA-256 of the canonical JSON of {fingerprint, sampling, captioner}."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise CacheError(f"video fingerprint: expected a non-empty string, got {fingerprint!r}")
    if not isinstance(captioner_identity, Mapping) or "name" not in captioner_identity:
        raise CacheError(
            f"captioner identity: expected a mapping with a 'name', got {captioner_identity!r}"
        )
    payload = {
        "schema": SCHEMA_VERSION,
        "video": fingerprint,
        "sampling": _normalize(sampling_identity(sampling), "sampling"),
        "captioner": _normalize(dict(captioner_identity), "captioner"),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    """Installed versions of `VERSIONED_PACKAGES` and Python (None: not installed).

    Read from package metadata, so nothing heavy is imported.
    """
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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


# --- the cache ---------------------------------------------------------------------------


@dataclass
class GcReport:
    """What `CaptionCache.gc` removed (or, with dry_run, would remove): record/temp paths."""

    dry_run: bool
    missing_video: list[Path] = field(default_factory=list)
    other_captioner: list[Path] = field(default_factory=list)
    corrupt: list[Path] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)

    @property
    def removed(self) -> list[Path]:
        return self.missing_video + self.other_captioner + self.corrupt + self.temp_files

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{verb} {len(self.missing_video)} records of missing videos, "
            f"{len(self.other_captioner)} of other captioners, {len(self.corrupt)} corrupt "
            f"records, {len(self.temp_files)} temp files of killed writers"
        )


def _identity_matches(identity: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """True when every item of `wanted` equals the identity's (after normalization)."""
    identity = _normalize(dict(identity), "captioner")
    wanted = _normalize(dict(wanted), "keep_captioners")
    return all(k in identity and identity[k] == v for k, v in wanted.items())


def _atomic_write(final: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_name)` fills a temp file beside `final`, which then replaces `final`.

    Same folder as the final name: os.replace is only atomic within one file system. The
    temp name is dot-prefixed with `_TEMP_SUFFIX`, invisible to readers and removed by gc.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=_TEMP_SUFFIX,
                                    dir=final.parent)
    os.close(fd)
    try:
        write(tmp_name)
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; other users may share the cache
        os.replace(tmp_name, final)
    except BaseException:
        # Includes KeyboardInterrupt: never leave our own temp file behind when we can.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable across a power cut (a kill is covered without it).
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CaptionCache:
    """A caption cache rooted at `root` (created on first write).

    Safe to share between threads, processes and Ray actors on one machine or, through a
    network file system with atomic rename, on several.
    """

    def __init__(self, root: str | Path, fingerprint_mode: FingerprintMode = "sampled") -> None:
        self.root = Path(root)
        self.records_dir = self.root / "records"
        self.fingerprint_mode = fingerprint_mode

    def __repr__(self) -> str:
        return f"CaptionCache({str(self.root)!r})"

    # --- keys and paths ---

    def fingerprint(self, video_path: str | Path) -> str:
        """The content fingerprint of a video, with this cache's fingerprint mode."""
        return video_fingerprint(video_path, self.fingerprint_mode)

    def key_for(
        self,
        video_path: str | Path,
        sampling: SamplingSettings | Mapping[str, Any],
        captioner_identity: Mapping[str, Any],
    ) -> str:
        """`cache_key` of the video at `video_path` (reads its fingerprint)."""
        return cache_key(self.fingerprint(video_path), sampling, captioner_identity)

    def record_path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise CacheError(f"cache key {key!r} is not 64 lowercase hex digits")
        return self.records_dir / key[:2] / f"{key}.json"

    # --- reading ---

    def _load(self, path: Path, key: str) -> CacheRecord | None:
        """The record in `path`, None when absent; a corrupt file is logged and is None."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("caption cache: cannot read %s (%s); treated as a miss", path, exc)
            return None
        try:
            record = CacheRecord.from_dict(json.loads(text), where=str(path))
        except (json.JSONDecodeError, CacheError) as exc:
            logger.warning("caption cache: corrupt record %s (%s); treated as a miss", path, exc)
            return None
        if record.key != key:
            logger.warning(
                "caption cache: %s holds the record of key %s; treated as a miss", path, record.key
            )
            return None
        return record

    def get(self, key: str) -> CacheRecord | None:
        """The record of `key`, or None on a miss (absent, or corrupt: logged as a warning)."""
        return self._load(self.record_path(key), key)

    def contains(self, key: str) -> bool:
        """True when `key` has a valid record (the record is read and checked)."""
        return self.get(key) is not None

    def _record_files(self) -> Iterator[Path]:
        if not self.records_dir.is_dir():
            return
        for shard in sorted(self.records_dir.iterdir()):
            if not shard.is_dir():
                continue
            for path in sorted(shard.iterdir()):
                if path.suffix == ".json" and not path.name.startswith("."):
                    yield path

    def iter_records(self) -> Iterator[CacheRecord]:
        """Every valid record, in key order; corrupt files are logged and skipped."""
        for path in self._record_files():
            record = self._load(path, path.stem)
            if record is not None:
                yield record

    # --- writing ---

    def put(self, record: CacheRecord) -> Path:
        """Write `record` atomically (replacing any record of its key); returns its path.

        Raises CacheError when the record's key does not match its contents.
        """
        record.check(f"record of {record.video_id!r}")
        final = self.record_path(record.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(record.to_dict(), ensure_ascii=False, indent=1).encode("utf-8")

        def write(tmp_name: str) -> None:
            with open(tmp_name, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())

        _atomic_write(final, write)
        _fsync_dir(final.parent)
        return final

    def add_path(self, key: str, video_path: str | Path) -> bool:
        """Remember that the video of `key` also lives at `video_path` (a moved or copied
        file that hit). Returns False when the record is absent or already has the path.

        A read-modify-write without a lock: two processes adding paths to one record at the
        same instant may lose one path (never the record). A lost path only matters to
        `gc(missing_videos=True)`.
        """
        record = self.get(key)
        path = os.path.abspath(video_path)
        if record is None or path in record.paths:
            return False
        record.paths.append(path)
        self.put(record)
        return True

    # --- tables ---

    def ls(self) -> pd.DataFrame:
        """One row per record: key, video_id, path (the latest known), captioner (name),
        frames, duration, created (a UTC pandas Timestamp), sorted by creation time."""
        import pandas as pd

        columns = ["key", "video_id", "path", "captioner", "frames", "duration", "created"]
        rows = [
            (
                r.key, r.video_id, r.latest_path, r.captioner_name,
                r.frames, r.duration, r.created,
            )
            for r in self.iter_records()
        ]  # fmt: skip
        table = pd.DataFrame(rows, columns=columns)
        table["frames"] = table["frames"].astype("int64")
        table["duration"] = table["duration"].astype("float64")
        table["created"] = pd.to_datetime(table["created"], utc=True, format="ISO8601")
        return table.sort_values(["created", "key"], ignore_index=True)

    def export(self, path: str | Path) -> int:
        """Write every record to a Parquet file, one row per frame; returns the row count.

        Columns: key, fingerprint, video_id, path (the latest known), captioner (name),
        captioner_identity and sampling (canonical JSON), frame (position in the video),
        timestamp, caption, coarse_caption, refine_passes, tags (list of strings), duration,
        created (UTC).
        Written to a temp file and renamed, so a reader never sees half a table.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([
            ("key", pa.string()), ("fingerprint", pa.string()), ("video_id", pa.string()),
            ("path", pa.string()), ("captioner", pa.string()),
            ("captioner_identity", pa.string()), ("sampling", pa.string()),
            ("frame", pa.int32()), ("timestamp", pa.float64()), ("caption", pa.string()),
            ("coarse_caption", pa.string()), ("refine_passes", pa.int32()),
            ("tags", pa.list_(pa.string())), ("duration", pa.float64()),
            ("created", pa.timestamp("ms", tz="UTC")),
        ])  # fmt: skip
        rows = []
        for r in self.iter_records():
            shared = {
                "key": r.key,
                "fingerprint": r.fingerprint,
                "video_id": r.video_id,
                "path": r.latest_path,
                "captioner": r.captioner_name,
                "captioner_identity": canonical_json(r.captioner),
                "sampling": canonical_json(r.sampling),
                "duration": r.duration,
                "created": datetime.fromisoformat(r.created),
            }
            for i, c in enumerate(r.captions):
                rows.append({
                    **shared, "frame": i, "timestamp": c.timestamp, "caption": c.caption,
                    "coarse_caption": c.coarse_caption, "refine_passes": c.refine_passes,
                    "tags": list(c.tags),
                })  # fmt: skip
        table = pa.Table.from_pylist(rows, schema=schema)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(out, lambda tmp_name: pq.write_table(table, tmp_name))
        return table.num_rows

    # --- garbage collection ---

    def gc(
        self,
        *,
        missing_videos: bool = True,
        keep_captioners: Sequence[Mapping[str, Any]] | None = None,
        corrupt: bool = True,
        temp_max_age_s: float = 300.0,
        dry_run: bool = False,
    ) -> GcReport:
        """Remove records that are no longer useful; return what was (or would be) removed.

        - missing_videos: records none of whose `paths` exists any more. Only meaningful on
          a machine that sees the videos where they were captioned.
        - keep_captioners: when given, records whose captioner identity matches none of these
          are removed. A spec matches when all its items equal the identity's, so
          ``{"name": "mmser"}`` keeps every MM-SeR record and a full `identity()` keeps
          exactly one checkpoint and generation setting.
        - corrupt: record files that do not parse or whose key does not match.
        - temp files of killed writers older than `temp_max_age_s` (a live write takes
          milliseconds; the age keeps gc from racing a writer in progress).
        A record rewritten by a writer while gc runs is not removed (its file changed).
        """
        report = GcReport(dry_run=dry_run)
        now = time.time()
        if not self.records_dir.is_dir():
            return report
        for shard in sorted(self.records_dir.iterdir()):
            if not shard.is_dir():
                continue
            for path in sorted(shard.iterdir()):
                if path.name.startswith(".") and path.name.endswith(_TEMP_SUFFIX):
                    try:
                        age = now - path.stat().st_mtime
                    except FileNotFoundError:
                        continue  # its writer finished and renamed it
                    if age >= temp_max_age_s:
                        report.temp_files.append(path)
                        if not dry_run:
                            path.unlink(missing_ok=True)
                    continue
                if path.suffix != ".json" or path.name.startswith("."):
                    continue
                try:
                    before = path.stat()
                except FileNotFoundError:
                    continue
                record = self._load(path, path.stem)
                if record is None:
                    reason = report.corrupt if corrupt else None
                elif keep_captioners is not None and not any(
                    _identity_matches(record.captioner, spec) for spec in keep_captioners
                ):
                    reason = report.other_captioner
                elif missing_videos and not any(os.path.exists(p) for p in record.paths):
                    reason = report.missing_video
                else:
                    reason = None
                if reason is None:
                    continue
                try:
                    after = path.stat()
                except FileNotFoundError:
                    continue
                if (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
                    continue  # a writer replaced it meanwhile: judge it next time
                reason.append(path)
                if not dry_run:
                    path.unlink(missing_ok=True)
        return report
