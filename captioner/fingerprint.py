"""Content fingerprints of files: videos (the caption cache's key) and checkpoints.

A fingerprint depends only on the file's bytes, never on its name, folder or mtime, so a
renamed, moved or copied video gives the same fingerprint and an edited one a different one.

Two schemes, named by the prefix of the fingerprint string:

- ``sampled`` (default, prefix ``b2s1-``): files up to `FULL_HASH_MAX_BYTES` are hashed
  whole; larger files hash their size plus `SAMPLE_CHUNKS` chunks of `SAMPLE_CHUNK_BYTES`
  spread evenly from the first byte to the last (the first chunk starts at 0, the last ends
  at the end of the file). The cost is constant: 4 MiB read in 64 seeks whatever the
  file's size (16 MiB at most, for files hashed whole), against a full read of a multi-GB
  archive file (seconds to minutes on disk or NFS).
  Trade-off: an edit that keeps the exact size and changes only bytes between the sampled
  chunks is not seen. Re-encoding, trimming, cutting or appending to a compressed video
  changes its size and nearly all its bytes, so the realistic blind spot is a same-length
  in-place patch in the middle of a large file; for archives where that matters, use
  ``full``.
- ``full`` (prefix ``b2f1-``): BLAKE2b over every byte. Exact, cost linear in file size.

The two schemes give different strings for the same file, so one cache should be filled
with one scheme (a switch only costs misses, never wrong hits). The scheme version is in
the prefix: changing the sampling parameters must bump it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Literal

FingerprintMode = Literal["sampled", "full"]

SAMPLED_PREFIX = "b2s1-"
FULL_PREFIX = "b2f1-"
# Files up to this size are hashed whole in the sampled scheme too: reading 16 MiB costs
# ~10 ms from the page cache, and small files are exactly the ones sampling would skip most of.
FULL_HASH_MAX_BYTES = 16 * 1024 * 1024
SAMPLE_CHUNKS = 64
SAMPLE_CHUNK_BYTES = 64 * 1024
_READ_BYTES = 1024 * 1024
_DIGEST_BYTES = 20  # 160 bits: no accidental collision in any archive


def _hash_full(fh: BinaryIO, digest: hashlib.blake2b) -> None:
    while block := fh.read(_READ_BYTES):
        digest.update(block)


def sample_offsets(
    size: int, chunks: int = SAMPLE_CHUNKS, chunk: int = SAMPLE_CHUNK_BYTES
) -> list[int]:
    """Start offsets of the sampled chunks of a file of `size` bytes (size > chunks * chunk).

    Evenly spaced over [0, size - chunk]: the first chunk is the file's start (the container
    header), the last its end (mp4's index often lives there), the rest cover the middle.
    """
    last = size - chunk
    return [i * last // (chunks - 1) for i in range(chunks)]


def video_fingerprint(path: str | Path, mode: FingerprintMode = "sampled") -> str:
    """The content fingerprint of the file at `path`, e.g. ``"b2s1-3f9a..."`` (45 chars).

    Raises FileNotFoundError / OSError from the file system unchanged: the caller knows
    whether a missing video is a failure of its item.
    """
    if mode not in ("sampled", "full"):
        raise ValueError(f"fingerprint mode {mode!r}: expected 'sampled' or 'full'")
    path = Path(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if mode == "full":
            digest = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=b"mmser-full-v1")
            _hash_full(fh, digest)
            return FULL_PREFIX + digest.hexdigest()
        digest = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=b"mmser-smpl-v1")
        # The size goes in first: a truncated or extended file always changes the result.
        digest.update(size.to_bytes(8, "little"))
        if size <= max(FULL_HASH_MAX_BYTES, SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES):
            _hash_full(fh, digest)
        else:
            for offset in sample_offsets(size):
                fh.seek(offset)
                digest.update(fh.read(SAMPLE_CHUNK_BYTES))
    return SAMPLED_PREFIX + digest.hexdigest()
