"""The project's error types: each names the file or item and the reason."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for every error the product raises on purpose."""


class ConfigError(PipelineError):
    """A config key or value is wrong: the message names the key, the value and what is allowed."""


class DatasetError(PipelineError):
    """A dataset file is malformed: the message names the file and lists the offending items."""


class VideoDecodeError(PipelineError):
    """A video could not be opened, decoded or sampled (or decoding timed out)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class CaptionerError(PipelineError):
    """A captioner got bad input or a bad checkpoint."""


class ReaderError(PipelineError):
    """The reader (vLLM server or client) failed."""


# What the CLI reports as a message rather than a traceback.
KNOWN_ERRORS = (PipelineError,)
