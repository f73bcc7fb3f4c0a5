"""An LLM judge of captions, CLAIR-style, through the product's own reader server.

    from qa.judge import JudgeSettings, judge_captions
    judgements = judge_captions(
        [("img1", "a red circle above a blue square", ["a red circle over a blue square"])],
        config.reader, JudgeSettings(enabled=True),
    )
    judgements["img1"].score, judgements["img1"].reason   # 0-100 and one sentence

CLAIR (Chan et al., 2023) asks a language model how likely it is, from 0 to 100, that a
candidate caption describes the same image as a set of references, and for a short reason,
as JSON. Here the reply is constrained to that JSON by vLLM structured outputs (the same
`structured_outputs.json` request field `pipeline.perturb` uses), so a reply that is not
cut short always parses; the score is read from it, never guessed from free text.

The score means something only from a real judge model: `judge_model_problem` says when
the configured reader is the tiny random-weights test model (qa.tiny), whose replies test
the request and the parsing and are never reported as a score.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

from qa.errors import ReaderError
from qa.prompts import fill
from qa.replicas import ReplicaPool
from qa.server import ManagedReplicas, ManagedServer, server_urls
from qa.settings import JudgeSettings, ReaderSettings

SYSTEM = "You grade image captions against reference captions. Reply with JSON only."
USER = (
    "Candidate caption:\n{candidate}\n\n"
    "Reference captions of one image:\n{references}\n\n"
    "On a scale from 0 to 100, how likely is it that the candidate describes the same "
    "image as the references? Weigh what it says about objects, their attributes and how "
    "they relate; wording and style do not matter. Reply as "
    '{{"score": <0-100>, "reason": "<one short sentence>"}}.'
)
# The file qa.tiny writes beside its random-weights model.
TINY_READER_MARKER = ".tiny-reader-complete"


@dataclass
class Judgement:
    """One caption's verdict, or why there is none."""

    score: float | None  # 0-100; None when the reply could not be read (see error)
    reason: str | None
    error: str | None = None
    reply: str | None = None  # the reply verbatim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_schema(settings: JudgeSettings) -> dict[str, Any]:
    """{"score": integer 0-100, "reason": string}, nothing else."""
    return {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 0, "maximum": 100},
            "reason": {"type": "string", "maxLength": settings.reason_max_chars},
        },
        "required": ["score", "reason"],
        "additionalProperties": False,
    }


def user_prompt(candidate: str, references: Sequence[str]) -> str:
    lines = "\n".join(f"- {r}" for r in references)
    return fill(USER, {"candidate": candidate, "references": lines}, "judge prompt")


def judge_request(
    reader: ReaderSettings, settings: JudgeSettings, candidate: str, references: Sequence[str]
) -> dict[str, Any]:
    """The chat request for one caption."""
    return {
        "model": reader.model_name,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user_prompt(candidate, references)},
        ],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "extra_body": {"structured_outputs": {"json": judge_schema(settings)}},
    }


def parse_judgement(text: str, finish_reason: str | None, settings: JudgeSettings) -> Judgement:
    """A reply -> its score and reason, or the error that kept them from being read."""
    if finish_reason == "length":
        return Judgement(None, None, f"truncated reply: stopped at max_tokens "
                         f"{settings.max_tokens}", text)  # fmt: skip
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Judgement(None, None, f"malformed JSON: {exc}", text)
    score = data.get("score") if isinstance(data, dict) else None
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 100:
        return Judgement(None, None, f"no score 0-100 in {text[:200]!r}", text)
    reason = data.get("reason")
    return Judgement(float(score), reason if isinstance(reason, str) else None, None, text)


def judge_model_problem(reader: ReaderSettings) -> str | None:
    """Why the configured reader's scores must not be reported, or None."""
    if (Path(reader.model) / TINY_READER_MARKER).exists():
        return (f"the reader {reader.model_name!r} is the tiny random-weights test model "
                "(qa.tiny): its replies test the request and parsing, never a score")  # fmt: skip
    return None


async def _judge_all(
    items: Sequence[tuple[str, str, Sequence[str]]],
    reader: ReaderSettings,
    base_urls: Sequence[str],
    settings: JudgeSettings,
    progress: bool,
) -> dict[str, Judgement]:
    from tqdm.auto import tqdm

    gate = asyncio.Semaphore(reader.concurrency)
    pool = ReplicaPool(reader, base_urls)  # several reader URLs: the judge uses them all

    async def one(key: str, candidate: str, references: Sequence[str]) -> tuple[str, Judgement]:
        async with gate:
            try:
                resp = await pool.create(judge_request(reader, settings, candidate, references))
            except (openai.APIError, ReaderError) as exc:  # after the retries: this item's
                return key, Judgement(None, None, f"request failed: {type(exc).__name__}: {exc}")
            choice = resp.choices[0]
            return key, parse_judgement(choice.message.content or "", choice.finish_reason,
                                        settings)  # fmt: skip

    out: dict[str, Judgement] = {}
    try:
        tasks = [asyncio.ensure_future(one(*item)) for item in items]
        with tqdm(total=len(tasks), desc="judge", unit="caption", disable=not progress) as bar:
            for future in asyncio.as_completed(tasks):
                key, judgement = await future
                out[key] = judgement
                bar.update(1)
    finally:
        await pool.close()
    return out


def judge_captions(
    items: Sequence[tuple[str, str, Sequence[str]]],
    reader: ReaderSettings,
    settings: JudgeSettings,
    server: ManagedServer | ManagedReplicas | None = None,
    progress: bool = True,
) -> dict[str, Judgement]:
    """Judge (id, candidate, references) items on `server`, the external reader, or a
    managed server started for the call; {id: Judgement} for every item."""
    settings.validate()
    with server_urls(reader, server) as base_urls:
        return asyncio.run(_judge_all(items, reader, base_urls, settings, progress))


def mean_score(judgements: dict[str, Judgement]) -> tuple[float | None, int]:
    """The mean score over readable verdicts, and how many were not readable."""
    scores = [j.score for j in judgements.values() if j.score is not None]
    failed = len(judgements) - len(scores)
    return (sum(scores) / len(scores) if scores else None), failed
