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

from captioner.fingerprint import video_fingerprint
from pipeline.cache.admin import GcReport
from pipeline.cache.keys import (
    NON_OUTPUT_SAMPLING_KEYS,
    SCHEMA_VERSION,
    VERSIONED_PACKAGES,
    CacheError,
    cache_key,
    canonical_json,
    package_versions,
    sampling_identity,
)
from pipeline.cache.records import CacheRecord
from pipeline.cache.store import CaptionCache

__all__ = [
    "NON_OUTPUT_SAMPLING_KEYS",
    "SCHEMA_VERSION",
    "VERSIONED_PACKAGES",
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
