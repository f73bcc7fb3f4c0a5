"""Pseudo-initial captions for a caption set, by rules or by the reader LLM, into a JSONL.

    from pipeline.perturb import perturb_captions
    report = perturb_captions([("coco-1", "A man riding a horse."), ...],
                              Path("data/perturbed.jsonl"), PerturbSettings(source="llm"),
                              reader=config.reader)
    print(report.summary())

One line per item, appended as soon as it is ready: {"id", "caption", "perturbed",
"edits", "source", "kinds", "reason", "llm_reply"}. A rerun skips ids already in the file
(a torn last line is cut and its item done again); an item that cannot be perturbed gets
"perturbed": null and the reason. Rules use a per-item rng derived from (seed, id), so a
line does not depend on order or resumption.

`source: llm` asks the product's own reader (managed mode: a `ManagedServer` for the call;
external: `reader.url`) for edits only, under a JSON schema (vLLM structured outputs), and
applies and checks them here (`captioner.perturb.validate_edits`). A malformed or invalid
reply is rejected (its reason's category counted in the report, the whole reason kept in
the line) and the item falls back to the rules, its source then reading
"rules (llm rejected: <category>)", e.g. "rules (llm rejected: not found)".
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai

from captioner.perturb import (
    Edit,
    Perturbation,
    PerturbSettings,
    RulePerturber,
    WordLists,
    apply_edits,
    load_word_lists,
    reason_category,
    validate_edits,
)
from pipeline.errors import DatasetError
from qa.answers import JsonlWriter, drop_torn_tail, read_jsonl
from qa.errors import ReaderError
from qa.prompts import fill
from qa.replicas import ReplicaPool
from qa.server import ManagedReplicas, ManagedServer, server_urls
from qa.settings import ReaderSettings

# An edit is a phrase, not a clause; the bound also keeps a reply within llm_max_tokens.
MAX_PHRASE_CHARS = 64
SYSTEM = (
    "You write deliberately wrong image captions, the training input of a model that "
    "learns to correct captions. Reply with JSON only."
)
USER = (
    "Caption: {caption}\n\n"
    "Make this caption wrong but plausible by changing {min_edits} to {max_edits} things "
    "in it. Each change replaces one short phrase copied exactly from the caption with "
    "another phrase of the same kind: an entity (an object, animal or person), an "
    "attribute (a colour, count, size or material) or a relation (where things are, or "
    "what someone does). Allowed kinds: {kinds}. Keep everything else as it is.\n"
    'Reply as {{"edits": [{{"kind": "...", "original": "...", "replacement": "..."}}]}}.'
)


# --- records ----------------------------------------------------------------------------------


@dataclass
class PerturbRecord:
    """One line of the output JSONL."""

    id: str
    caption: str
    perturbed: str | None  # None: nothing could be perturbed (see reason)
    edits: list[dict[str, Any]]  # Edit.to_dict() each, sorted by start
    source: str  # "rules" | "llm:<model>" | "rules (llm rejected: <category>)" | "error"
    kinds: list[str]  # the kinds the edits changed
    reason: str | None = None  # why the LLM was rejected, or why nothing was perturbed
    llm_reply: str | None = None  # the LLM's reply verbatim (source llm only)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @property
    def perturbation(self) -> Perturbation | None:
        if self.perturbed is None:
            return None
        edits = tuple(Edit.from_dict(e) for e in self.edits)
        return Perturbation(self.caption, self.perturbed, edits, self.source)


def make_record(
    item_id: str,
    caption: str,
    perturbation: Perturbation | None,
    source: str,
    reason: str | None = None,
    llm_reply: str | None = None,
) -> PerturbRecord:
    edits = list(perturbation.edits) if perturbation is not None else []
    return PerturbRecord(
        id=item_id,
        caption=caption,
        perturbed=perturbation.perturbed if perturbation is not None else None,
        edits=[e.to_dict() for e in edits],
        source=source,
        kinds=sorted({e.kind for e in edits}),
        reason=reason,
        llm_reply=llm_reply,
    )


def read_records(path: Path) -> dict[str, PerturbRecord]:
    """Records by id. A torn last line is ignored; any other bad line raises DatasetError."""
    rows = read_jsonl(path, lambda d: PerturbRecord(**d), "a perturbation record", DatasetError)
    return {record.id: record for record in rows}


# One flushed line per record, the torn tail of a killed run cut first (qa's answers use it).
PerturbWriter = JsonlWriter


@dataclass
class PerturbReport:
    total: int  # items asked for
    done_before: int  # already in the file (skipped)
    written: int  # lines written by this call
    by_source: dict[str, int] = field(default_factory=dict)  # "unperturbed": perturbed null
    rejected: dict[str, int] = field(default_factory=dict)  # LLM rejection categories

    def add(self, record: PerturbRecord) -> None:
        self.written += 1
        key = record.source if record.perturbed is not None else "unperturbed"
        self.by_source[key] = self.by_source.get(key, 0) + 1
        if record.source.startswith("rules (llm rejected") and record.reason:
            category = reason_category(record.reason)
            self.rejected[category] = self.rejected.get(category, 0) + 1

    def summary(self) -> str:
        def counts(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

        text = (
            f"perturbations: {self.total} items, {self.done_before} done before, "
            f"{self.written} written (by source: {counts(self.by_source)})"
        )
        return text + (f"; llm rejected: {counts(self.rejected)}" if self.rejected else "")


# --- rules ------------------------------------------------------------------------------------


def item_rng(seed: int, item_id: str) -> random.Random:
    """The rng of one item: the same (seed, id) gives the same draws in any run order."""
    return random.Random(f"{seed}:{item_id}")


def rules_record(
    perturber: RulePerturber,
    item_id: str,
    caption: str,
    seed: int,
    source: str = "rules",
    reason: str | None = None,
    llm_reply: str | None = None,
) -> PerturbRecord:
    """The rules' perturbation of one caption (source and reason name an LLM rejection)."""
    perturbation = perturber.perturb(caption, item_rng(seed, item_id))
    if perturbation is None:
        why = f"nothing to perturb: no replaceable phrase of kinds {perturber.settings.kinds}"
        reason = f"{reason}; {why}" if reason else why
    return make_record(item_id, caption, perturbation, source, reason, llm_reply)


def error_record(item_id: str, caption: str, exc: Exception) -> PerturbRecord:
    return make_record(item_id, caption, None, "error", f"error: {type(exc).__name__}: {exc}")


def _perturb_rules(
    perturber: RulePerturber,
    todo: Sequence[tuple[str, str]],
    writer: PerturbWriter,
    report: PerturbReport,
    seed: int,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    for item_id, caption in tqdm(todo, desc="perturb", unit="caption", disable=not progress):
        try:
            record = rules_record(perturber, item_id, caption, seed)
        except Exception as exc:  # one bad item never sinks the run: its line says why
            record = error_record(item_id, caption, exc)
        writer.write(record)
        report.add(record)


# --- the LLM ----------------------------------------------------------------------------------


def edits_schema(settings: PerturbSettings) -> dict[str, Any]:
    """The JSON schema of a reply: {"edits": [{"kind", "original", "replacement"}]}."""
    phrase = {"type": "string", "minLength": 1, "maxLength": MAX_PHRASE_CHARS}
    edit = {
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": list(settings.kinds)},
            "original": phrase,
            "replacement": phrase,
        },
        "required": ["kind", "original", "replacement"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "edits": {
                "type": "array",
                "items": edit,
                "minItems": settings.min_edits,
                "maxItems": settings.max_edits,
            }
        },
        "required": ["edits"],
        "additionalProperties": False,
    }


def user_prompt(caption: str, settings: PerturbSettings) -> str:
    values = {
        "caption": caption,
        "min_edits": settings.min_edits,
        "max_edits": settings.max_edits,
        "kinds": ", ".join(settings.kinds),
    }
    return fill(USER, values, "perturbation prompt")


def request_kwargs(
    reader: ReaderSettings, settings: PerturbSettings, caption: str, seed: int
) -> dict[str, Any]:
    """The chat request for one caption.

    vLLM 0.32 takes a JSON-schema constraint as the request's `structured_outputs.json`
    (vllm/entrypoints/openai/chat_completion/protocol.py: `structured_outputs:
    StructuredOutputsParams`; vllm/sampling_params.py: `StructuredOutputsParams.json:
    str | dict`, exclusive with regex/choice/grammar). Its per-request
    `disable_any_whitespace` is not sent: the xgrammar backend reads only the server's
    `structured_outputs_config.disable_any_whitespace` (v1/structured_output/
    backend_xgrammar.py), so the reply may hold whitespace between JSON tokens.
    """
    return {
        "model": reader.model_name,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user_prompt(caption, settings)},
        ],
        "max_tokens": settings.llm_max_tokens,
        "temperature": settings.llm_temperature,
        "seed": seed,  # a sampled reply is reproducible per item (vLLM per-request seed)
        "extra_body": {"structured_outputs": {"json": edits_schema(settings)}},
    }


def parse_reply(
    text: str,
    finish_reason: str | None,
    caption: str,
    settings: PerturbSettings,
    words: WordLists | None = None,
) -> tuple[list[Edit], str | None]:
    """The LLM's reply -> (edits, None) when valid, ([], "<category>: <detail>") when not."""
    if finish_reason == "length":
        return [], f"truncated reply: stopped at llm_max_tokens {settings.llm_max_tokens}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], f"malformed JSON: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get("edits"), list):
        return [], f'malformed JSON: expected {{"edits": [...]}}, got {text[:200]!r}'
    return validate_edits(caption, data["edits"], settings, words)


class LLMPerturber:
    """Asks the OpenAI-compatible server(s) for edits (several URLs: the reader's replica
    pool); the rules stand in for a rejected reply."""

    def __init__(
        self,
        reader: ReaderSettings,
        base_url: str | Sequence[str],
        settings: PerturbSettings,
        perturber: RulePerturber,
        seed: int,
    ) -> None:
        self.reader = reader
        self.settings = settings
        self.perturber = perturber
        self.seed = seed
        self.base_urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.source = f"llm:{reader.model_name}"
        self.pool: ReplicaPool | None = None  # made inside the event loop that uses it

    async def __aenter__(self) -> LLMPerturber:
        self.pool = ReplicaPool(self.reader, self.base_urls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def _create(self, kwargs: dict[str, Any]) -> Any:
        assert self.pool is not None, "use LLMPerturber as `async with`"
        return await self.pool.create(kwargs)

    async def record(self, item_id: str, caption: str) -> PerturbRecord:
        """The LLM's perturbation of one caption, or the rules' with the rejection reason."""
        request_seed = item_rng(self.seed, f"llm:{item_id}").getrandbits(31)
        kwargs = request_kwargs(self.reader, self.settings, caption, request_seed)
        reply: str | None = None
        try:
            resp = await self._create(kwargs)
            choice = resp.choices[0]
            reply = choice.message.content or ""
            edits, reason = parse_reply(
                reply, choice.finish_reason, caption, self.settings, self.perturber.words
            )
        except (openai.APIError, ReaderError) as exc:  # after the retries (or a 4xx): counted
            edits, reason = [], f"request failed: {type(exc).__name__}: {exc}"
        if reason is None:
            perturbed = apply_edits(caption, edits)
            perturbation = Perturbation(caption, perturbed, tuple(edits), self.source)
            return make_record(item_id, caption, perturbation, self.source, llm_reply=reply)
        source = f"rules (llm rejected: {reason_category(reason)})"
        return rules_record(self.perturber, item_id, caption, self.seed, source, reason, reply)


async def _perturb_llm(
    llm: LLMPerturber,
    todo: Sequence[tuple[str, str]],
    writer: PerturbWriter,
    report: PerturbReport,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    gate = asyncio.Semaphore(llm.reader.concurrency)

    async def one(item_id: str, caption: str) -> PerturbRecord:
        async with gate:
            try:
                return await llm.record(item_id, caption)
            except Exception as exc:  # one bad item never sinks the run: its line says why
                return error_record(item_id, caption, exc)

    async with llm:
        tasks = [asyncio.ensure_future(one(i, c)) for i, c in todo]
        bar = tqdm(total=len(tasks), desc="perturb (llm)", unit="caption", disable=not progress)
        try:
            for future in asyncio.as_completed(tasks):
                record = await future
                writer.write(record)  # one line per finished item: safe to kill
                report.add(record)
                bar.update(1)
        finally:
            bar.close()
            for task in tasks:
                task.cancel()


# --- the entry point --------------------------------------------------------------------------


def perturb_captions(
    items: Sequence[tuple[str, str]],
    out_jsonl: Path,
    settings: PerturbSettings,
    seed: int = 0,
    reader: ReaderSettings | None = None,
    progress: bool = True,
    server: ManagedServer | ManagedReplicas | None = None,
    words: WordLists | None = None,
) -> PerturbReport:
    """Perturb every (sample id, caption) not yet in `out_jsonl`; append a line for each.

    `source: llm` needs `reader`: managed mode starts its server for the call unless a
    running `server` is passed (tests share one); external mode uses `reader.url`.
    `words` overrides `settings.word_lists`. Raises DatasetError for duplicate ids or a
    corrupt line inside `out_jsonl`; an item's own failure is a line, never an exception.
    """
    settings.validate()
    if settings.source == "llm" and reader is None:
        raise ValueError("train.perturb.source is 'llm' but no reader settings were given")
    items = [(str(i), c) for i, c in items]
    _check_unique(items)
    out_jsonl = Path(out_jsonl)
    drop_torn_tail(out_jsonl)
    done = read_records(out_jsonl)
    todo = [(i, c) for i, c in items if i not in done]
    report = PerturbReport(total=len(items), done_before=len(items) - len(todo), written=0)
    if not todo:
        return report
    perturber = RulePerturber(words or load_word_lists(settings), settings)
    with PerturbWriter(out_jsonl) as writer:
        if settings.source == "rules":
            _perturb_rules(perturber, todo, writer, report, seed, progress)
        else:
            assert reader is not None
            _save_prompt(out_jsonl, settings)
            with server_urls(reader, server) as base_urls:
                llm = LLMPerturber(reader, base_urls, settings, perturber, seed)
                asyncio.run(_perturb_llm(llm, todo, writer, report, progress))
    return report


def _check_unique(items: Sequence[tuple[str, str]]) -> None:
    repeated = sorted(i for i, n in Counter(i for i, _ in items).items() if n > 1)
    if repeated:
        raise DatasetError(f"perturbation items: ids given more than once: {repeated[:20]}")


def _save_prompt(out_jsonl: Path, settings: PerturbSettings) -> None:
    """The instruction and schema used, next to the lines they produced."""
    path = out_jsonl.with_name(out_jsonl.stem + ".prompt.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"system": SYSTEM, "user": USER, "schema": edits_schema(settings)}
    path.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
