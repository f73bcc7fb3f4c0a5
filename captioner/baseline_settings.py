"""Settings of the baseline captioners (LLaVA-1.5, Tag2Text)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Llava15Settings:
    # A llava-hf checkpoint: a hub id or a local directory.
    checkpoint: str = "llava-hf/llava-1.5-7b-hf"


@dataclass
class Tag2TextSettings:
    # The official Tag2Text checkpoint file (recognize-anything's tag2text_swin_14m.pth).
    checkpoint: str = "checkpoints/tag2text_swin_14m.pth"
