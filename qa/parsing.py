"""Free-text answer parsing: a model's reply -> the index of the option it chose, or None.

Used for chain-of-thought replies and servers without structured outputs. Labels are read
in the prompt's own numbering (`numbering`): "letters" = A-E (every prompt in qa/prompts.py
and LLoVi's), "zero" = 0-4, "one" = 1-5. A label of the other kind is not a guess we make:
"option 3" under letters (or "C" under numbers) is invalid. Rules, in priority order:
  1. the whole reply is one label, maybe wrapped: "c", "(C)", "C.", "**C**", "Answer: C";
  2. explicit statements, the LAST one wins (self-correction: "A. Wait, no: the answer is
     C" -> C), and any explicit statement beats every rule below and any bare mention
     ("the answer is (C), unlike option E" -> C). Statements are: a JSON object with an
     answer key ({"answer": "C"}, {"option": 2}, also inside a ```json fence or with extra
     keys), LaTeX \\boxed{C}, "the answer is (C)", "answer: C", "final answer: C", "the
     correct option is C", "I choose option C", "option C is correct". A statement naming
     two labels ("A or C", "B and D", "either A or B") or a label outside the numbering
     decides None; it does not fall through to the rules below;
  3. the reply starts with a label: "C) the man...", "C: ...", "c. ..." -- unless the reply
     is an enumerated list, names a second label ("(A) or (B)"), rejects it ("(A) is
     wrong") or restates another option's text word for word;
  4. the answer restated in words: exactly one option's text appears in the reply, or one
     option is clearly the best covered (>= 75% of its content words, by 4-letter stem,
     appear in the reply, 25 points ahead of the next option).
Markdown emphasis (**, __, *, _x_), backticks and `$`/`\\text{}` are blanked first. A bare
"A"/"a" counts as a label only where it cannot be the article ("A man picks up a knife" is
not option A). Anything else is None (recorded as invalid with its raw text; never a guess).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Literal

from qa.records import OPTION_LETTERS

Numbering = Literal["letters", "zero", "one"]
NUMBERINGS: tuple[Numbering, ...] = ("letters", "zero", "one")

_LETTERS = "".join(OPTION_LETTERS)  # "ABCDE"
_N = len(OPTION_LETTERS)

# Hand-written regexes throughout: no library reads a multiple-choice answer from free text.

# Emphasis and markup, blanked with spaces of the same length so that positions found in
# the cleaned text still order statements against JSON objects found in the raw text.
_MARKUP = re.compile(r"\*+|`+|\$+|(?<!\w)_+|_+(?!\w)")
_LATEX_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mathtt|texttt)\s*\{([^{}]*)\}")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{([^{}]*)\}")

# One label at a position: "(C)", "[c]", "C", "option 3", "#2". The letter group is
# narrowed by `_letter_is_label` (article "a", lowercase letters in prose).
_TOKEN = re.compile(
    r"[\s\"'“”‘’]*(?:(?i:either)\s+)?(?:(?i:option|choice|letter|number|no\.)\s*)?#?\s*"
    r"(?:[(\[]\s*(?P<br>[A-Za-z]|\d+)\s*[)\]]"
    r"|(?P<let>[A-Ea-e])(?![-'’]?\w)(?!\.(?:[a-z]|[A-Za-z]\.))"
    r"|(?P<num>\d+)(?!\w)(?!\.\d)"
    r"(?!\s*(?:%|(?i:s|secs?|seconds?|mins?|minutes?|hours?|frames?|fps|times?)\b)))"
)
# After a bare "A" or lowercase letter: what makes it a label rather than a word.
_AFTER_LABEL = re.compile(
    r"\s*(?:$|\n|[^\w\s]|(?i:because|since|as|so|which|given|for|due|or|and|nor)\b)"
)
_CONJ = re.compile(
    r"\s*(?:,\s*)?(?:(?i:or|and|nor)\b|/|&|\+|,|(?=[(\[]))"  # "(C)(D)" names two as well
    r"\s*(?:(?i:maybe|possibly|perhaps|also)\s+)?"
)

# Explicit statements that put the label after a key ("the answer is", "I choose"). Each
# alternative ends where the label starts.
_KEY = re.compile(
    r"(?i)\b(?:"
    r"answer[\"']?\s*(?:(?:is|would\s+be|will\s+be|should\s+be|must\s+be)\b\s*[:\-–—]?"
    r"|[:=\-–—])"
    # "final answer (C)" needs no colon or "is"; "to answer (A) we need..." is no statement.
    r"|final\s+answer\b[\"']?\s*(?:(?:is|would\s+be|will\s+be)\b\s*)?[:=\-–—]?"
    # "Option: C" opens a line or a JSON-ish field; "each option: A says..." is prose.
    r"|(?<![\w ])(?:option|choice)[\"']?\s*[:=]"
    r"|(?:correct|right|best|final|chosen|selected|my|most\s+likely)\s+(?:option|choice|letter)"
    r"\s*(?:is|would\s+be|will\s+be|:)\s*:?"
    r"|(?:I|we)(?:['’](?:d|ll|m)|\s+(?:would|will|shall|should|must|am|are))?"
    r"(?:\s+(?:then|therefore|thus|now|finally|going\s+to))?"
    r"\s+(?:choose|chose|pick|picked|select|selected|go\s+with|going\s+with|opt\s+for)\b"
    r")"
)
# Statements that put the label first: "option C is correct", "(B) is the answer". A bare
# label here must be uppercase (or bracketed, or after "option") so prose is not read.
_POSTFIX = re.compile(
    r"(?:(?P<opt>\b(?i:option|choice|letter))\s*)?"
    r"(?:[(\[]\s*(?P<br>[A-Za-z]|\d+)\s*[)\]]|\b(?P<tok>[A-Za-z]|\d+)\b)"
    r"\s+(?i:is)\s+(?:(?i:the)\s+)?"
    r"(?:(?i:correct|right|best|most\s+likely|most\s+appropriate)\s+(?i:answer|option|choice)\b"
    r"|(?i:answer|correct|right)\b(?=\s*(?:$|[.,;:!)\n]|(?i:because|since|as|here)\b)))"
)
_EITHER = re.compile(r"\b(?i:either)\s+")
# Conditional or questioning context: "if the answer is B", "whether B is correct".
_HEDGE = re.compile(
    r"(?i)\b(?:if|whether|unless|suppose|supposing|assume|assuming|why|not)\s+"
    r"(?:(?:the|my|our|final|correct|right|best|option|choice)\s+)*$"
)

_WHOLE = re.compile(
    r"(?i)[\W_]*"
    r"(?:(?:the\s+)?(?:(?:final|correct|best|right)\s+)?(?:answer|option|choice|letter)"
    r"\s*(?:is\b|would\s+be\b)?\s*[:=\-]?\s*)?"
    r"(?:(?:option|choice|letter)\s*)?"
    r"[(\[]?\s*(?P<tok>[A-E]|\d+)\s*[)\]]?"
    r"[\W_]*"
)
_LEAD = re.compile(
    r"\s*(?:[(\[]\s*(?P<b>[A-Ea-e]|\d)\s*[)\]]"
    r"|(?P<p>[A-Ea-e]|\d)\s*(?:[):]|\.(?![A-Za-z]\.|[a-z]|\d))"
    r"|(?P<d>[A-E]|\d)\s+[-–—]\s"
    r"|(?P<n>[A-Ea-e])[ \t]*(?=\n))"
)

# After a leading label: the reply rejects that option ("(A) is wrong", "C) no, ...").
_REJECTED = re.compile(
    r"(?i)\s*(?:[-–—:,]\s*)?(?:(?:is|seems|looks|was)\s+(?:wrong|incorrect|not|unlikely|false)"
    r"|(?:no|not|wrong|incorrect|false)\b)"
)

_JSON_KEYS = frozenset(
    "answer final_answer correct_answer option choice correct_option selected_option "
    "letter answer_letter".split()
)


def _resolve(token: str, numbering: Numbering, n: int) -> int | None:
    """A label -> option index in the prompt's numbering; None when it is not one of ours."""
    if token.isdigit():
        if numbering == "letters":  # "option 3" under A-E labels: the 3rd option or index 3?
            return None
        k = int(token) - (1 if numbering == "one" else 0)
        return k if 0 <= k < n else None
    if numbering != "letters":  # "C" under 0-4 labels means nothing the prompt defined
        return None
    k = _LETTERS.find(token.upper())
    return k if 0 <= k < min(n, _N) else None


def _letter_is_label(text: str, m: re.Match[str]) -> bool:
    """A bare letter is a label unless it can be a word: "A man", "the answer is a man"."""
    letter = m.group("let")
    if letter in "BCDE":
        return True
    return _AFTER_LABEL.match(text, m.end()) is not None


def _token_at(text: str, pos: int) -> tuple[str, int, int] | None:
    """(label, start, end) of the label at `pos`, or None when no label starts there."""
    m = _TOKEN.match(text, pos)
    if m is None or (m.group("let") and not _letter_is_label(text, m)):
        return None
    name = next(g for g in ("br", "let", "num") if m.group(g))
    return m.group(name), m.start(name), m.end()


def _names_another(text: str, token: str, end: int) -> bool:
    """Whether a conjunction and a second, different label of the same kind follow."""
    conj = _CONJ.match(text, end)
    if conj is None:
        return False
    second = _token_at(text, conj.end())
    return (
        second is not None
        and second[0].isdigit() == token.isdigit()
        and second[0].upper() != token.upper()
    )


def _value_at(
    text: str, pos: int, numbering: Numbering, n: int
) -> tuple[int, int | None, bool] | None:
    """(position, index or None when invalid, named two labels) of the value at `pos`."""
    found = _token_at(text, pos)
    if found is None:
        return None
    token, start, end = found
    if _names_another(text, token, end):
        return start, None, True
    return start, _resolve(token, numbering, n), False


def _hedged(text: str, start: int) -> bool:
    return _HEDGE.search(text, max(0, start - 40), start) is not None


def _unwrap(m: re.Match[str]) -> str:
    return " " * (m.start(1) - m.start()) + m.group(1) + " "


def _clean(text: str) -> str:
    """Markup blanked with spaces, length kept: `\\text{C}` -> `      C `, `**C**` -> `  C  `."""
    while (unwrapped := _LATEX_WRAP.sub(_unwrap, text)) != text:  # nested \text{\textbf{C}}
        text = unwrapped
    return _MARKUP.sub(lambda m: " " * len(m.group()), text)


def _json_statements(
    text: str, options: Sequence[str], numbering: Numbering
) -> tuple[list[tuple[int, int | None]], str]:
    """Answers from JSON objects with an answer key, and the text with those objects blanked
    (their "reason" strings must not be read as later statements)."""
    decoder = json.JSONDecoder()
    found: list[tuple[int, int | None]] = []
    masked = text
    pos = text.find("{")
    while pos != -1:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        keys = [k for k in obj if k.lower() in _JSON_KEYS] if isinstance(obj, dict) else []
        if keys:
            values = {_json_value(obj[k], options, numbering) for k in keys}
            # Two answer keys that disagree (or one unreadable) decide nothing.
            found.append((pos, values.pop() if len(values) == 1 else None))
            masked = masked[:pos] + " " * (end - pos) + masked[end:]
        pos = text.find("{", end)
    return found, masked


def _json_value(value: object, options: Sequence[str], numbering: Numbering) -> int | None:
    if isinstance(value, bool):  # bool is an int subclass: true is not option 1
        return None
    if isinstance(value, int):
        return _resolve(str(value), numbering, len(options) or _N) if value >= 0 else None
    if isinstance(value, str):
        return _parse(value, options, numbering, read_json=False)
    return None


def _text_statements(
    text: str, options: Sequence[str], numbering: Numbering
) -> list[tuple[int, int | None]]:
    """(position, index or None) of every explicit statement in the cleaned text."""
    n = len(options) or _N
    found: list[tuple[int, int | None]] = []
    for m in _KEY.finditer(text):
        if _hedged(text, m.start()):
            continue
        value = _value_at(text, m.end(), numbering, n)
        if value is not None:
            found.append(value[:2])
    for m in _POSTFIX.finditer(text):
        token = m.group("br") or m.group("tok")
        # Unbracketed and without "option", only an uppercase letter is a label here: "a is
        # right" or "3 is correct" in prose is a word or a count.
        if m.group("tok") and not m.group("opt") and token not in _LETTERS:
            continue
        if not _hedged(text, m.start()):
            found.append((m.start(), _resolve(token, numbering, n)))
    for m in _EITHER.finditer(text):
        value = _value_at(text, m.end(), numbering, n)
        if value is not None and value[2]:  # only "either A or B" is a statement
            found.append(value[:2])
    for m in _BOXED.finditer(text):
        inner = m.group(1).strip()
        found.append((m.start(), _parse(inner, options, numbering, read_json=False)))
    return found


def _label_opening(line: str, numbering: Numbering) -> re.Match[str] | None:
    """The label `line` opens with, when it is of the prompt's kind ("1. First, ..." under
    letters is a step list, "C) ..." under numbers is no label the prompt defined)."""
    m = _LEAD.match(line)
    if m is None or _lead_token(m).isdigit() == (numbering == "letters"):
        return None
    return m


def _lead_token(m: re.Match[str]) -> str:
    return next(g for g in m.groups() if g)  # the one alternative of _LEAD that matched


def _leading_label(
    text: str, options: Sequence[str], numbering: Numbering
) -> tuple[bool, int | None]:
    """(decided, index) for a reply that opens with a label ("C) the man..."). Decided with
    None when the label is doubtful: a second label follows ("(A) or (B)"), the reply
    rejects it ("(A) is wrong") or restates another option's text word for word. Not
    decided (the next rule reads it) when there is no label or the reply is an enumerated
    list of options."""
    m = _label_opening(text, numbering)
    if m is None:
        return False, None
    openings = {
        _lead_token(o).upper()
        for line in text.splitlines()
        if (o := _label_opening(line, numbering))
    }
    if len(openings) > 1:  # "A. ... no\nB. ... no\nC. ... yes": the first is not the answer
        return False, None
    token = _lead_token(m)
    if _names_another(text, token, m.end()) or _REJECTED.match(text, m.end()):
        return True, None
    index = _resolve(token, numbering, len(options) or _N)
    contained = _contained(text, options)
    if contained is not None and contained != index:
        return True, None
    return True, index


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


_STOP = frozenset("a an the is are was of to in on at and or it he she they".split())


def _stems(norm_text: str) -> frozenset[str]:
    return frozenset(w[:4] for w in norm_text.split() if w not in _STOP)


def _coverage(option: frozenset[str], reply: frozenset[str]) -> float:
    return len(option & reply) / len(option) if option else 0.0


def _contained_all(norm_reply: str, norm_opts: list[str]) -> list[int]:
    contained = [i for i, o in enumerate(norm_opts) if o and o in norm_reply]
    # An option that is part of a longer contained option is not a separate hit.
    return [
        i for i in contained
        if not any(j != i and norm_opts[i] in norm_opts[j] for j in contained)
    ]  # fmt: skip


def _contained(reply: str, options: Sequence[str]) -> int | None:
    hits = _contained_all(_normalise(reply), [_normalise(o) for o in options])
    return hits[0] if len(hits) == 1 else None


def _restated(reply: str, options: Sequence[str]) -> int | None:
    norm_reply = _normalise(reply)
    norm_opts = [_normalise(o) for o in options]
    contained = _contained_all(norm_reply, norm_opts)
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


def _parse(
    reply: str, options: Sequence[str], numbering: Numbering, *, read_json: bool
) -> int | None:
    if not reply.strip():
        return None
    statements: list[tuple[int, int | None]] = []
    masked = reply
    if read_json:
        statements, masked = _json_statements(reply, options, numbering)
    text = _clean(masked)
    whole = None if statements else _WHOLE.fullmatch(text.strip())
    if whole:  # nothing else in the reply can contradict it
        return _resolve(whole.group("tok"), numbering, len(options) or _N)
    statements += _text_statements(text, options, numbering)
    if statements:  # the last explicit statement decides, even when it decides None
        return max(statements, key=lambda s: s[0])[1]
    decided, index = _leading_label(text, options, numbering)
    if decided:
        return index
    return _restated(text, options)


def parse_answer(
    reply: str | None, options: Sequence[str], *, numbering: Numbering = "letters"
) -> int | None:
    """The option index (0-based) `reply` chose among `options`, or None when it cannot tell.

    `numbering` is how the prompt labelled the options: "letters" (A-E), "zero" (0-4) or
    "one" (1-5); labels of the other kind are invalid rather than guessed.
    """
    if numbering not in NUMBERINGS:
        raise ValueError(f"numbering must be one of {', '.join(NUMBERINGS)}, got {numbering!r}")
    if not reply:
        return None
    return _parse(reply, options, numbering, read_json=True)
