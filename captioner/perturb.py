"""Pseudo-initial captions: a right caption with a few entities, attributes or relations
swapped, the training input of MM-SeR's refinement pass ("localized correction").

    import random
    from captioner.perturb import PerturbSettings, RulePerturber, WordLists

    perturber = RulePerturber(WordLists.default(), PerturbSettings())
    p = perturber.perturb("A man holding a red umbrella next to a dog.", random.Random(1))
    p.perturbed   # "A man holding a red purse next to a dog."
    p.edits       # (Edit(kind="entity", subtype="object", start=20, end=28,
                  #       original="umbrella", replacement="purse"),)
    perturber.perturb(caption, rng, kinds=["relation"], n_edits=1)   # one relation edit

A replacement always comes from the same group of interchangeable phrases (`WordLists`),
and the rules keep a perturbed caption indistinguishable from a real one by its surface:
no phrase is introduced that the caption already holds, the length stays within
`max_length_change`, the first letter keeps its case and the indefinite article before the
replaced word is fixed ("a red" -> "an orange"). `validate_edits` applies the same checks
and fixes to edits an LLM proposes (`pipeline.perturb` runs that path).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from captioner.errors import CaptionerError
from captioner.word_lists import (
    _PLURAL_CUES,
    DEFAULT_SUBTYPE,
    DEFAULT_WORD_LISTS,
    KINDS,
    Form,
    Kind,
    WordLists,
    localize,
    match_case,
    needs_an,
    phrase_key,
    pluralize,
    tokens,
)

# Also this module's API: callers import the word lists and English helpers from here.
__all__ = ["DEFAULT_WORD_LISTS", "KINDS", "Edit", "Perturbation", "PerturbSettings",
           "RulePerturber", "WordLists", "apply_edits", "check_kinds", "load_word_lists",
           "localize", "match_case", "needs_an", "phrase_key", "pluralize", "reason_category",
           "tokens", "validate_edits"]



# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One replacement: the span [start, end) of the ORIGINAL caption and its new text."""

    kind: Kind
    subtype: str  # entity: object; attribute: colour|count|size|material; relation: spatial|action
    start: int
    end: int
    original: str
    replacement: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Edit:
        try:
            return cls(
                kind=d["kind"],
                subtype=str(d["subtype"]),
                start=int(d["start"]),
                end=int(d["end"]),
                original=str(d["original"]),
                replacement=str(d["replacement"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CaptionerError(f"not an edit record ({exc!r}): {dict(d)}") from exc


@dataclass(frozen=True)
class Perturbation:
    original: str
    perturbed: str
    edits: tuple[Edit, ...]  # sorted by start
    source: str  # "rules" | "llm:<model>" | "rules (llm rejected: <reason>)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "perturbed": self.perturbed,
            "edits": [e.to_dict() for e in self.edits],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Perturbation:
        try:
            edits = tuple(Edit.from_dict(e) for e in d["edits"])
            return cls(str(d["original"]), str(d["perturbed"]), edits, str(d["source"]))
        except (KeyError, TypeError) as exc:
            raise CaptionerError(f"not a perturbation record ({exc!r})") from exc


# --- settings ---------------------------------------------------------------------------------


@dataclass
class PerturbSettings:
    """How pseudo-initial captions are made (the `train.perturb` config section)."""

    # rules: RulePerturber; llm: the reader LLM proposes edits (pipeline.perturb), checked
    # here and replaced by the rules' when they fail.
    source: Literal["rules", "llm"] = "rules"
    min_edits: int = 1
    max_edits: int = 3
    # |len(perturbed) - len(original)| / len(original) at most this: length must not give
    # a perturbed caption away.
    max_length_change: float = 0.15
    # A JSON file in the WordLists form; null: WordLists.default().
    word_lists: str | None = None
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    # Subtypes whose words may repeat in a caption (e.g. "size" in a world where two objects
    # can share one): a replacement there may name a word the caption already holds, since
    # real captions repeat them too. Elsewhere a repeat would give the perturbation away.
    repeatable: list[str] = field(default_factory=list)
    llm_temperature: float = 0.7
    llm_max_tokens: int = 256

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        where = "train.perturb"
        if self.source not in ("rules", "llm"):
            raise ValueError(f"{where}.source must be 'rules' or 'llm', got {self.source!r}")
        if self.min_edits < 1:
            raise ValueError(f"{where}.min_edits must be >= 1, got {self.min_edits}")
        if self.max_edits < self.min_edits:
            raise ValueError(
                f"{where}.max_edits must be >= min_edits ({self.min_edits}), got {self.max_edits}"
            )
        if not 0.0 <= self.max_length_change <= 1.0:
            raise ValueError(
                f"{where}.max_length_change must be in [0, 1], got {self.max_length_change}"
            )
        unknown = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or unknown or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(
                f"{where}.kinds must be distinct kinds out of {', '.join(KINDS)}, got {self.kinds}"
            )
        if self.llm_temperature < 0:
            raise ValueError(f"{where}.llm_temperature must be >= 0, got {self.llm_temperature}")
        if self.llm_max_tokens < 16:
            raise ValueError(f"{where}.llm_max_tokens must be >= 16, got {self.llm_max_tokens}")
        if self.word_lists is not None and not self.word_lists.strip():
            raise ValueError(f"{where}.word_lists must be a file path or null, got ''")


def load_word_lists(settings: PerturbSettings) -> WordLists:
    """The word lists `settings` names (the defaults when `word_lists` is null)."""
    if settings.word_lists is None:
        return WordLists.default()
    return WordLists.from_json(settings.word_lists)


def check_kinds(kinds: Sequence[str]) -> list[str]:
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be out of {', '.join(KINDS)}, got {list(kinds)}")
    return list(kinds)


# --- the rule-based perturber ---------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    start: int
    end: int
    form: Form


class RulePerturber:
    """Swaps listed phrases of a caption for others of their group (see the module doc)."""

    def __init__(self, words: WordLists, settings: PerturbSettings) -> None:
        settings.validate()
        self.words = words
        self.settings = settings

    # --- finding phrases ---------------------------------------------------------------
    def _all_matches(self, caption: str) -> list[_Match]:
        """Every listed phrase at every position (overlapping), whole words only."""
        toks = tokens(caption)
        found = []
        for i in range(len(toks)):
            for j in range(i, min(i + self.words.max_words, len(toks))):
                if j > i and not caption[toks[j - 1].end() : toks[j].start()].isspace():
                    break  # punctuation between words: no phrase spans it
                key = tuple(t.group().lower() for t in toks[i : j + 1])
                form = self.words.index.get(key)
                if form is not None and not self._is_noun_use(caption, toks, j, form):
                    form = self._number(toks, i, form)
                    found.append(_Match(toks[i].start(), toks[j].end(), form))
        return found

    def _is_noun_use(self, caption: str, toks: list[re.Match[str]], j: int, form: Form) -> bool:
        """An adjective followed by "of" is a noun here ("a glass of water"): not an attribute."""
        if form.kind != "attribute" or form.subtype == "count" or j + 1 >= len(toks):
            return False
        gap = caption[toks[j].end() : toks[j + 1].start()]
        return gap.isspace() and toks[j + 1].group().lower() == "of"

    def _number(self, toks: list[re.Match[str]], i: int, form: Form) -> Form:
        """An invariant noun ("sheep") after a count or "several" is plural."""
        if form.kind != "entity" or form.plural or i == 0:
            return form
        if toks[i - 1].group().lower() not in _PLURAL_CUES:
            return form
        variant = self.words.group(form)[form.entry][0]
        if pluralize(variant) != variant:
            return form
        return Form(form.kind, form.subtype, form.group, form.entry, True)

    def _resolved(self, caption: str, kinds: Sequence[str]) -> list[_Match]:
        """Longest phrases first, non-overlapping, then only `kinds`; in caption order.

        Overlaps are settled over all kinds before filtering, so a restricted run never
        edits a part of a longer phrase of another kind ("glass" in "wine glass")."""
        chosen: list[_Match] = []
        for m in sorted(self._all_matches(caption), key=lambda m: (m.start - m.end, m.start)):
            if all(m.end <= c.start or m.start >= c.end for c in chosen):
                chosen.append(m)
        return sorted((m for m in chosen if m.form.kind in kinds), key=lambda m: m.start)

    def candidates(
        self, caption: str, kinds: Sequence[str] | None = None
    ) -> list[tuple[int, int, str, str]]:
        """(start, end, kind, subtype) of every listed phrase found (case-insensitive, whole
        words, longest match first, non-overlapping), of `kinds` (default: settings.kinds)."""
        kinds = check_kinds(kinds if kinds is not None else self.settings.kinds)
        return [
            (m.start, m.end, m.form.kind, m.form.subtype) for m in self._resolved(caption, kinds)
        ]

    # --- replacing -------------------------------------------------------------------
    def perturb(
        self,
        caption: str,
        rng: random.Random,
        kinds: Sequence[str] | None = None,
        n_edits: int | None = None,
    ) -> Perturbation | None:
        """`n_edits` edits (default: uniform in [min_edits, max_edits]), fewer when the
        caption has fewer replaceable phrases; None when nothing can be perturbed."""
        kinds = check_kinds(kinds if kinds is not None else self.settings.kinds)
        if n_edits is not None and n_edits < 1:
            raise ValueError(f"n_edits must be >= 1, got {n_edits}")
        found = self._resolved(caption, kinds)
        if not found:
            return None
        want = n_edits or rng.randint(self.settings.min_edits, self.settings.max_edits)
        rng.shuffle(found)
        edits: list[Edit] = []
        for match in found:
            if len(edits) == want:
                break
            edit = self._replace(caption, match, edits, rng)
            if edit is not None:
                edits.append(edit)
        if not edits:
            return None
        edits.sort(key=lambda e: e.start)
        return Perturbation(caption, apply_edits(caption, edits), tuple(edits), "rules")

    def _replace(
        self, caption: str, match: _Match, chosen: list[Edit], rng: random.Random
    ) -> Edit | None:
        """An edit of `match` by another entry of its group that keeps every rule, or None."""
        form = match.form
        present = _ngrams(apply_edits(caption, chosen), self.words.max_words)
        budget = self.settings.max_length_change * len(caption)
        used = sum(len(e.replacement) - len(e.original) for e in chosen)
        options: list[list[Edit]] = []
        for e, variants in enumerate(self.words.group(form)):
            repeats = form.subtype not in self.settings.repeatable and any(
                phrase_key(text) in present for text, _ in self.words.forms(form.kind, variants)
            )
            if e == form.entry or repeats:
                continue  # the same meaning, or one the caption already names
            edits = []
            for variant in variants:
                text = pluralize(variant) if form.plural else variant
                start, original, replacement = localize(caption, match.start, match.end, text)
                edit = Edit(form.kind, form.subtype, start, match.end, original, replacement)  # type: ignore[arg-type]
                if abs(used + len(replacement) - len(original)) <= budget and not _overlaps(
                    edit, chosen
                ):
                    edits.append(edit)
            if edits:
                options.append(edits)
        return rng.choice(rng.choice(options)) if options else None


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Every word sequence of up to `n` words in `text` (lower case)."""
    words = [t.group().lower() for t in tokens(text)]
    return {tuple(words[i : i + k]) for i in range(len(words)) for k in range(1, n + 1)}


def _overlaps(edit: Edit, others: Sequence[Edit]) -> bool:
    return any(edit.start < o.end and o.start < edit.end for o in others)


# --- applying and validating edits ------------------------------------------------------------


def apply_edits(caption: str, edits: Sequence[Edit]) -> str:
    """`caption` with every edit applied (non-overlapping spans, applied right to left)."""
    ordered = sorted(edits, key=lambda e: e.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.end:
            raise CaptionerError(f"edits overlap: {a} and {b}")
    out = caption
    for edit in reversed(ordered):
        if caption[edit.start : edit.end] != edit.original:
            raise CaptionerError(
                f"edit {edit} does not match the caption: span holds "
                f"{caption[edit.start : edit.end]!r}"
            )
        out = out[: edit.start] + edit.replacement + out[edit.end :]
    return out


def reason_category(reason: str) -> str:
    """The category of a rejection reason ("not found: edit 2 ..." -> "not found")."""
    return reason.split(":", 1)[0]


def validate_edits(
    caption: str,
    proposed: Sequence[Mapping[str, Any]],
    settings: PerturbSettings,
    words: WordLists | None = None,
) -> tuple[list[Edit], str | None]:
    """Edits as an LLM proposes them ({"kind", "original", "replacement"} + optional
    "subtype") -> (edits, None) when valid, ([], reason) when not.

    Each `original` is looked up in the caption (whole words; exact case first; the first
    occurrence no earlier edit uses becomes its span); the replacement gets the first
    letter's case and the article fix of the rules. A reason reads "<category>: <detail>".
    """
    if not isinstance(proposed, (list, tuple)) or not proposed:
        return [], f"no edits: got {proposed!r}"
    if len(proposed) > settings.max_edits:
        return [], f"too many edits: {len(proposed)} > max_edits {settings.max_edits}"
    edits: list[Edit] = []
    for number, item in enumerate(proposed, 1):
        edit = _proposed_edit(caption, item, number, settings, words, edits)
        if isinstance(edit, str):
            return [], edit
        edits.append(edit)
    change = abs(sum(len(e.replacement) - len(e.original) for e in edits))
    if change > settings.max_length_change * len(caption):
        return [], (
            f"length change: {change} characters is {change / max(len(caption), 1):.0%} of "
            f"the caption > max_length_change {settings.max_length_change:.0%}"
        )
    edits.sort(key=lambda e: e.start)
    if apply_edits(caption, edits) == caption:
        return [], "no change: the edits leave the caption as it was"
    return edits, None


def _proposed_edit(
    caption: str,
    item: object,
    number: int,
    settings: PerturbSettings,
    words: WordLists | None,
    taken: list[Edit],
) -> Edit | str:
    """One proposed edit checked and placed, or the reason it is rejected."""
    fields = ("kind", "original", "replacement")
    if not isinstance(item, Mapping) or not all(isinstance(item.get(f), str) for f in fields):
        return f"malformed edit: edit {number} needs string fields {fields}, got {item!r}"
    kind, original, replacement = (item[f].strip() for f in fields)
    if kind not in settings.kinds:
        return f"unknown kind: edit {number} kind {kind!r} is not one of {settings.kinds}"
    if not original or not replacement:
        return f"empty phrase: edit {number} {original!r} -> {replacement!r}"
    if original.lower() == replacement.lower():
        return f"identical replacement: edit {number} {original!r} -> {replacement!r}"
    spans = _occurrences(caption, original)
    if not spans:
        return f"not found: edit {number} original {original!r} is not in the caption"
    for start, end in spans:
        at, old, new = localize(caption, start, end, replacement)
        edit = Edit(kind, _subtype(item, kind, original, words), at, end, old, new)  # type: ignore[arg-type]
        if not _overlaps(edit, taken):
            return edit
    return f"overlap: edit {number} {original!r} overlaps another edit"


def _occurrences(caption: str, phrase: str) -> list[tuple[int, int]]:
    """Whole-word spans of `phrase`: exact-case ones, else case-insensitive ones."""
    pattern = r"(?<![\w'’-])" + re.escape(phrase) + r"(?![\w'’-])"
    for flags in (0, re.IGNORECASE):
        spans = [m.span() for m in re.finditer(pattern, caption, flags)]
        if spans:
            return spans
    return []


def _subtype(item: Mapping[str, Any], kind: str, original: str, words: WordLists | None) -> str:
    """The proposal's own subtype, else the word lists', else the kind's default."""
    given = item.get("subtype")
    if isinstance(given, str) and given.strip():
        return given.strip()
    form = words.index.get(phrase_key(original)) if words is not None else None
    if form is not None and form.kind == kind:
        return form.subtype
    return DEFAULT_SUBTYPE[kind]
