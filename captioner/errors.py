"""The captioner library's error types (the orchestrator re-exports them in pipeline.errors)."""

from __future__ import annotations


class CaptionerError(Exception):
    """A captioner got bad input or a bad checkpoint."""


class DatasetError(Exception):
    """A dataset file is malformed: the message names the file and lists the offending items.
    Raised by the caption-data adapters here and by the orchestrator's video datasets."""
