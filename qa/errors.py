"""The reader library's error type (the orchestrator re-exports it in pipeline.errors)."""

from __future__ import annotations


class ReaderError(Exception):
    """The reader (vLLM server or client) failed."""
