"""The LLM perturbation path against a real vLLM CPU server serving the tiny random Qwen2.

One server for the module (start-up ~40-60 s on 2 cores). The random-weights model's edits
are nonsense: every line must be either an LLM edit that passes `validate_edits` again or
a rules fallback whose source and reason name the rejection. The JSON schema constraint is
seen in the replies themselves: every reply that was not cut at llm_max_tokens is JSON of
the schema's shape, which a random model never writes unconstrained.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import pytest
from reader_fixtures import tiny_settings

import qa.server as server_module
from captioner.perturb import (
    Edit,
    PerturbSettings,
    WordLists,
    apply_edits,
    reason_category,
    validate_edits,
)
from pipeline.perturb import PerturbReport, edits_schema, perturb_captions, read_records
from qa.server import ManagedServer
from qa.settings import ReaderSettings
from qa.tiny import build_tiny_reader

ITEMS = [
    (f"c{i}", caption)
    for i, caption in enumerate(
        [
            "A man holding a red umbrella next to a dog.",
            "Two dogs are sitting on a wooden bench in the park.",
            "An apple and a banana on a white plate.",
            "A large red circle to the left of a small blue square.",
            "A woman riding a horse on the beach.",
            "A cat lying under a black chair.",
            "Three boys playing with a ball in a field.",
            "Quietly, nobody knows.",  # nothing the rules could change either
        ]
    )
]
SETTINGS = PerturbSettings(source="llm")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    model = build_tiny_reader(tmp_path_factory.mktemp("tiny-reader"))
    log = tmp_path_factory.mktemp("perturb-reader-log") / "server.log"
    with ManagedServer(tiny_settings(model, concurrency=4), log_path=log) as managed:
        yield managed


def check_lines(path: Path, report: PerturbReport, source: str) -> Counter[str]:
    """Every line is a valid LLM edit or a recorded fallback; returns reasons by category."""
    records = read_records(path)
    assert sorted(records) == sorted(i for i, _ in ITEMS)
    reasons: Counter[str] = Counter()
    schema = edits_schema(SETTINGS)
    for record in records.values():
        assert record.llm_reply is not None  # every item was asked
        if record.source == source:
            edits, reason = validate_edits(
                record.caption, json.loads(record.llm_reply)["edits"], SETTINGS,
                WordLists.default(),
            )  # fmt: skip
            assert reason is None and [e.to_dict() for e in edits] == record.edits
            assert apply_edits(record.caption, edits) == record.perturbed
            continue
        category = reason_category(record.reason or "")
        assert record.source == f"rules (llm rejected: {category})", record
        reasons[category] += 1
        if category != "truncated reply":  # a complete reply is JSON of the schema's shape
            jsonschema.validate(json.loads(record.llm_reply), schema)
        if record.perturbed is not None:
            edits = [Edit.from_dict(e) for e in record.edits]
            assert apply_edits(record.caption, edits) == record.perturbed
        else:
            assert "nothing to perturb" in (record.reason or "")
    assert dict(reasons) == report.rejected
    assert "request failed" not in reasons
    assert report.written == len(ITEMS) and sum(report.by_source.values()) == len(ITEMS)
    return reasons


def test_managed_reader_edits_are_validated_or_fall_back(
    server: ManagedServer, tmp_path: Path
) -> None:
    out = tmp_path / "p.jsonl"
    report = perturb_captions(
        ITEMS, out, SETTINGS, seed=0, reader=server.settings, server=server, progress=False
    )
    reasons = check_lines(out, report, "llm:tiny-reader")
    # Some replies end inside llm_max_tokens: the schema check above ran on real JSON.
    assert sum(reasons.values()) - reasons["truncated reply"] >= 1, reasons
    saved = json.loads((tmp_path / "p.prompt.json").read_text())
    assert saved["schema"] == edits_schema(SETTINGS)
    # The same seed asks the same sampled questions: the same lines again.
    again = tmp_path / "again.jsonl"
    perturb_captions(ITEMS, again, SETTINGS, seed=0, reader=server.settings, server=server,
                     progress=False)  # fmt: skip
    assert read_records(again) == read_records(out)
    # Resumed: nothing left to ask, so no server is needed at all.
    nowhere = ReaderSettings(mode="external", url="http://127.0.0.1:9/v1")
    resumed = perturb_captions(ITEMS, out, SETTINGS, reader=nowhere, progress=False)
    assert (resumed.done_before, resumed.written) == (len(ITEMS), 0)


def test_external_reader_against_the_same_server(server: ManagedServer, tmp_path: Path) -> None:
    external = ReaderSettings(
        mode="external", url=server.base_url, served_name="tiny-reader", concurrency=3,
        max_retries=1, retry_backoff_s=0.1, request_timeout_s=60.0,
    )  # fmt: skip
    out = tmp_path / "p.jsonl"
    settings = PerturbSettings(source="llm", max_edits=1, kinds=["attribute", "relation"])
    report = perturb_captions(ITEMS, out, settings, seed=1, reader=external, progress=False)
    assert report.written == len(ITEMS) and "request failed" not in report.rejected
    schema = edits_schema(settings)
    assert schema["properties"]["edits"]["maxItems"] == 1
    for record in read_records(out).values():
        assert record.source.startswith(("llm:tiny-reader", "rules (llm rejected: "))
        if not record.reason or not record.reason.startswith("truncated reply"):
            reply = json.loads(record.llm_reply or "")
            jsonschema.validate(reply, schema)
            assert {e["kind"] for e in reply["edits"]} <= {"attribute", "relation"}


def test_managed_mode_starts_a_server_for_the_call(
    server: ManagedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[ReaderSettings] = []

    @contextmanager
    def managed(settings: ReaderSettings) -> Iterator[ManagedServer]:
        started.append(settings)  # stands in for a second 40-s start-up: the module's one
        yield server

    # The managed server is started by qa.server.server_urls, shared with the judge.
    monkeypatch.setattr(server_module, "ManagedServer", managed)
    out = tmp_path / "p.jsonl"
    report = perturb_captions(ITEMS[:3], out, SETTINGS, reader=server.settings, progress=False)
    assert started == [server.settings] and report.written == 3
    assert all(r.llm_reply is not None for r in read_records(out).values())


def test_an_unknown_model_name_is_a_counted_rejection(
    server: ManagedServer, tmp_path: Path
) -> None:
    wrong = ReaderSettings(mode="external", url=server.base_url, served_name="no-such-model")
    out = tmp_path / "p.jsonl"
    report = perturb_captions(ITEMS[:2], out, SETTINGS, reader=wrong, progress=False)
    assert report.rejected == {"request failed": 2}
    for record in read_records(out).values():
        assert record.source == "rules (llm rejected: request failed)"
        assert "NotFoundError" in (record.reason or "") and record.perturbed is not None
