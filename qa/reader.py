"""The reader client: questions + transcripts -> answer records, many requests in flight.

    from qa.reader import answer_questions
    records = answer_questions(settings, [(question, transcript), ...], Path("run/answers.jsonl"))

`answer_questions` is the stage's one entry point. In managed mode it starts the vLLM
server(s) (`qa.server.ManagedReplicas`: `reader.replicas` of them) for the duration of the
call; in external mode it talks to `settings.url`, one URL or a list. Requests go through
`qa.replicas.ReplicaPool` (least in flight, dead replicas taken out and their requests
moved; a question's record is written once, by the task that asked it). It resumes: q_uids
already answered in `out_jsonl` are skipped (failed ones are asked again), and each record
is appended as soon as it is ready. A failed request never raises: it is moved or retried
(connection errors, timeouts, 429 and 5xx; exponential backoff) and then recorded with its
error.

Letter answers use vLLM structured outputs (`choice` A-E) with logprobs: the letter plus a
probability per option. Free-text replies (`structured_choice: false` for servers without
structured outputs) go through the template's reading (`qa.parsing.parse_answer`, or
LLoVi's first character). With `permutations: N` the stages from the first one showing
the options are asked N times with the options cyclically shifted; each option's
probability is averaged over the shifts in its original position, and the answer is the
argmax (an exact tie is invalid). A text stage cut at max_tokens is marked truncated, and
a question whose template, question and options alone overflow the context fails before
any request, with the reason.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import openai

from qa.answers import AnswerRecord, AnswerWriter, read_answers
from qa.errors import ReaderError
from qa.prompts import PromptTemplate, Stage, fill, get_template, prompt_fields
from qa.records import OPTION_LETTERS, Question, Transcript
from qa.replicas import ReplicaPool
from qa.server import ManagedReplicas, ManagedServer, server_urls
from qa.settings import ReaderSettings
from qa.transcript import fit_transcript, render_lines

_CHOICE_MAX_TOKENS = 4  # one letter (+ end of sequence) under the choice constraint
_TOP_LOGPROBS = 10


@dataclass
class _Reply:
    text: str
    option_probs: list[float] | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


def make_token_counter(settings: ReaderSettings) -> tuple[Callable[[str], int], str]:
    """(count_tokens, kind): the model's own tokenizer, or a conservative estimate.

    kind is "tokenizer" or "estimate" (3 characters per token: English text runs ~4, so
    the estimate errs towards cutting more, never towards an over-long prompt).
    """
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(settings.model)
    except Exception:  # no local files, no hub: any failure means "no tokenizer here"
        return (lambda text: len(text) // 3 + 1), "estimate"
    return (lambda text: len(tok.encode(text, add_special_tokens=False))), "tokenizer"


def option_probabilities(logprobs: object) -> list[float] | None:
    """Per-option probabilities (A-E, summing to 1) from the first token's top logprobs."""
    content = getattr(logprobs, "content", None)
    if not content:
        return None
    mass = dict.fromkeys(OPTION_LETTERS, 0.0)
    for top in content[0].top_logprobs or []:
        letter = top.token.strip()
        if letter in mass:
            mass[letter] += math.exp(top.logprob)
    total = sum(mass.values())
    if total <= 0.0:
        return None
    return [mass[letter] / total for letter in OPTION_LETTERS]


class Reader:
    """Sends prompts to the OpenAI-compatible server(s) at `base_url` (one URL or a list:
    a replica pool). Make it inside the event loop that uses it."""

    def __init__(
        self,
        settings: ReaderSettings,
        base_url: str | Sequence[str],
        count_tokens: Callable[[str], int] | None = None,
        counter_kind: str = "tokenizer",
    ) -> None:
        self.settings = settings
        self.template: PromptTemplate = get_template(settings.template)
        self.system = settings.system_prompt or self.template.system
        if count_tokens is None:
            count_tokens, counter_kind = make_token_counter(settings)
        self.count_tokens = count_tokens
        self.counter_kind = counter_kind
        self.max_in_flight = 0  # the most ever in flight at once (reported by benchmarks)
        # Retries and fail-over are the pool's (bounded, counted per record), not the SDK's.
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.pool = ReplicaPool(settings, urls)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered, over all replicas."""
        return self.pool.in_flight

    async def close(self) -> None:
        await self.pool.close()

    # --- one request, retried --------------------------------------------------------
    def stage_mode(self, index: int) -> str:
        """How stage `index` is asked: "choice" (constrained A-E), "letter" (a short free
        reply to read) or "text" (free text with the stage's sampling)."""
        s = self.settings
        stage = self.template.stages[index]
        last = index == len(self.template.stages) - 1
        if last and s.asks_choice_last(self.template):
            return "choice"
        if stage.answer == "choice":
            return "letter"
        return "text"

    def sampling(self, stage: Stage) -> tuple[float, int]:
        """(temperature, max_tokens) of a free-text stage."""
        s = self.settings
        if stage.sampling == "summary" and self.template.family == "llovi":
            return s.llovi.summary_temperature, s.llovi.summary_max_tokens
        return s.temperature, s.max_tokens

    async def _send(self, messages: list[dict[str, str]], index: int,
                    record: AnswerRecord) -> _Reply:
        """One chat request for stage `index` through the pool (each try counted in
        `record.attempts`); raises the pool's error when it gives up."""
        s = self.settings
        kwargs: dict[str, object] = {"model": s.model_name, "messages": messages}
        mode = self.stage_mode(index)
        if mode == "choice":
            kwargs.update(
                max_tokens=_CHOICE_MAX_TOKENS,
                temperature=0.0,
                logprobs=True,
                top_logprobs=_TOP_LOGPROBS,
                extra_body={"structured_outputs": {"choice": list(OPTION_LETTERS)}},
            )
        elif mode == "letter":
            kwargs.update(max_tokens=16, temperature=0.0)  # a short free-text letter reply
        else:
            temperature, max_tokens = self.sampling(self.template.stages[index])
            kwargs.update(max_tokens=max_tokens, temperature=temperature)

        def sent() -> None:  # each try counts in the record, on whichever replica
            record.attempts += 1
            self.max_in_flight = max(self.max_in_flight, self.pool.in_flight + 1)

        resp = await self.pool.create(kwargs, on_send=sent)
        choice = resp.choices[0]
        usage = resp.usage
        return _Reply(
            text=choice.message.content or "",
            option_probs=option_probabilities(choice.logprobs) if mode == "choice" else None,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=choice.finish_reason,
        )

    # --- one question ------------------------------------------------------------------
    def _generated(self, index: int) -> int:
        mode = self.stage_mode(index)
        if mode == "choice":
            return _CHOICE_MAX_TOKENS
        if mode == "letter":
            return 16
        return self.sampling(self.template.stages[index])[1]

    def fixed_tokens(self, fields: dict[str, object]) -> int:
        """Tokens of the context that holds the transcript, without the transcript: the
        system line, the stages' text with the question and options (all turns of a
        conversation), and what those stages may generate."""
        stages = self.template.stages
        indices = range(len(stages)) if self.template.conversation else range(1)
        empty = _Prefill(dict(fields, transcript=""))
        total = self.count_tokens(self.system)
        for i in indices:
            total += self.count_tokens(stages[i].user.format_map(empty)) + self._generated(i)
        return total

    def budget_tokens(self, fields: dict[str, object], q_uid: str = "") -> int | None:
        """Tokens left for the transcript (None: no context limit known). Raises ReaderError
        naming the question when its fixed part alone does not fit the context."""
        limit = self.settings.max_model_len
        if limit is None:
            return None
        fixed = self.fixed_tokens(fields)
        if fixed > limit:
            raise ReaderError(
                f"question {q_uid}: the template {self.template.name!r}, question and options "
                f"need {fixed} tokens with the reply, over the context of {limit} "
                "(reader.max_model_len): not sent"
            )
        return max(limit - self.settings.reserve_tokens - fixed, 0)

    def shift_orders(self) -> list[list[int]]:
        """The option order of each shift: position j shows original option order[j]."""
        n = len(OPTION_LETTERS)
        return [[(j + k) % n for j in range(n)] for k in range(self.settings.permutations)]

    async def answer(self, question: Question, transcript: Transcript) -> AnswerRecord:
        """Answer one question; never raises for a failed request (the record says why)."""
        s = self.settings
        template = self.template
        t0 = time.perf_counter()
        record = AnswerRecord(
            q_uid=question.q_uid,
            video_id=question.video_id,
            prediction=None,
            letter=None,
            option_probs=None,
            raw_output="",
            template=template.name,
            answer=question.answer,
        )
        summary_words = s.llovi.summary_words if template.family == "llovi" else s.summary_words
        try:
            fields = prompt_fields(question, "", transcript.duration, 0, summary_words)
            digest = s.digest_similarity if (template.digest and s.digest) else None
            lines, report = fit_transcript(
                transcript, self.budget_tokens(fields, question.q_uid), self.count_tokens,
                s.dedup_threshold, digest, template.lines,
            )
            record.budget = dict(report.to_dict(), counter=self.counter_kind)
            base: dict[str, object] = dict(
                transcript=render_lines(lines, template.lines),
                # Subsampled lines each stand for a longer stretch than one caption did.
                num_captions=len(lines) if "subsample" in report.policy
                else len(transcript.captions),
                duration=transcript.duration,
            )
            # Stages before the first that shows the options are asked once; the rest once
            # per option order.
            split = next((i for i, st in enumerate(template.stages) if st.shows_options()),
                         len(template.stages))
            shared: dict[str, object] = {}
            messages = [{"role": "system", "content": self.system}]
            for index in range(split):
                _, messages = await self._stage(index, question, base, shared, messages,
                                                None, record)
            orders = self.shift_orders()
            replies: list[_Reply] = []
            for order in orders:
                fields_k = dict(shared)
                turn = list(messages)
                reply = None
                for index in range(split, len(template.stages)):
                    reply, turn = await self._stage(index, question, base, fields_k, turn,
                                                    order, record)
                assert reply is not None
                replies.append(reply)
            self._read_answer(record, replies, orders, question)
        except (openai.APIError, ReaderError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        record.latency_s = time.perf_counter() - t0
        return record

    async def _stage(
        self, index: int, question: Question, base: dict[str, object],
        outputs: dict[str, object], messages: list[dict[str, str]],
        order: list[int] | None, record: AnswerRecord,
    ) -> tuple[_Reply, list[dict[str, str]]]:
        """Ask stage `index`; returns its reply and the conversation so far."""
        s = self.settings
        template = self.template
        stage = template.stages[index]
        summary_words = s.llovi.summary_words if template.family == "llovi" else s.summary_words
        fields = prompt_fields(question, str(base["transcript"]), float(base["duration"]),
                               int(base["num_captions"]), summary_words, order)
        fields.update(outputs)
        user = fill(stage.user, fields, f"{template.name!r} stage {index + 1}")
        if template.conversation:
            sent = [*messages, {"role": "user", "content": user}]
        else:
            sent = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
        reply = await self._send(sent, index, record)
        record.stage_outputs.append(reply.text)
        record.finish_reasons.append(reply.finish_reason)
        record.prompt_tokens += reply.prompt_tokens
        record.completion_tokens += reply.completion_tokens
        if self.stage_mode(index) == "text" and reply.finish_reason == "length":
            record.truncated = True
        if stage.output:
            outputs[stage.output] = reply.text.strip()
        return reply, [*sent, {"role": "assistant", "content": reply.text}]

    def _read_answer(self, record: AnswerRecord, replies: list[_Reply],
                     orders: list[list[int]], question: Question) -> None:
        last = len(self.template.stages) - 1
        record.raw_output = replies[-1].text
        if self.stage_mode(last) == "choice":
            per_shift: list[list[float]] = []
            for reply, order in zip(replies, orders, strict=True):
                probs = reply.option_probs
                text = reply.text.strip()
                if probs is None and text in OPTION_LETTERS:  # no logprobs: the letter alone
                    probs = [float(L == text) for L in OPTION_LETTERS]
                if probs is None:
                    continue
                original = [0.0] * len(OPTION_LETTERS)
                for position, option in enumerate(order):
                    original[option] = probs[position]
                per_shift.append(original)
            if len(per_shift) == len(replies):
                mean = [sum(p[i] for p in per_shift) / len(per_shift)
                        for i in range(len(OPTION_LETTERS))]
                record.option_probs = mean
                if len(orders) > 1:
                    record.shift_probs = per_shift
                best = max(mean)
                winners = [i for i, p in enumerate(mean) if p == best]
                text = replies[0].text.strip()
                if len(orders) == 1 and text in OPTION_LETTERS:
                    winners = [OPTION_LETTERS.index(text)]  # the letter the model wrote
                if len(winners) == 1:
                    record.prediction = winners[0]
                    record.letter = OPTION_LETTERS[winners[0]]
                else:
                    record.invalid_reason = (
                        "tie between " + ", ".join(OPTION_LETTERS[i] for i in winners))
                return
            # A server that ignored the constraint: read the text, never guess.
        if len(replies) > 1:  # free-text shifts are not averaged (validate refuses them)
            record.invalid_reason = "several option orders without probabilities"
            return
        reply = replies[0]
        # LLoVi reads the reply's very first character, unstripped, as its code does.
        text = reply.text if self.template.reading == "first_char" else reply.text.strip()
        record.prediction = self.template.parser(text, question.options)
        if record.prediction is not None:
            record.letter = OPTION_LETTERS[record.prediction]
        elif record.truncated:
            record.invalid_reason = "truncated: a free-text stage stopped at max_tokens"
        else:
            record.invalid_reason = "unreadable reply"

    # --- many questions ------------------------------------------------------------------
    async def answer_all(
        self,
        items: Sequence[tuple[Question, Transcript]],
        writer: AnswerWriter | None = None,
        progress: bool = True,
    ) -> list[AnswerRecord]:
        """Answer `items` with `concurrency` requests in flight; records in input order."""
        from tqdm.auto import tqdm

        gate = asyncio.Semaphore(self.settings.concurrency)

        async def one(q: Question, t: Transcript) -> AnswerRecord:
            async with gate:
                return await self.answer(q, t)

        tasks = [asyncio.ensure_future(one(q, t)) for q, t in items]
        bar = tqdm(total=len(tasks), desc="reader", unit="q", disable=not progress)
        try:
            for future in asyncio.as_completed(tasks):
                record = await future
                if writer is not None:
                    writer.write(record)  # one line per finished question: safe to kill
                bar.update(1)
        finally:
            bar.close()
            for task in tasks:
                task.cancel()
        return [task.result() for task in tasks]


class _Prefill(dict):
    """Field values for measuring template overhead: unknown stage outputs count as empty."""

    def __missing__(self, key: str) -> str:
        return ""


def answer_questions(
    settings: ReaderSettings,
    items: Sequence[tuple[Question, Transcript]],
    out_jsonl: Path,
    progress: bool = True,
    server: ManagedServer | ManagedReplicas | None = None,
) -> list[AnswerRecord]:
    """Answer every (question, transcript) pair; return one record per question, input order.

    Resumes from `out_jsonl`: finished q_uids are read back, not asked again (failed ones
    are). New records are appended as they finish. Managed mode starts `reader.replicas` vLLM
    servers for the call unless running ones are passed as `server` (tests and benchmarks
    share them); external mode uses `settings.url` (one URL or a list). The template used
    is saved to `<out_jsonl stem>.template.json`.
    Raises ReaderError only when the server cannot be started; a failed request is a record.
    """
    import json

    out_jsonl = Path(out_jsonl)
    previous = read_answers(out_jsonl)
    todo = [(q, t) for q, t in items if q.q_uid not in previous or previous[q.q_uid].failed]
    template = get_template(settings.template)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    template_path = out_jsonl.with_name(out_jsonl.stem + ".template.json")
    template_path.write_text(
        json.dumps(
            dict(template.to_dict(), system=settings.system_prompt or template.system), indent=1
        )
        + "\n",
        encoding="utf-8",
    )
    fresh: list[AnswerRecord] = []
    if todo:
        with server_urls(settings, server) as urls:
            fresh = _run(settings, urls, todo, out_jsonl, progress)
    by_id = {r.q_uid: r for r in previous.values()}
    by_id.update((r.q_uid, r) for r in fresh)
    return [by_id[q.q_uid] for q, _ in items]


def _run(
    settings: ReaderSettings,
    base_url: str | Sequence[str],
    items: Sequence[tuple[Question, Transcript]],
    out_jsonl: Path,
    progress: bool,
) -> list[AnswerRecord]:
    async def main() -> list[AnswerRecord]:
        reader = Reader(settings, base_url)
        try:
            with AnswerWriter(out_jsonl) as writer:
                return await reader.answer_all(items, writer, progress)
        finally:
            await reader.close()

    return asyncio.run(main())
