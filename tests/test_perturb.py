"""Rule-based perturbation, LLM-edit validation and the resumable JSONL writer (no server).

The LLM path against a real vLLM server is in tests/test_perturb_llm.py; here its reply
handling runs on canned replies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from captioner.perturb import (
    DEFAULT_WORD_LISTS,
    Edit,
    Perturbation,
    PerturbSettings,
    RulePerturber,
    WordLists,
    apply_edits,
    needs_an,
    phrase_key,
    pluralize,
    validate_edits,
)
from pipeline.errors import CaptionerError, DatasetError
from pipeline.perturb import (
    LLMPerturber,
    PerturbRecord,
    parse_reply,
    perturb_captions,
    read_records,
)
from qa.settings import ReaderSettings

# A synthetic world's own small lists (the shape of pipeline.world.word_lists).
WORLD = {
    "entity": {"object": ["circle", "square", "triangle", "star"]},
    "attribute": {"colour": ["red", "green", "blue", "yellow"], "size": ["small", "large"]},
    "relation": {"spatial": ["to the left of", "above"]},
}
WORLD_CAPTION = "a large red circle to the left of a small blue square"

CAPTIONS = [
    "A man holding a red umbrella next to a dog.",
    "Two dogs are sitting on a wooden bench in the park.",
    "An apple and a banana on a white plate to the left of a glass of water.",
    "Three sheep standing in a field near a small red barn.",
    "A woman in a blue shirt riding a horse on the beach, behind two boys.",
    "A large elephant walking next to a tall tree under a gray sky.",
    "A close-up of a pizza with tomatoes on a wooden table beside a metal fork and a cup.",
    "Several people are standing in front of a brick building while a girl is eating a cake.",
]


@pytest.fixture(scope="module")
def rules() -> RulePerturber:
    return RulePerturber(WordLists.default(), PerturbSettings())


# "to the left of" -> "above" shortens a 53-character caption by 17%: the world needs a
# looser length limit than real captions (its real captions differ by as much).
WORLD_SETTINGS = PerturbSettings(max_length_change=0.3)


@pytest.fixture(scope="module")
def world() -> RulePerturber:
    return RulePerturber(WordLists.from_json(WORLD), WORLD_SETTINGS)


def perturbations(perturber: RulePerturber, captions: list[str], seeds: int = 40, **kw):
    for caption in captions:
        for seed in range(seeds):
            p = perturber.perturb(caption, random.Random(seed), **kw)
            if p is not None:
                yield p


def occurrences(text: str, phrase: str) -> int:
    words, key = phrase_key(text), phrase_key(phrase)
    return sum(words[i : i + len(key)] == key for i in range(len(words)))


# --- finding phrases --------------------------------------------------------------------------


def test_candidates_longest_first_whole_words_case_insensitive(rules: RulePerturber) -> None:
    caption = "A Red hot dog to the left of a redwood red-eye, left of NEXT TO nothing."
    found = [(caption[s:e], kind, sub) for s, e, kind, sub in rules.candidates(caption)]
    assert found == [
        ("Red", "attribute", "colour"),
        ("hot dog", "entity", "object"),  # not "dog"
        ("to the left of", "relation", "spatial"),  # not "left"
        ("NEXT TO", "relation", "spatial"),
    ]  # "redwood", "red" in "red-eye" and "left of" after a comma are no phrases


def test_multi_word_phrase_matches_before_its_parts(world: RulePerturber) -> None:
    spans = world.candidates(WORLD_CAPTION)
    relation = [WORLD_CAPTION[s:e] for s, e, kind, _ in spans if kind == "relation"]
    assert relation == ["to the left of"]
    p = world.perturb(WORLD_CAPTION, random.Random(0), kinds=["relation"], n_edits=1)
    assert p is not None and p.perturbed == "a large red circle above a small blue square"
    assert p.edits == (Edit("relation", "spatial", 19, 33, "to the left of", "above"),)


def test_noun_use_of_a_material_is_no_attribute(rules: RulePerturber) -> None:
    spans = rules.candidates("a glass of water on a glass table")
    materials = [(s, e) for s, e, _, sub in spans if sub == "material"]
    assert materials == [(22, 27)]  # the table's glass, not "a glass of"


def test_nothing_to_perturb_gives_none(rules: RulePerturber) -> None:
    assert rules.candidates("Quietly, nobody knows.") == []
    assert rules.perturb("Quietly, nobody knows.", random.Random(0)) is None
    assert rules.perturb("A red car.", random.Random(0), kinds=["relation"]) is None


# --- no side channel --------------------------------------------------------------------------


def test_never_introduces_a_phrase_the_caption_already_has(rules: RulePerturber) -> None:
    for p in perturbations(rules, CAPTIONS):
        for edit in p.edits:
            words = edit.replacement.split()
            if words[0].lower() in ("a", "an") and len(words) > 1:
                words = words[1:]  # the article the edit took in; no listed phrase has one
            assert occurrences(p.perturbed, " ".join(words)) == 1, (p.perturbed, edit)


def test_all_colours_present_leaves_no_colour_to_swap_in(world: RulePerturber) -> None:
    caption = "a red circle, a green star, a blue square and a yellow triangle"
    assert world.perturb(caption, random.Random(0), kinds=["attribute"]) is None
    assert world.perturb(caption, random.Random(0), kinds=["entity"]) is None


def test_world_caption_never_repeats_a_colour_shape_or_size(world: RulePerturber) -> None:
    for p in perturbations(world, [WORLD_CAPTION], seeds=200):
        words = p.perturbed.split()
        for phrase in ("red", "green", "blue", "yellow", "circle", "square", "triangle", "star"):
            assert words.count(phrase) <= 1, p.perturbed
        # Both sizes are taken: a size edit would repeat one, so sizes never change.
        assert "large" in words and "small" in words


def test_length_change_stays_within_the_limit(rules: RulePerturber) -> None:
    for p in perturbations(rules, CAPTIONS):
        assert abs(len(p.perturbed) - len(p.original)) <= 0.15 * len(p.original)
    strict = RulePerturber(
        WordLists.from_json({"attribute": {"colour": ["red", "tan", "blue", "purple"]}}),
        PerturbSettings(max_length_change=0.0),
    )
    for seed in range(20):
        p = strict.perturb("The box is red.", random.Random(seed))
        assert p is not None and p.perturbed == "The box is tan."


def test_first_letter_keeps_its_case(rules: RulePerturber, world: RulePerturber) -> None:
    for seed in range(30):
        p = rules.perturb("Red apples on a table.", random.Random(seed), kinds=["attribute"])
        assert p is not None and p.perturbed[0].isupper() and p.perturbed[1:3].islower()
        p = rules.perturb("Dogs near a cat.", random.Random(seed), kinds=["entity"], n_edits=2)
        assert p is not None and p.edits[0].start == 0 and p.edits[0].replacement[0].isupper()
        assert p.edits[1].replacement[0].islower()
    p = world.perturb("A RED star", random.Random(0), kinds=["attribute"])
    assert p is not None and p.perturbed in {"A GREEN star", "A BLUE star", "A YELLOW star"}


def test_indefinite_article_is_fixed() -> None:
    words = WordLists.from_json(
        {"entity": {"object": ["apple", "pear"]}, "attribute": {"colour": ["red", "orange"]}}
    )
    perturber = RulePerturber(words, PerturbSettings(max_length_change=0.5))
    p = perturber.perturb("a red car", random.Random(0), kinds=["attribute"])
    assert p is not None and p.perturbed == "an orange car"
    assert p.edits == (Edit("attribute", "colour", 0, 5, "a red", "an orange"),)
    p = perturber.perturb("An apple on the shelf", random.Random(0), kinds=["entity"])
    assert p is not None and p.perturbed == "A pear on the shelf"
    assert p.edits[0].original == "An apple" and p.edits[0].replacement == "A pear"
    assert needs_an("umbrella") and needs_an("hour") and not needs_an("unicorn")
    assert not needs_an("one-way sign") and not needs_an("dog")


def test_plurals_stay_plural(rules: RulePerturber) -> None:
    words = WordLists.default()
    variants = [v for kind, _, _, _, e in words.entries() if kind == "entity" for v in e]
    plurals = {pluralize(v) for v in variants}
    for seed in range(30):
        p = rules.perturb("Two dogs and three sheep.", random.Random(seed), kinds=["entity"])
        assert p is not None
        for edit in p.edits:
            assert edit.replacement in plurals, edit
    assert [pluralize(w) for w in ("bus", "man", "knife", "baby", "hot dog", "toy")] == [
        "buses", "men", "knives", "babies", "hot dogs", "toys",
    ]  # fmt: skip
    p = rules.perturb("Three sheep.", random.Random(0), kinds=["entity"])
    assert p is not None and p.edits[0].replacement in plurals - set(variants) | {"deer"}


def test_edits_are_spread_over_different_phrases(rules: RulePerturber) -> None:
    caption = CAPTIONS[4]
    for seed in range(30):
        p = rules.perturb(caption, random.Random(seed), n_edits=3)
        assert p is not None and len(p.edits) == 3
        spans = sorted((e.start, e.end) for e in p.edits)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_edit_count_follows_settings_and_n_edits(rules: RulePerturber) -> None:
    counts = {len(p.edits) for p in perturbations(rules, CAPTIONS[4:], seeds=60)}
    assert counts == {1, 2, 3}
    two = RulePerturber(WordLists.default(), PerturbSettings(min_edits=2, max_edits=2))
    assert {len(p.edits) for p in perturbations(two, CAPTIONS[4:], seeds=10)} == {2}
    one = list(perturbations(rules, CAPTIONS, seeds=10, n_edits=1))
    assert {len(p.edits) for p in one} == {1}


# --- determinism and records --------------------------------------------------------------------


def test_same_rng_same_result_and_edits_reproduce_the_caption(rules: RulePerturber) -> None:
    for caption in CAPTIONS:
        for seed in range(15):
            a = rules.perturb(caption, random.Random(seed))
            b = rules.perturb(caption, random.Random(seed))
            assert a == b and a is not None
            assert apply_edits(caption, a.edits) == a.perturbed != caption
            for edit in a.edits:
                assert caption[edit.start : edit.end] == edit.original
            assert Perturbation.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_apply_edits_rejects_overlap_and_stale_spans() -> None:
    with pytest.raises(CaptionerError, match="overlap"):
        apply_edits("a red car", [Edit("attribute", "colour", 2, 5, "red", "blue"),
                                  Edit("entity", "object", 4, 9, "d car", "x")])  # fmt: skip
    with pytest.raises(CaptionerError, match="does not match"):
        apply_edits("a red car", [Edit("attribute", "colour", 0, 3, "red", "blue")])


@pytest.mark.parametrize("kind", ["entity", "attribute", "relation"])
def test_kinds_restrict_what_is_edited(world: RulePerturber, kind: str) -> None:
    for seed in range(30):
        p = world.perturb(WORLD_CAPTION, random.Random(seed), kinds=[kind], n_edits=1)
        assert p is not None and len(p.edits) == 1 and p.edits[0].kind == kind
    only = dataclasses.replace(WORLD_SETTINGS, kinds=[kind])
    settings_only = RulePerturber(WordLists.from_json(WORLD), only)
    for p in perturbations(settings_only, [WORLD_CAPTION], seeds=20):
        assert {e.kind for e in p.edits} == {kind}


def test_world_entity_edit_picks_an_unused_shape(world: RulePerturber) -> None:
    seen = set()
    for seed in range(40):
        p = world.perturb(WORLD_CAPTION, random.Random(seed), kinds=["entity"], n_edits=1)
        assert p is not None
        seen.add(p.edits[0].replacement)
    assert seen == {"triangle", "star"}


def test_unknown_kind_or_bad_n_edits_raise(rules: RulePerturber) -> None:
    with pytest.raises(ValueError, match="kinds"):
        rules.perturb("a red car", random.Random(0), kinds=["colour"])
    with pytest.raises(ValueError, match="n_edits"):
        rules.perturb("a red car", random.Random(0), n_edits=0)


# --- word lists and settings --------------------------------------------------------------------


def test_word_lists_round_trip_through_a_file(tmp_path: Path) -> None:
    default = WordLists.default()
    assert WordLists.from_json(default.to_dict()) == default
    assert default.to_dict() == DEFAULT_WORD_LISTS
    path = tmp_path / "world.json"
    path.write_text(json.dumps(WORLD))
    assert WordLists.from_json(path).to_dict() == WORLD
    assert WordLists.from_json(str(path)) == WordLists.from_json(WORLD)


@pytest.mark.parametrize(
    ("lists", "match"),
    [
        ({"colour": {"x": ["red", "blue"]}}, "unknown kind 'colour'"),
        ({"attribute": ["red", "blue"]}, "attribute must map subtypes"),
        ({"attribute": {"colour": []}}, "attribute.colour: expected a non-empty list"),
        ({"attribute": {"colour": ["red", 3]}}, "entry 3 is not a string"),
        ({"attribute": {"colour": ["red"]}}, "needs at least 2 entries"),
        ({"attribute": {"colour": ["red", "  "]}}, "entry '  ' has an empty phrase"),
        ({"attribute": {"colour": ["red", "blue"], "size": ["Red", "big"]}}, "listed twice"),
        ([], "expected a non-empty object"),
    ],
)
def test_malformed_word_lists_name_the_bad_entry(lists: object, match: str) -> None:
    with pytest.raises(CaptionerError, match=match):
        WordLists.from_json(lists)  # type: ignore[arg-type]


def test_malformed_word_list_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CaptionerError, match="bad.json"):
        WordLists.from_json(bad)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"entity": {"object": ["cat", "cat"]}}))
    with pytest.raises(CaptionerError, match=r"dup.json: entity.object .*'cat' is listed twice"):
        WordLists.from_json(dup)
    with pytest.raises(CaptionerError, match="missing.json"):
        WordLists.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"source": "magic"}, "source"),
        ({"min_edits": 0}, "min_edits"),
        ({"min_edits": 3, "max_edits": 2}, "max_edits"),
        ({"max_length_change": -0.1}, "max_length_change"),
        ({"kinds": []}, "kinds"),
        ({"kinds": ["entity", "colour"]}, "kinds"),
        ({"kinds": ["entity", "entity"]}, "kinds"),
        ({"llm_temperature": -1.0}, "llm_temperature"),
        ({"llm_max_tokens": 0}, "llm_max_tokens"),
        ({"word_lists": " "}, "word_lists"),
    ],
)
def test_settings_validate_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"train\.perturb\.{field}"):
        PerturbSettings(**overrides).validate()


# --- validating LLM edits ---------------------------------------------------------------------

CAPTION = "A man holding a red umbrella next to a red car."


def test_validate_accepts_a_good_proposal() -> None:
    proposed = [
        {"kind": "attribute", "original": "red", "replacement": "orange"},
        {"kind": "entity", "original": "man", "replacement": "woman", "subtype": "person"},
        {"kind": "relation", "original": "next to", "replacement": "behind"},
    ]
    edits, reason = validate_edits(CAPTION, proposed, PerturbSettings(), WordLists.default())
    assert reason is None
    assert apply_edits(CAPTION, edits) == "A woman holding an orange umbrella behind a red car."
    assert [(e.kind, e.subtype) for e in edits] == [
        ("entity", "person"), ("attribute", "colour"), ("relation", "spatial"),
    ]  # fmt: skip
    assert edits[1] == Edit("attribute", "colour", 14, 19, "a red", "an orange")


def test_validate_uses_the_first_unused_occurrence() -> None:
    proposed = [
        {"kind": "attribute", "original": "red", "replacement": "blue"},
        {"kind": "attribute", "original": "red", "replacement": "green"},
    ]
    edits, reason = validate_edits(CAPTION, proposed, PerturbSettings())
    assert reason is None
    assert apply_edits(CAPTION, edits) == "A man holding a blue umbrella next to a green car."
    assert [e.subtype for e in edits] == ["other", "other"]  # no word lists given


@pytest.mark.parametrize(
    ("proposed", "category"),
    [
        ([], "no edits"),
        ([{"kind": "entity", "original": "cat", "replacement": "dog"}], "not found"),
        ([{"kind": "entity", "original": "ma", "replacement": "pa"}], "not found"),
        ([{"kind": "attribute", "original": "red", "replacement": "blue"}] * 4, "too many edits"),
        (
            [
                {"kind": "attribute", "original": "red umbrella", "replacement": "blue hat"},
                {"kind": "entity", "original": "umbrella", "replacement": "kite"},
            ],
            "overlap",
        ),
        ([{"kind": "attribute", "original": "red", "replacement": "Red"}], "identical"),
        (
            [{"kind": "entity", "original": "car", "replacement": "very large shiny new truck"}],
            "length change",
        ),
        ([{"kind": "colour", "original": "red", "replacement": "blue"}], "unknown kind"),
        ([{"kind": "entity", "original": "man", "replacement": " "}], "empty phrase"),
        ([{"kind": "entity", "original": "man"}], "malformed edit"),
        (["man -> woman"], "malformed edit"),
    ],
)
def test_validate_rejects_each_bad_shape(proposed: list, category: str) -> None:
    edits, reason = validate_edits(CAPTION, proposed, PerturbSettings())
    assert edits == [] and reason is not None and reason.startswith(category), reason


def test_validate_kinds_follow_the_settings() -> None:
    proposed = [{"kind": "entity", "original": "man", "replacement": "woman"}]
    _, reason = validate_edits(CAPTION, proposed, PerturbSettings(kinds=["attribute"]))
    assert reason is not None and reason.startswith("unknown kind")


def test_parse_reply_rejects_truncated_and_malformed_replies() -> None:
    settings = PerturbSettings()
    good = json.dumps({"edits": [{"kind": "entity", "original": "car", "replacement": "bus"}]})
    edits, reason = parse_reply(good, "stop", CAPTION, settings)
    assert reason is None and apply_edits(CAPTION, edits).endswith("red bus.")
    assert parse_reply(good, "length", CAPTION, settings)[1].startswith("truncated reply")
    assert parse_reply("{", "stop", CAPTION, settings)[1].startswith("malformed JSON")
    assert parse_reply("[1]", "stop", CAPTION, settings)[1].startswith("malformed JSON")


# --- the JSONL writer (rules) -----------------------------------------------------------------

ITEMS = [(f"s{i}", c) for i, c in enumerate(CAPTIONS)] + [("none", "Quietly, nobody knows.")]


def lines(path: Path) -> dict[str, str]:
    return {json.loads(line)["id"]: line for line in path.read_text().splitlines()}


def test_rules_write_one_line_per_item(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    report = perturb_captions(ITEMS, out, PerturbSettings(), seed=3, progress=False)
    assert (report.total, report.done_before, report.written) == (9, 0, 9)
    assert report.by_source == {"rules": 8, "unperturbed": 1} and report.rejected == {}
    assert "9 written" in report.summary()
    records = read_records(out)
    assert list(records) == [i for i, _ in ITEMS]
    for item_id, caption in ITEMS[:-1]:
        r = records[item_id]
        assert r.caption == caption and r.source == "rules" and r.reason is None
        p = r.perturbation
        assert p is not None and apply_edits(caption, p.edits) == r.perturbed
        assert r.kinds == sorted({e.kind for e in p.edits})
    assert records["none"].perturbed is None and "nothing to perturb" in records["none"].reason
    assert set(json.loads(out.read_text().splitlines()[0])) == {
        "id", "caption", "perturbed", "edits", "source", "kinds", "reason", "llm_reply",
    }  # fmt: skip


def test_same_seed_same_lines_in_any_order(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    perturb_captions(ITEMS, a, PerturbSettings(), seed=1, progress=False)
    perturb_captions(ITEMS[::-1], b, PerturbSettings(), seed=1, progress=False)
    perturb_captions(ITEMS, c, PerturbSettings(), seed=2, progress=False)
    assert lines(a) == lines(b)
    assert lines(a) != lines(c)


def test_resume_after_a_torn_line_and_from_a_partial_file(tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    perturb_captions(ITEMS, full, PerturbSettings(), seed=5, progress=False)
    text = full.read_text()
    cut = text.index("\n", len(text) // 2)  # keep some lines, then half of the next one
    torn = tmp_path / "torn.jsonl"
    torn.write_text(text[: cut + 30])
    report = perturb_captions(ITEMS, torn, PerturbSettings(), seed=5, progress=False)
    kept = text[: cut + 1].count("\n")
    assert (report.done_before, report.written) == (kept, len(ITEMS) - kept)
    assert len(torn.read_text().splitlines()) == len(ITEMS)  # no id twice
    assert lines(torn) == lines(full)
    partial = tmp_path / "partial.jsonl"
    partial.write_text(text[: cut + 1])
    perturb_captions(ITEMS, partial, PerturbSettings(), seed=5, progress=False)
    assert lines(partial) == lines(full) and len(partial.read_text().splitlines()) == len(ITEMS)
    again = perturb_captions(ITEMS, full, PerturbSettings(), seed=5, progress=False)
    assert (again.done_before, again.written) == (len(ITEMS), 0)


def test_corrupt_middle_line_and_duplicate_ids_raise(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    perturb_captions(ITEMS[:3], out, PerturbSettings(), progress=False)
    rows = out.read_text().splitlines()
    out.write_text("\n".join([rows[0], "{broken", rows[2]]) + "\n")
    with pytest.raises(DatasetError, match=r"p.jsonl:2"):
        perturb_captions(ITEMS, out, PerturbSettings(), progress=False)
    with pytest.raises(DatasetError, match="s1"):
        perturb_captions([("s1", "a"), ("s1", "b")], tmp_path / "q.jsonl", PerturbSettings())


def test_a_failing_item_is_a_line_not_an_exception(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    items = [("bad", None), *ITEMS[:2]]
    report = perturb_captions(items, out, PerturbSettings(), progress=False)  # type: ignore[arg-type]
    records = read_records(out)
    assert records["bad"].perturbed is None and records["bad"].source == "error"
    assert records["bad"].reason.startswith("error: TypeError")
    assert records["s0"].perturbed is not None and report.by_source["unperturbed"] == 1


def test_custom_word_lists_from_settings(tmp_path: Path) -> None:
    lists = tmp_path / "world.json"
    lists.write_text(json.dumps(WORLD))
    settings = dataclasses.replace(
        WORLD_SETTINGS, word_lists=str(lists), kinds=["relation"], max_edits=1
    )
    out = tmp_path / "p.jsonl"
    perturb_captions([("w", WORLD_CAPTION)], out, settings, progress=False)
    assert read_records(out)["w"].perturbed == "a large red circle above a small blue square"


# --- the LLM path's reply handling on canned replies -----------------------------------------


def canned(reply: str, finish: str = "stop"):
    message = SimpleNamespace(content=reply)
    return SimpleNamespace(choices=[SimpleNamespace(message=message, finish_reason=finish)])


def llm_record(reply: str, finish: str = "stop") -> PerturbRecord:
    reader = ReaderSettings(mode="external", url="http://127.0.0.1:9/v1", served_name="m")
    settings = PerturbSettings(source="llm")
    llm = LLMPerturber(reader, reader.base_url, settings, RulePerturber(
        WordLists.default(), settings), seed=0)  # fmt: skip

    async def create(kwargs: dict) -> SimpleNamespace:
        schema = kwargs["extra_body"]["structured_outputs"]["json"]
        assert schema["properties"]["edits"]["maxItems"] == 3
        return canned(reply, finish)

    llm._create = create  # type: ignore[method-assign]
    return asyncio.run(llm.record("x", CAPTION))


def test_an_accepted_llm_edit_is_recorded_as_llm() -> None:
    reply = json.dumps({"edits": [{"kind": "entity", "original": "car", "replacement": "bus"}]})
    record = llm_record(reply)
    assert record.source == "llm:m" and record.reason is None and record.llm_reply == reply
    assert record.perturbed == "A man holding a red umbrella next to a red bus."
    assert record.edits == [Edit("entity", "object", 43, 46, "car", "bus").to_dict()]


def test_a_rejected_llm_edit_falls_back_to_the_rules() -> None:
    reply = json.dumps({"edits": [{"kind": "entity", "original": "cat", "replacement": "x"}]})
    record = llm_record(reply)
    assert record.source == "rules (llm rejected: not found)"
    assert record.reason.startswith("not found") and record.perturbed is not None
    rules_line = RulePerturber(WordLists.default(), PerturbSettings()).perturb(
        CAPTION, random.Random("0:x")
    )
    assert rules_line is not None and record.perturbed == rules_line.perturbed
    assert llm_record("{", "length").source == "rules (llm rejected: truncated reply)"


def test_an_unreachable_server_is_a_rejection_per_item(tmp_path: Path) -> None:
    from reader_fixtures import free_port

    reader = ReaderSettings(
        mode="external", url=f"http://127.0.0.1:{free_port()}/v1", served_name="m",
        max_retries=1, retry_backoff_s=0.01, request_timeout_s=5.0,
    )  # fmt: skip
    out = tmp_path / "p.jsonl"
    report = perturb_captions(
        ITEMS[:3], out, PerturbSettings(source="llm"), reader=reader, progress=False
    )
    assert report.rejected == {"request failed": 3} and report.written == 3
    for record in read_records(out).values():
        assert record.source == "rules (llm rejected: request failed)"
        assert "APIConnectionError" in record.reason and record.perturbed is not None
    assert json.loads((tmp_path / "p.prompt.json").read_text())["schema"]["type"] == "object"
    with pytest.raises(ValueError, match="reader"):
        perturb_captions(ITEMS, tmp_path / "q.jsonl", PerturbSettings(source="llm"))
