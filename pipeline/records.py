"""Typed records passed between stages: video -> frames -> captions -> transcript -> answer.

The orchestrator's own records are here (a video, its sampled frames); the reader's
(question, frame caption, transcript) belong to qa/ and are re-exported. A leaf: it imports
nothing heavy, so every stage can depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qa.records import OPTION_LETTERS, FrameCaption, Question, Transcript

__all__ = ["OPTION_LETTERS", "FrameCaption", "Question", "SampledFrames", "Transcript",
           "VideoItem"]


@dataclass(frozen=True)
class VideoItem:
    """One video of a dataset or archive."""

    video_id: str
    path: Path


@dataclass
class SampledFrames:
    """Frames sampled from one video.

    frames: uint8 array (N, H, W, 3), RGB. indices: (N,) frame indices, sorted, unique.
    timestamps: (N,) seconds from the start of the video, the decoder's own timestamps.
    """

    video_id: str
    path: Path
    indices: np.ndarray
    timestamps: np.ndarray
    frames: np.ndarray
    duration: float  # seconds
    avg_fps: float
    decode_seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.frames.shape[0])
