"""The project's error types: each names the file or item and the reason.

The libraries own theirs (captioner.errors, qa.errors) and raise nothing from here; they
are re-exported so `from pipeline.errors import ...` names every type the product raises,
and `KNOWN_ERRORS` is what the CLI reports as a message rather than a traceback.
"""

from __future__ import annotations

from captioner.errors import CaptionerError, DatasetError
from qa.errors import ReaderError

__all__ = ["KNOWN_ERRORS", "CaptionerError", "ConfigError", "DatasetError", "PipelineError",
           "ReaderError", "VideoDecodeError"]


class PipelineError(Exception):
    """Base class for every error the orchestrator raises on purpose."""


class ConfigError(PipelineError):
    """A config key or value is wrong: the message names the key, the value and what is allowed."""


class VideoDecodeError(PipelineError):
    """A video could not be opened, decoded or sampled (or decoding timed out)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


KNOWN_ERRORS = (PipelineError, CaptionerError, DatasetError, ReaderError)
