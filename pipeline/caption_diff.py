"""What refinement changed in a caption: a word-level diff of the coarse and refined captions.

    removed, added = changed_words("a red cube left of a ball", "a blue cube left of a ball")
    # (["red"], ["blue"])

The HTML reports mark `removed` words in the coarse caption (<del>) and `added` words in the
refined one (<ins>); both come from one `difflib.SequenceMatcher` over whitespace-split words,
so what is marked is exactly this diff and nothing else.
"""

from __future__ import annotations

import difflib
import html
from dataclasses import dataclass


@dataclass(frozen=True)
class WordDiff:
    """The two captions as runs of words: (kind, words) with kind "same", "removed" (only in
    the coarse caption) or "added" (only in the refined one)."""

    coarse: list[tuple[str, list[str]]]
    refined: list[tuple[str, list[str]]]

    @property
    def changed(self) -> bool:
        return any(kind != "same" for kind, _ in self.coarse + self.refined)


def word_diff(coarse: str, refined: str) -> WordDiff:
    a, b = coarse.split(), refined.split()
    # autojunk off: with it, words frequent in long captions ("a", "the") would be ignored.
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    left: list[tuple[str, list[str]]] = []
    right: list[tuple[str, list[str]]] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            left.append(("same", a[i1:i2]))
            right.append(("same", b[j1:j2]))
            continue
        if i2 > i1:
            left.append(("removed", a[i1:i2]))
        if j2 > j1:
            right.append(("added", b[j1:j2]))
    return WordDiff(left, right)


def changed_words(coarse: str, refined: str) -> tuple[list[str], list[str]]:
    """(words only in the coarse caption, words only in the refined one), in order."""
    diff = word_diff(coarse, refined)
    removed = [w for kind, words in diff.coarse if kind == "removed" for w in words]
    added = [w for kind, words in diff.refined if kind == "added" for w in words]
    return removed, added


def _runs_html(runs: list[tuple[str, list[str]]]) -> str:
    parts = []
    for kind, words in runs:
        text = html.escape(" ".join(words))
        if kind == "removed":
            parts.append(f"<del>{text}</del>")
        elif kind == "added":
            parts.append(f"<ins>{text}</ins>")
        else:
            parts.append(text)
    return " ".join(parts)


def diff_html(coarse: str, refined: str) -> tuple[str, str]:
    """(coarse caption HTML with removed words in <del>, refined with added words in <ins>);
    all text escaped."""
    diff = word_diff(coarse, refined)
    return _runs_html(diff.coarse), _runs_html(diff.refined)
