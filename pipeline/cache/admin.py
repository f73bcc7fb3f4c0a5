"""Cache administration: `ls` (a pandas table), `export` (Parquet, a row per frame), `gc`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cache.atomic import _atomic_write
from pipeline.cache.keys import _TEMP_SUFFIX, _normalize, canonical_json

if TYPE_CHECKING:
    import pandas as pd


logger = logging.getLogger(__name__)


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



class CacheAdmin:
    """Administration of a cache: tables (`ls`, `export`) and garbage collection."""

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
