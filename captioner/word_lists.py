"""The interchangeable phrases perturbations swap (`WordLists`: kind -> subtype -> groups)
and the English helpers that keep a swap looking like a real caption (plurals, "a"/"an",
case, where a phrase sits)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from captioner.errors import CaptionerError

Kind = Literal["entity", "attribute", "relation"]
KINDS: tuple[str, ...] = ("entity", "attribute", "relation")
# The subtype an LLM edit gets when its phrase is in no word list.
DEFAULT_SUBTYPE = {"entity": "object", "attribute": "other", "relation": "other"}
VARIANT_SEPARATOR = "|"  # "big|large": one meaning, never swapped for each other



# --- English helpers -------------------------------------------------------------------------

# A word: letters/digits, with inner hyphens or apostrophes ("t-shirt", "dog's") kept whole,
# so a listed word never matches inside a compound.
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_ARTICLE_BEFORE = re.compile(r"(?<![\w'’-])(an?)(\s+)$", re.IGNORECASE)
_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "child": "children", "person": "people",
    "mouse": "mice", "foot": "feet", "tooth": "teeth", "goose": "geese",
    "sheep": "sheep", "deer": "deer", "fish": "fish", "ox": "oxen",
    "knife": "knives", "leaf": "leaves", "shelf": "shelves", "wolf": "wolves",
    "scarf": "scarves", "loaf": "loaves", "calf": "calves", "wife": "wives",
    "policeman": "policemen", "fireman": "firemen", "snowman": "snowmen",
    "tomato": "tomatoes", "potato": "potatoes", "hero": "heroes", "volcano": "volcanoes",
}  # fmt: skip
# Words before an entity that make an invariant noun ("two sheep") plural.
_PLURAL_CUES = frozenset(
    "two three four five six seven eight nine ten several many some few multiple these "
    "those both".split()
)
_CONSONANT_SOUND_VOWELS = ("uni", "use", "usu", "uti", "eu", "ewe", "one", "once")
_VOWEL_SOUND_H = ("hour", "honest", "honor", "honour", "heir")


def tokens(text: str) -> list[re.Match[str]]:
    return list(_WORD.finditer(text))


def phrase_key(phrase: str) -> tuple[str, ...]:
    """The case-free word sequence a phrase is matched by."""
    return tuple(m.group().lower() for m in _WORD.finditer(phrase))


def pluralize(phrase: str) -> str:
    """The plural of a noun phrase (its last word): dog -> dogs, bus -> buses, man -> men."""
    head, _, word = phrase.rpartition(" ")
    lower = word.lower()
    if lower in _IRREGULAR_PLURALS:
        plural = match_case(word, _IRREGULAR_PLURALS[lower])
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        plural = word + "es"
    elif len(lower) > 1 and lower.endswith("y") and lower[-2] not in "aeiou":
        plural = word[:-1] + "ies"
    else:
        plural = word + "s"
    return f"{head} {plural}" if head else plural


def needs_an(phrase: str) -> bool:
    """Whether the indefinite article before `phrase` is "an" (by its first sound)."""
    words = phrase_key(phrase)
    if not words:
        return False
    word = words[0]
    if word.startswith(_VOWEL_SOUND_H):
        return True
    if word.startswith(_CONSONANT_SOUND_VOWELS):
        return False
    return word[0] in "aeiou"


def match_case(original: str, replacement: str) -> str:
    """`replacement` with the case of `original`'s first letter (ALL CAPS kept as such)."""
    if not original or not replacement:
        return replacement
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[0].isupper():
        return replacement[0].upper() + replacement[1:]
    if original[0].islower() and replacement[:2].istitle():
        return replacement[0].lower() + replacement[1:]  # "Cat" mid-sentence -> "cat"
    return replacement


def localize(caption: str, start: int, end: int, replacement: str) -> tuple[int, str, str]:
    """(start, original, replacement) of replacing caption[start:end], with the first
    letter's case kept and a preceding "a"/"an" taken into the edit when it must change."""
    original = caption[start:end]
    replacement = match_case(original, replacement)
    article = _ARTICLE_BEFORE.search(caption, 0, start)
    if article is None or not replacement:
        return start, original, replacement
    wanted = "an" if needs_an(replacement) else "a"
    if wanted == article.group(1).lower():
        return start, original, replacement
    new_article = match_case(article.group(1), wanted)
    return (
        article.start(),
        caption[article.start() : end],
        new_article + article.group(2) + replacement,
    )


# --- word lists ------------------------------------------------------------------------------

# kind -> subtype -> groups -> entries. An entry "a|b" is one meaning written two ways.
# A subtype is a list of entries (one group) or a list of groups: a replacement comes from
# the group of the phrase it replaces, so a dog becomes a cat, not a sandwich. Words that
# include another word of their group (person > man, computer > laptop, holding <
# carrying) are left out or merged into one entry: swapping them would not be an error.
DEFAULT_WORD_LISTS: dict[str, dict[str, list[Any]]] = {
    "entity": {
        "object": [
            ["man", "woman", "boy", "girl", "baby"],
            ["player", "skier", "surfer", "skateboarder", "chef", "police officer|policeman",
             "soldier", "doctor"],
            ["dog|puppy", "cat|kitten", "horse", "cow", "sheep", "elephant", "giraffe",
             "zebra", "bear", "bird", "goat", "pig", "lion", "tiger", "monkey",
             "deer", "rabbit", "squirrel"],
            ["car", "truck", "bus", "train", "bicycle|bike", "motorcycle|motorbike", "boat",
             "airplane|plane|jet", "van", "scooter", "tractor"],
            ["pizza", "sandwich", "cake", "donut|doughnut", "banana", "apple", "carrot",
             "hot dog", "pear", "burger|hamburger", "salad", "cookie", "egg", "tomato",
             "potato"],
            ["table", "chair", "couch|sofa", "bed", "bench", "desk", "shelf", "cabinet",
             "lamp", "television|tv", "laptop", "keyboard",
             "phone|cell phone|cellphone|smartphone|mobile phone", "book", "clock", "vase",
             "bottle", "cup|mug", "bowl", "plate", "knife", "fork", "spoon",
             "remote|remote control", "umbrella", "handbag|purse", "backpack",
             "suitcase"],
            ["frisbee", "kite", "surfboard", "skateboard", "snowboard", "ball",
             "tennis racket|racket|racquet", "baseball bat", "baseball glove|glove"],
            ["shirt|t-shirt", "jacket|coat", "hat|cap", "dress", "skirt", "tie", "scarf",
             "helmet", "sweater"],
            ["tree", "flower", "bush", "rock"],
            ["house", "tower", "church", "bridge", "fence", "wall", "window",
             "door", "sign", "pole"],
            ["beach", "street|road", "field", "park", "forest", "mountain", "lake",
             "river", "kitchen", "bathroom", "bedroom", "living room", "office"],
        ],
    },
    "attribute": {
        "colour": ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                   "black", "white", "gray|grey", "silver", "golden|gold", "beige"],
        "count": ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
        "size": [
            ["small|little|tiny", "large|big|huge|giant|enormous"],
            ["tall", "short"],
            ["wide", "narrow"],
            ["thick", "thin"],
        ],
        "material": ["wooden|wood", "metal|metallic|steel|iron", "glass", "plastic",
                     "leather", "stone", "brick", "concrete|cement", "ceramic|porcelain",
                     "paper", "cardboard", "wicker", "marble", "rubber", "fabric|cloth",
                     "wool|woolen|woollen", "denim"],
    },
    "relation": {
        "spatial": ["on|on top of|atop", "under|below|beneath|underneath", "above|over",
                    "next to|beside|near|close to", "behind", "in front of",
                    "to the left of|on the left of|on the left side of",
                    "to the right of|on the right of|on the right side of",
                    "inside", "across from"],
        "action": [
            ["holding|carrying", "eating", "drinking", "throwing", "catching", "pushing",
             "pulling", "cutting", "washing", "kicking", "hugging", "feeding", "petting",
             "riding", "driving"],
            ["sitting", "standing", "lying|laying", "kneeling", "leaning",
             "crouching|squatting"],
            ["walking", "running", "jumping", "swimming", "flying", "dancing"],
            ["looking at|watching|staring at", "talking to|speaking to", "pointing at",
             "waving at", "smiling at", "playing with", "reading"],
        ],
    },
}  # fmt: skip

Entry = tuple[str, ...]  # the variants of one meaning, as listed


@dataclass(frozen=True)
class Form:
    """A written form of a listed entry: where it sits in the lists, and its number."""

    kind: str
    subtype: str
    group: int
    entry: int
    plural: bool


class WordLists:
    """Groups of interchangeable words/phrases: kind -> subtype -> list of phrases.

    JSON form: {"entity": {"object": [...]}, "attribute": {"colour": [...], "size": [...],
    "count": [...], "material": [...]}, "relation": {"spatial": [...], "action": [...]}}.
    A subtype's list may instead be a list of lists (several groups; a replacement comes
    from its phrase's own group), and an entry "a|b" lists two spellings of one meaning.
    Entity phrases are singular nouns; their plurals are matched (and replaced) too.
    """

    def __init__(self, lists: dict[str, dict[str, list[list[Entry]]]]) -> None:
        self.lists = lists
        self.index, self.max_words = self._build_index()

    @classmethod
    def default(cls) -> WordLists:
        """Rich English lists for real captions (COCO / ShareGPT4V style)."""
        return cls.from_json(DEFAULT_WORD_LISTS)

    @classmethod
    def from_json(cls, path_or_dict: str | Path | Mapping[str, Any]) -> WordLists:
        """Lists from a JSON file or its parsed dict; CaptionerError names the bad entry."""
        if not isinstance(path_or_dict, (str, Path)):
            return cls(_parse_lists(path_or_dict, "word lists"))
        path = Path(path_or_dict)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CaptionerError(f"word lists {path}: cannot read JSON ({exc})") from exc
        return cls(_parse_lists(data, f"word lists {path}"))

    def to_dict(self) -> dict[str, dict[str, list[Any]]]:
        out: dict[str, dict[str, list[Any]]] = {}
        for kind, subtypes in self.lists.items():
            out[kind] = {}
            for subtype, groups in subtypes.items():
                written = [[VARIANT_SEPARATOR.join(e) for e in g] for g in groups]
                out[kind][subtype] = written[0] if len(written) == 1 else written
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordLists) and self.to_dict() == other.to_dict()

    def group(self, form: Form) -> list[Entry]:
        return self.lists[form.kind][form.subtype][form.group]

    def entries(self) -> Iterator[tuple[str, str, int, int, Entry]]:
        """(kind, subtype, group, entry index, variants) of every entry."""
        for kind, subtypes in self.lists.items():
            for subtype, groups in subtypes.items():
                for g, entries in enumerate(groups):
                    for e, variants in enumerate(entries):
                        yield kind, subtype, g, e, variants

    def forms(self, kind: str, variants: Entry) -> list[tuple[str, bool]]:
        """(text, plural) of every way an entry is written: its variants (+ plurals)."""
        out = [(v, False) for v in variants]
        if kind == "entity":
            out += [(pluralize(v), True) for v in variants if pluralize(v) != v]
        return out

    def _build_index(self) -> tuple[dict[tuple[str, ...], Form], int]:
        """Word sequence -> Form; a listed phrase wins over a derived plural."""
        index: dict[tuple[str, ...], Form] = {}
        derived: dict[tuple[str, ...], Form] = {}
        for kind, subtype, g, e, variants in self.entries():
            for text, plural in self.forms(kind, variants):
                target = derived if plural else index
                target.setdefault(phrase_key(text), Form(kind, subtype, g, e, plural))
        for key, form in derived.items():
            index.setdefault(key, form)
        return index, max((len(k) for k in index), default=0)


def _parse_lists(data: object, where: str) -> dict[str, dict[str, list[list[Entry]]]]:
    """Check the JSON form; raise CaptionerError naming `where` and the bad entry."""
    if not isinstance(data, Mapping) or not data:
        raise CaptionerError(f"{where}: expected a non-empty object of kinds, got {data!r}")
    lists: dict[str, dict[str, list[list[Entry]]]] = {}
    seen: dict[tuple[str, ...], str] = {}
    for kind, subtypes in data.items():
        if kind not in KINDS:
            raise CaptionerError(f"{where}: unknown kind {kind!r}; known: {', '.join(KINDS)}")
        if not isinstance(subtypes, Mapping) or not subtypes:
            raise CaptionerError(f"{where}: {kind} must map subtypes to lists, got {subtypes!r}")
        lists[kind] = {}
        for subtype, value in subtypes.items():
            at = f"{where}: {kind}.{subtype}"
            groups = _parse_groups(value, at)
            for g, group in enumerate(groups):
                for entry in group:
                    for variant in entry:
                        key = phrase_key(variant)
                        if key in seen:
                            raise CaptionerError(
                                f"{at} (group {g}): {variant!r} is listed twice "
                                f"(also in {seen[key]})"
                            )
                        seen[key] = f"{kind}.{subtype}"
            lists[kind][str(subtype)] = groups
    return lists


def _parse_groups(value: object, at: str) -> list[list[Entry]]:
    if not isinstance(value, list) or not value:
        raise CaptionerError(f"{at}: expected a non-empty list, got {value!r}")
    raw_groups = value if all(isinstance(v, list) for v in value) else [value]
    groups = []
    for g, raw in enumerate(raw_groups):
        if len(raw) < 2:
            raise CaptionerError(f"{at} (group {g}): needs at least 2 entries to swap, got {raw}")
        groups.append([_parse_entry(item, f"{at} (group {g})") for item in raw])
    return groups


def _parse_entry(item: object, at: str) -> Entry:
    if not isinstance(item, str):
        raise CaptionerError(f"{at}: entry {item!r} is not a string")
    variants = tuple(" ".join(v.split()) for v in item.split(VARIANT_SEPARATOR))
    if not all(phrase_key(v) for v in variants):
        raise CaptionerError(f"{at}: entry {item!r} has an empty phrase")
    return variants


