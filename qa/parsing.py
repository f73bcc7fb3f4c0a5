"""Free-text answer parsing: a model's reply -> the index of the option it chose, or None.

Used for chain-of-thought replies and servers without structured outputs. Rules, first
hit wins (later explicit statements beat earlier ones: "A? No... the answer is C" -> C):
  1. the whole reply is a letter, maybe wrapped: "c", "(C)", "C.", "Answer: C";
  2. an explicit statement, the last one in the text: "the answer is (C)", "answer: C",
     "option c", "choice 3", "the correct option is 3";
  3. the reply starts with a letter label: "C) the man...", "C: ...", "c. ...";
  4. exactly one distinct bracketed letter anywhere: "... so (B) fits";
  5. the answer restated in words: exactly one option's text appears in the reply, or one
     option is clearly the best covered (>= 75% of its content words, by 4-letter stem,
     appear in the reply, 25 points ahead of the next option).
Anything else is None (recorded as invalid with its raw text; never a guess).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.records import OPTION_LETTERS

_LETTERS = "".join(OPTION_LETTERS)  # "ABCDE"
_N = len(OPTION_LETTERS)
_WRAPPED = re.compile(
    rf"^\W*(?:(?:final\s+)?answer\s*(?:is)?\s*[:\-]?\s*)?(?:option\s*)?[\(\[]?([{_LETTERS}])[\)\]]?\W*$",
    re.IGNORECASE,
)
# "answer is C" / "answer: (c)" / "option C" / "choice: 3". Case-sensitive on purpose: a
# lowercase letter after "answer is" counts only before punctuation or the end ("the
# answer is a man" is not A); after "option"/"choice" any case counts ("option c").
_KEY = r"(?i:answer|option|choice)s?\s*(?i:is|would\s+be)?\s*[:=]?\s*(?i:option|choice|letter)?\s*"
_EXPLICIT_LETTER = re.compile(
    _KEY + r"(?:\(([A-Ea-e])\)|\[([A-Ea-e])\]|\b([A-E])\b|\b([a-e])\b(?=\s*(?:[.),:;!]|$)))"
)
_OPTION_LOWER = re.compile(r"(?i:option|choice)\s*([a-e])\b")
_EXPLICIT_NUMBER = re.compile(
    r"(?:answer|option|choice)\s*(?:is|would\s+be)?\s*[:=]?\s*(?:option|choice|number)?\s*"
    r"[\(\[#]?([1-9])[\)\]]?(?!\d)",
    re.IGNORECASE,
)
_LEADING_LABEL = re.compile(rf"^\s*[\(\[]?([{_LETTERS}])\s*[\)\]\.:]", re.IGNORECASE)
_BRACKETED = re.compile(rf"\(([{_LETTERS}])\)|\[([{_LETTERS}])\]")


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


_STOP = frozenset("a an the is are was of to in on at and or it he she they".split())


def _stems(norm_text: str) -> frozenset[str]:
    return frozenset(w[:4] for w in norm_text.split() if w not in _STOP)


def _coverage(option: frozenset[str], reply: frozenset[str]) -> float:
    return len(option & reply) / len(option) if option else 0.0


def _letter_index(letter: str) -> int:
    return _LETTERS.index(letter.upper())


def _last_explicit(reply: str) -> int | None:
    best: tuple[int, int] | None = None  # (position, index)
    for pattern in (_EXPLICIT_LETTER, _OPTION_LOWER):
        for m in pattern.finditer(reply):
            if best is None or m.start() >= best[0]:
                best = (m.start(), _letter_index(next(g for g in m.groups() if g)))
    for m in _EXPLICIT_NUMBER.finditer(reply):
        number = int(m.group(1))
        if 1 <= number <= _N and (best is None or m.start() > best[0]):
            best = (m.start(), number - 1)
    return None if best is None else best[1]


def _restated(reply: str, options: Sequence[str]) -> int | None:
    norm_reply = _normalise(reply)
    norm_opts = [_normalise(o) for o in options]
    contained = [i for i, o in enumerate(norm_opts) if o and o in norm_reply]
    # An option that is part of a longer contained option is not a separate hit.
    contained = [
        i for i in contained
        if not any(j != i and norm_opts[i] in norm_opts[j] for j in contained)
    ]  # fmt: skip
    if len(contained) == 1:
        return contained[0]
    if contained:
        return None
    # Paraphrase: the share of each option's content words (by 4-letter stem) in the reply.
    reply_stems = _stems(norm_reply)
    cover = sorted(
        ((_coverage(_stems(o), reply_stems), i) for i, o in enumerate(norm_opts)), reverse=True
    )
    if cover and cover[0][0] >= 0.75 and (len(cover) == 1 or cover[0][0] - cover[1][0] >= 0.25):
        return cover[0][1]
    return None


def parse_answer(reply: str | None, options: Sequence[str]) -> int | None:
    """The option index (0-4) `reply` chose among `options`, or None when it cannot tell."""
    if not reply or not reply.strip():
        return None
    text = reply.strip()
    m = _WRAPPED.match(text)
    if m:
        return _letter_index(m.group(1))
    explicit = _last_explicit(text)
    if explicit is not None:
        return explicit
    m = _LEADING_LABEL.match(text)
    if m:
        return _letter_index(m.group(1))
    bracketed = {next(g for g in m.groups() if g).upper() for m in _BRACKETED.finditer(text)}
    if len(bracketed) == 1:
        return _letter_index(bracketed.pop())
    return _restated(text, options)
