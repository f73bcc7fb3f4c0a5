"""Transcript -> prompt text: the caption digest, the context budget, and the line styles.

Line styles:
  timed  ours: one `{seconds}: {caption}` line per caption in time order (LLoVi's NeXT-QA
         form); with the digest, a run of consecutive captions that say the same thing is
         one line with its time range, `12-19: a red circle on a grey background`.
  llovi  LLoVi's EgoSchema form (CeeZh/LLoVi dataset.py): the captions' texts joined by
         ". ", untimed, no digest.

One mechanism, the digest, merges a run of consecutive captions into one line when each is
`similarity`-close (word-set Jaccard) to the run's first, or identical after normalisation
(lower case, punctuation and extra spaces removed). Our templates apply it at
`reader.digest_similarity` (1.0: only identical captions merge, so every distinct caption
stays in the prompt) whenever `reader.digest` is on.

Budget policy (only when the lines do not fit the context; always recorded):
  1. `digest`: merge near-duplicates at `reader.dedup_threshold` (long static stretches say
     almost the same thing), keeping the first caption of each run;
  2. `subsample`: keep the largest number of lines, evenly spaced in time, that fits.
Never a silent cut: `BudgetReport` says what was done; never a crash: in the worst case
zero lines are kept and the report says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from qa.records import FrameCaption, Transcript

_WORD = re.compile(r"\w+")
LineStyle = Literal["timed", "llovi"]


def format_seconds(t: float) -> str:
    """12.0 -> '12', 12.34 -> '12.3' (LLoVi writes whole seconds at 1 fps)."""
    r = round(float(t), 1)
    return str(int(r)) if r == int(r) else f"{r:.1f}"


def normalise(text: str) -> str:
    """What makes two captions "the same": lower case, words only, single spaces."""
    return " ".join(_WORD.findall(text.lower()))


@dataclass(frozen=True)
class TranscriptLine:
    """One prompt line: a caption, or a run of consecutive captions that say the same."""

    start: float
    end: float
    text: str
    count: int = 1  # captions merged into this line

    def render(self) -> str:
        text = " ".join(self.text.split())
        if self.count > 1 and format_seconds(self.end) != format_seconds(self.start):
            return f"{format_seconds(self.start)}-{format_seconds(self.end)}: {text}"
        return f"{format_seconds(self.start)}: {text}"


def caption_line(caption: FrameCaption) -> str:
    return TranscriptLine(caption.timestamp, caption.timestamp, caption.caption).render()


def format_captions(captions: Sequence[FrameCaption]) -> str:
    """One `{seconds}: {caption}` line per caption, sorted by time (no digest)."""
    return "\n".join(caption_line(c) for c in sorted(captions, key=lambda c: c.timestamp))


def render_lines(lines: Sequence[TranscriptLine], style: LineStyle = "timed") -> str:
    if style == "llovi":
        return ". ".join(" ".join(line.text.split()) for line in lines)
    return "\n".join(line.render() for line in lines)


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def _similar(a: str, b: str, words_a: frozenset[str], words_b: frozenset[str],
             threshold: float) -> bool:
    if normalise(a) == normalise(b):
        return True
    union = len(words_a | words_b)
    return (len(words_a & words_b) / union if union else 1.0) >= threshold


def digest(captions: Sequence[FrameCaption], similarity: float = 1.0) -> list[TranscriptLine]:
    """Consecutive captions merged into lines: a caption joins the current run when it is
    identical to the run's first after normalisation or word-set-Jaccard >= `similarity`
    to it (1.0: identical word sets). The line keeps the run's first caption's text."""
    lines: list[TranscriptLine] = []
    first: FrameCaption | None = None
    first_words: frozenset[str] = frozenset()
    for cap in sorted(captions, key=lambda c: c.timestamp):
        words = _words(cap.caption)
        if first is not None and _similar(first.caption, cap.caption, first_words, words,
                                          similarity):
            last = lines[-1]
            lines[-1] = TranscriptLine(last.start, cap.timestamp, last.text, last.count + 1)
            continue
        first, first_words = cap, words
        lines.append(TranscriptLine(cap.timestamp, cap.timestamp, cap.caption))
    return lines


def undigested(captions: Sequence[FrameCaption]) -> list[TranscriptLine]:
    return [TranscriptLine(c.timestamp, c.timestamp, c.caption)
            for c in sorted(captions, key=lambda c: c.timestamp)]


@dataclass(frozen=True)
class BudgetReport:
    """What the digest and the context-budget policy did to one question's transcript."""

    # "none" (fits) | "digest" (near-duplicates merged to fit) | "digest+subsample" |
    # "subsample" (no digest allowed: LLoVi's templates) | "unbounded" (no limit known)
    policy: str
    captions_in: int
    captions_kept: int  # captions still represented by a line
    tokens_in: int  # tokens of the lines before the budget policy (0 when unbounded)
    tokens_kept: int
    budget_tokens: int | None
    exact: bool = True  # False: the token figures are an upper bound (UTF-8 bytes), not counted
    lines_in: int = 0  # lines after the digest, before the budget policy
    lines_out: int = 0  # lines in the prompt
    digest: bool = False  # the default digest was applied

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def even_subsample(items: Sequence, k: int) -> list:
    """`k` items evenly spaced over the sequence (first and last included when k >= 2)."""
    n = len(items)
    if k >= n:
        return list(items)
    if k <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))
    return [items[i] for i in idx]


def fit_transcript(
    transcript: Transcript,
    budget_tokens: int | None,
    count_tokens: Callable[[str], int],
    dedup_threshold: float = 0.9,
    digest_similarity: float | None = 1.0,
    style: LineStyle = "timed",
) -> tuple[list[TranscriptLine], BudgetReport]:
    """The lines of `transcript` that fit in `budget_tokens` (the policy above) + the report.

    `digest_similarity` None: no digest at all (LLoVi's templates: over budget they are only
    subsampled). `count_tokens(text) -> int` is the reader's tokenizer; a transcript costs
    the sum of its lines plus one token per separator.
    """
    captions = sorted(transcript.captions, key=lambda c: c.timestamp)
    n = len(captions)
    digested = digest_similarity is not None
    lines = digest(captions, digest_similarity) if digested else undigested(captions)

    def report(policy: str, kept: Sequence[TranscriptLine], tokens_in: int, tokens_kept: int,
               exact: bool = True) -> BudgetReport:
        return BudgetReport(policy, n, sum(line.count for line in kept), tokens_in, tokens_kept,
                            budget_tokens, exact, len(lines), len(kept), digested)

    if budget_tokens is None:
        return lines, report("unbounded", lines, 0, 0)

    def line_text(line: TranscriptLine) -> str:
        return line.text if style == "llovi" else line.render()

    sep = 1 if style == "timed" else 2  # "\n", or ". ": at most one token per byte

    def cost(kept: Sequence[TranscriptLine]) -> int:
        return sum(count_tokens(line_text(line)) + sep for line in kept)

    # Fast path: byte-level BPE (Qwen, GPT-2, LLaMA-3) never makes more tokens than UTF-8
    # bytes, so lines whose bytes fit need no tokenizing. At 16k-token contexts this is
    # every EgoSchema question, and it keeps ~25 ms of tokenizing per question off the
    # client's event loop.
    upper_bound = sum(len(line_text(line).encode()) + sep for line in lines)
    if upper_bound <= budget_tokens:
        return lines, report("none", lines, upper_bound, upper_bound, exact=False)
    tokens_in = cost(lines)
    if tokens_in <= budget_tokens:
        return lines, report("none", lines, tokens_in, tokens_in)
    policy = "subsample"
    if digested:
        merged = digest(captions, min(dedup_threshold, digest_similarity or 1.0))
        tokens = cost(merged)
        if tokens <= budget_tokens:
            return merged, report("digest", merged, tokens_in, tokens)
        lines_left, policy = merged, "digest+subsample"
    else:
        lines_left = lines
    # Largest k whose even subsample fits: cost grows with k, so binary search.
    line_cost = [count_tokens(line_text(line)) + sep for line in lines_left]

    def sub_cost(k: int) -> int:
        return sum(line_cost[i] for i in even_subsample(range(len(lines_left)), k))

    lo, hi = 0, len(lines_left)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sub_cost(mid) <= budget_tokens:
            lo = mid
        else:
            hi = mid - 1
    kept = [lines_left[i] for i in even_subsample(range(len(lines_left)), lo)]
    return kept, report(policy, kept, tokens_in, sub_cost(lo))
