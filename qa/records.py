"""The reader's records: a question, the captions of one video, and its transcript.

The captioning orchestrator (pipeline/) builds these from captioned frames; the reader
(qa/) turns them into prompts and answers. A leaf: it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPTION_LETTERS = ("A", "B", "C", "D", "E")


@dataclass(frozen=True)
class Question:
    """A multiple-choice question about one video (EgoSchema: 5 options)."""

    q_uid: str
    video_id: str
    question: str
    options: tuple[str, ...]
    answer: int | None = None  # index into options when known (EgoSchema's public 500)


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
