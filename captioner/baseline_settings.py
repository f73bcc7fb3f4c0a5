"""Settings of the baseline captioners (LLaVA-1.5, Tag2Text), and two small helpers they share.

Decoding defaults come from `captioner.settings.GenerationSettings` (one prompt and token
budget for every captioner, so the comparison with MM-SeR is fair); a field left `None`
here means "use the shared value".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Tag2Text reference defaults (recognize-anything, `ram/models/tag2text.py`).
# Tags deleted before captioning because they disturb it: 127 "quarter", 2961 "back",
# 3351 "two", 3265 "three", 3338 "four", 3355 "five", 3359 "one".
TAG2TEXT_DELETE_TAG_INDICES = [127, 2961, 3351, 3265, 3338, 3355, 3359]
# Per-tag thresholds above the global one: 2701 "person", 2828 "man", 1167 "woman".
TAG2TEXT_CLASS_THRESHOLDS = {"2701": 0.7, "2828": 0.7, "1167": 0.7}
# The tag list's file name next to the official checkpoint (used when tag_list is null).
DEFAULT_TAG_LIST_NAME = "tag2text_ori_tag_list.txt"


def _check_decoding_overrides(section: str, settings: Any) -> None:
    """The optional per-captioner overrides of the shared decoding settings: None or valid."""
    for key, least in (("max_new_tokens", 1), ("min_new_tokens", 0), ("num_beams", 1)):
        value = getattr(settings, key)
        if value is not None and value < least:
            raise ValueError(f"{section}.{key} must be >= {least} (or null), got {value}")


@dataclass
class Llava15Settings:
    # A llava-hf checkpoint: a hub id or a local directory.
    checkpoint: str = "llava-hf/llava-1.5-7b-hf"
    # Caption instruction; null: generation.prompt. Wrapped as "USER: <image>\n{prompt} ASSISTANT:".
    prompt: str | None = None
    # null: the shared generation.* values.
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    num_beams: int | None = None

    def validate(self) -> None:
        _check_decoding_overrides("llava15", self)

    def model_files(self) -> dict[str, str | None]:
        """The fields naming model files (local paths or hub ids), as build() reads them."""
        return {"checkpoint": self.checkpoint}


@dataclass
class Tag2TextSettings:
    # The official Tag2Text checkpoint file (recognize-anything's tag2text_swin_14m.pth).
    checkpoint: str = "checkpoints/tag2text_swin_14m.pth"
    # The tag list (one tag per line, 3429 lines for the official model); null: the file
    # tag2text_ori_tag_list.txt next to the checkpoint.
    tag_list: str | None = None
    # The BERT tokenizer: a hub id or a directory with bert-base-uncased's vocab.txt;
    # [DEC] and [ENC] are added as in the reference.
    tokenizer: str = "bert-base-uncased"
    # Square input size of the Swin-B encoder (the 14M checkpoint is trained at 384).
    image_size: int = 384
    # Tag probability threshold, and per-tag overrides keyed by tag index.
    threshold: float = 0.68
    class_thresholds: dict[str, float] = field(
        default_factory=lambda: dict(TAG2TEXT_CLASS_THRESHOLDS)
    )
    # Tag indices never passed to the caption decoder.
    delete_tag_indices: list[int] = field(
        default_factory=lambda: list(TAG2TEXT_DELETE_TAG_INDICES)
    )
    # Decoder prefix (BLIP's prompt trick); stripped from the caption.
    prompt: str = "a picture of "
    # The reference decodes with 3 beams; null: generation.num_beams.
    num_beams: int | None = 3
    # null: the shared generation.* token budget.
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    repetition_penalty: float = 1.0
    # Tag string length in BERT tokens (the reference pads/truncates to 40).
    max_tag_tokens: int = 40
    # Overrides of the real architecture (field names of Tag2TextArch): tests use tiny
    # sizes; leave empty for the official checkpoint.
    architecture: dict[str, Any] = field(default_factory=dict)

    def tag_list_path(self) -> str:
        """The tag list file: `tag_list`, or the official name next to the checkpoint."""
        if self.tag_list:
            return self.tag_list
        return str(Path(self.checkpoint).parent / DEFAULT_TAG_LIST_NAME)

    def model_files(self) -> dict[str, str | None]:
        """The fields naming model files (local paths or hub ids), as build() reads them."""
        return {
            "checkpoint": self.checkpoint,
            "tag_list": self.tag_list_path(),
            "tokenizer": self.tokenizer,
        }

    def validate(self) -> None:
        _check_decoding_overrides("tag2text", self)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"tag2text.threshold must be in (0, 1), got {self.threshold}")
        for key, value in self.class_thresholds.items():
            if not str(key).isdigit():
                raise ValueError(
                    f"tag2text.class_thresholds: key {key!r} must be a tag index (an integer)"
                )
            if not 0.0 < value < 1.0:
                raise ValueError(f"tag2text.class_thresholds.{key} must be in (0, 1), got {value}")
        if any(i < 0 for i in self.delete_tag_indices):
            raise ValueError(
                f"tag2text.delete_tag_indices must be >= 0, got {self.delete_tag_indices}"
            )
        if self.max_tag_tokens < 2:
            raise ValueError(f"tag2text.max_tag_tokens must be >= 2, got {self.max_tag_tokens}")
