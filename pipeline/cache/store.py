"""Cache storage: one JSON file per record, written atomically (temp file + rename)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.fingerprint import FingerprintMode, video_fingerprint
from pipeline.cache.admin import CacheAdmin
from pipeline.cache.atomic import _atomic_write, _fsync_dir
from pipeline.cache.keys import _KEY_RE, CacheError, cache_key
from pipeline.cache.records import CacheRecord

if TYPE_CHECKING:

    from pipeline.config import SamplingSettings

logger = logging.getLogger(__name__)


class CaptionCache(CacheAdmin):
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

