"""Typed records passed between stages: video -> frames -> captions -> transcript -> answer.

This module is a leaf: it imports nothing heavy, so every stage can depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OPTION_LETTERS = ("A", "B", "C", "D", "E")


@dataclass(frozen=True)
class VideoItem:
    """One video of a dataset or archive."""

    video_id: str
    path: Path


@dataclass(frozen=True)
class Question:
    """A multiple-choice question about one video (EgoSchema: 5 options)."""

    q_uid: str
    video_id: str
    question: str
    options: tuple[str, ...]
    answer: int | None = None  # index into options when known (EgoSchema's public 500)


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


@dataclass(frozen=True)
class FrameCaption:
    """The caption of one frame at one time."""

    timestamp: float  # seconds
    caption: str
    coarse_caption: str | None = None  # MM-SeR: the first-pass caption
    refine_passes: int = 0
    tags: tuple[str, ...] = ()  # Tag2Text: the recognised tags


@dataclass
class Transcript:
    """All captions of one video in time order: the reader's view of the video."""

    video_id: str
    duration: float  # seconds
    captions: list[FrameCaption] = field(default_factory=list)

    @property
    def seconds_per_caption(self) -> float:
        return self.duration / max(len(self.captions), 1)
