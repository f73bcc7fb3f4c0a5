"""The one layout of MM-SeR's sequences, shared by training and inference.

Every pass reads one growing sequence (token ids, or embeddings where noted):

    [BOS] [<image> x N] "\\n{prompt}\\n"          the prompt: N image features scattered in
    caption tokens ... EOS                       the coarse (or only) caption
    [refinement tokens x K]                      embeddings from the SeR-Connector
    "\\n{refine prompt}\\n"                       the refine instruction
    refined caption tokens ... EOS               the refined caption (iterating appends
                                                 another K + instruction + caption block)

Captions are left-aligned in a block of T positions; EOS and the padding after it are
masked out of the attention mask (holes), so a block of captions of different lengths is
one rectangle. OPT's positions count only unmasked positions, the same in `generate` and
in a teacher-forced forward. Training builds exactly these blocks (`encode_captions`,
`caption_mask`, `label_mask`), so the two cannot drift: tests/test_training.py checks
that the training forward's logits equal the inference pass's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from captioner.errors import CaptionerError


@dataclass(frozen=True)
class SequenceLayout:
    """The fixed token ids of a captioner's sequences."""

    prompt_ids: tuple[int, ...]  # [BOS] + N image placeholders + "\n{prompt}\n"
    instruction_ids: tuple[int, ...]  # "\n{refine prompt}\n"
    eos_token_id: int
    pad_token_id: int

    def prompt_tensor(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(batch, S) copies of the prompt (one prompt for every row: no padding)."""
        return torch.tensor(self.prompt_ids, device=device)[None].expand(batch, -1)

    def instruction_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.instruction_ids, device=device)  # (I,)


def build_layout(
    tokenizer: Any, image_token_index: int, image_seq_length: int, prompt: str,
    refine_prompt: str,
) -> SequenceLayout:
    """The layout for a tokenizer and prompts. The BOS comes from the tokenizer's own
    convention (OPT prepends `</s>`, id 2, to every text), so the image placeholders are
    placed after it as LLaVA places them after Llama's `<s>`."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise CaptionerError("the tokenizer has no EOS token: captions could not end")
    if pad is None:
        pad = eos
    bos = tokenizer.bos_token_id
    text = tokenizer(f"\n{prompt}\n", add_special_tokens=False)["input_ids"]
    prompt_ids = ([bos] if bos is not None else []) + [image_token_index] * image_seq_length
    instruction = tokenizer(f"\n{refine_prompt}\n", add_special_tokens=False)["input_ids"]
    return SequenceLayout(tuple(prompt_ids + text), tuple(instruction), int(eos), int(pad))


def encode_captions(
    tokenizer: Any, texts: Sequence[str], max_tokens: int, layout: SequenceLayout
) -> torch.Tensor:
    """Captions -> a block (B, T) of token ids: each caption's tokens, then EOS, then
    padding; T is the longest caption + 1 (at most `max_tokens`, cutting a longer caption so
    its EOS fits). Encoded without special tokens: OPT's BOS is EOS's id, and a BOS in front
    would read as an empty caption."""
    if max_tokens < 1:
        raise CaptionerError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    rows = [row[: max_tokens - 1] + [layout.eos_token_id] for row in ids]
    width = max(len(row) for row in rows)
    block = torch.full((len(rows), width), layout.pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        block[i, : len(row)] = torch.tensor(row)
    return block


def caption_mask(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) -> 1 on the caption's own tokens, before the first EOS: what a later pass
    attends to (EOS and padding are holes)."""
    return ((tokens == eos_token_id).cumsum(1) == 0).long()


def label_mask(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) -> 1 on the tokens a caption loss is taken on: the caption and its EOS."""
    is_eos = (tokens == eos_token_id).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


__all__ = [
    "SequenceLayout", "build_layout", "caption_mask", "encode_captions", "label_mask",
]  # fmt: skip
