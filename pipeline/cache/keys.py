"""Cache keys: everything that decides a hit (video content, the sampling settings that
change frames, the captioner's identity), as the SHA-256 of canonical JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import platform
import re
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError

if TYPE_CHECKING:

    from pipeline.config import SamplingSettings

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


