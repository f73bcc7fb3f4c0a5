"""Transcript -> prompt text, and the context-budget policy for transcripts that do not fit.

Lines follow LLoVi: `{seconds}: {caption}`, one per caption, in time order.

Budget policy (applied only when the transcript is over budget, always recorded):
  1. `dedup`: drop a caption that is a near-duplicate of the caption kept just before it
     (word-set Jaccard similarity >= threshold): long static stretches say the same thing;
  2. `subsample`: keep the largest number of captions, evenly spaced in time, that fits.
Never a silent cut: the returned `BudgetReport` says what was done; never a crash: in the
worst case zero captions are kept and the report says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.records import FrameCaption, Transcript

_WORD = re.compile(r"\w+")


def format_seconds(t: float) -> str:
    """12.0 -> '12', 12.34 -> '12.3' (LLoVi writes whole seconds at 1 fps)."""
    r = round(float(t), 1)
    return str(int(r)) if r == int(r) else f"{r:.1f}"


def caption_line(caption: FrameCaption) -> str:
    return f"{format_seconds(caption.timestamp)}: {' '.join(caption.caption.split())}"


def format_captions(captions: Sequence[FrameCaption]) -> str:
    """One `{seconds}: {caption}` line per caption, sorted by time."""
    return "\n".join(caption_line(c) for c in sorted(captions, key=lambda c: c.timestamp))


@dataclass(frozen=True)
class BudgetReport:
    """What the context-budget policy did to one question's transcript."""

    policy: str  # "none" (fits) | "dedup" | "dedup+subsample" | "unbounded" (no limit known)
    captions_in: int
    captions_kept: int
    tokens_in: int  # transcript tokens before (0 when unbounded: nothing was counted)
    tokens_kept: int
    budget_tokens: int | None
    exact: bool = True  # False: the token figures are an upper bound (UTF-8 bytes), not counted

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def drop_near_duplicates(captions: Sequence[FrameCaption], threshold: float) -> list[FrameCaption]:
    """Drop each caption whose word set is >= `threshold` Jaccard-similar to the last kept one."""
    kept: list[FrameCaption] = []
    last: frozenset[str] | None = None
    for cap in captions:
        words = _words(cap.caption)
        if last is not None:
            union = len(words | last)
            similarity = len(words & last) / union if union else 1.0
            if similarity >= threshold:
                continue
        kept.append(cap)
        last = words
    return kept


def even_subsample(captions: Sequence[FrameCaption], k: int) -> list[FrameCaption]:
    """`k` captions evenly spaced over the sequence (first and last included when k >= 2)."""
    n = len(captions)
    if k >= n:
        return list(captions)
    if k <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))
    return [captions[i] for i in idx]


def fit_transcript(
    transcript: Transcript,
    budget_tokens: int | None,
    count_tokens: Callable[[str], int],
    dedup_threshold: float = 0.9,
) -> tuple[list[FrameCaption], BudgetReport]:
    """Captions of `transcript` that fit in `budget_tokens` (the policy above) + the report.

    `count_tokens(text) -> int` is the reader's tokenizer; the transcript's cost is the sum
    of its lines plus one token per newline.
    """
    captions = sorted(transcript.captions, key=lambda c: c.timestamp)
    n = len(captions)
    if budget_tokens is None:
        return captions, BudgetReport("unbounded", n, n, 0, 0, None)

    def cost(caps: Sequence[FrameCaption]) -> int:
        return sum(count_tokens(caption_line(c)) + 1 for c in caps)

    # Fast path: byte-level BPE (Qwen, GPT-2, LLaMA-3) never makes more tokens than UTF-8
    # bytes, so a transcript whose bytes fit needs no tokenizing. At 16k-token contexts this
    # is every EgoSchema question, and it keeps ~25 ms of tokenizing per question off the
    # client's event loop.
    upper_bound = sum(len(caption_line(c).encode()) + 1 for c in captions)
    if upper_bound <= budget_tokens:
        return captions, BudgetReport("none", n, n, upper_bound, upper_bound, budget_tokens,
                                      exact=False)
    tokens_in = cost(captions)
    if tokens_in <= budget_tokens:
        return captions, BudgetReport("none", n, n, tokens_in, tokens_in, budget_tokens)
    deduped = drop_near_duplicates(captions, dedup_threshold)
    tokens = cost(deduped)
    if tokens <= budget_tokens:
        return deduped, BudgetReport("dedup", n, len(deduped), tokens_in, tokens, budget_tokens)
    # Largest k whose even subsample fits: cost grows with k, so binary search.
    line_cost = [count_tokens(caption_line(c)) + 1 for c in deduped]
    index = {id(c): i for i, c in enumerate(deduped)}

    def sub_cost(k: int) -> int:
        return sum(line_cost[index[id(c)]] for c in even_subsample(deduped, k))

    lo, hi = 0, len(deduped)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sub_cost(mid) <= budget_tokens:
            lo = mid
        else:
            hi = mid - 1
    kept = even_subsample(deduped, lo)
    report = BudgetReport("dedup+subsample", n, len(kept), tokens_in, sub_cost(lo), budget_tokens)
    return kept, report
