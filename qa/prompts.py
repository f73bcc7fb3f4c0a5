"""Every reader prompt, as a named template: system line, stages, how the answer is read.

A stage is one user turn. Its `user` text is a format string filled strictly from the
question's fields (`prompt_fields`) plus the outputs of earlier stages (stage k's reply is
the field named by its `output`). A stage's `answer` says how it is asked: "choice" = one
letter A-E (vLLM structured outputs + logprobs when `reader.structured_choice`), "text" =
free text. In a `conversation` template every stage is the next turn of one chat (earlier
turns and replies are sent again, as LLoVi's GPT client does); otherwise each stage is a
fresh [system, user] request.

Two families, told apart by name:
  ours    standard, summarize_then_answer, cot: timed transcript lines with the caption
          digest ("12-19: ..." for a run of identical captions), EgoSchema's "C" explained,
          and every flow ends in the constrained A-E choice (nothing to parse) where the
          server has structured outputs; the free-text parser reads it elsewhere.
  llovi_  llovi_standard, llovi_sum_q, llovi_zs_cot: LLoVi's flows in structure (CeeZh/
          LLoVi prompts.py `qa_standard`, `sum_q` then `qa_sum`, `qa_zs-cot`; dataset.py
          joins EgoSchema captions with ". ", untimed), in our own words, run with LLoVi's
          settings: no digest, no extra notes, and its answer reading, the reply's first
          character (`reader.llovi.constrained_choice: true` asks the last turn as the
          constrained choice instead). Its summary stage writes `reader.llovi.summary_words`
          (500) words at temperature 1.0, as its documented command runs it.

Fields: transcript, duration, seconds_per_caption, num_captions, question, options (the
block "A. ...\\nB. ..."), options_llovi (" A: ...\\n B: ..."), option_a .. option_e,
summary_words.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from qa.errors import ReaderError
from qa.parsing import parse_answer
from qa.records import OPTION_LETTERS, Question
from qa.transcript import LineStyle, format_seconds

AnswerReading = Literal["choice", "parser", "first_char"]


@dataclass(frozen=True)
class Stage:
    user: str
    answer: Literal["choice", "text"]
    output: str | None = None  # the field name later stages use for this stage's reply
    # "summary": sampled with the summary settings of the family (reader.llovi.* for
    # LLoVi's); "default": reader.temperature / reader.max_tokens.
    sampling: Literal["default", "summary"] = "default"

    def shows_options(self) -> bool:
        names = {n for _, n, _, _ in string.Formatter().parse(self.user) if n}
        return bool(names & {"options", "options_llovi", *OPTION_FIELDS})


OPTION_FIELDS = tuple(f"option_{letter.lower()}" for letter in OPTION_LETTERS)


def first_char_answer(reply: str | None, options: Sequence[str] = ()) -> int | None:
    """LLoVi's answer reading (prompts.py `first_char_as_answer`): the reply's very first
    character, if it is one of A-E; anything else is invalid."""
    if reply and reply[0] in OPTION_LETTERS:
        return OPTION_LETTERS.index(reply[0])
    return None


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    stages: tuple[Stage, ...]
    family: Literal["ours", "llovi"] = "ours"
    conversation: bool = False  # every stage the next turn of one chat
    lines: LineStyle = "timed"  # how the transcript is written (qa.transcript)
    digest: bool = True  # merge consecutive identical captions (reader.digest can turn off)
    # How a free-text last stage is read: "parser" (qa.parsing) or "first_char" (LLoVi's).
    reading: AnswerReading = "parser"

    @property
    def parser(self) -> Callable[[str | None, Sequence[str]], int | None]:
        return first_char_answer if self.reading == "first_char" else parse_answer

    def fields(self) -> list[str]:
        """Every placeholder the stages use, in order of first use."""
        seen: list[str] = []
        for stage in self.stages:
            for _, name, _, _ in string.Formatter().parse(stage.user):
                if name and name not in seen:
                    seen.append(name)
        return seen

    def to_dict(self) -> dict[str, object]:
        """A JSON-able copy, saved next to the predictions and in the run's identity."""
        return {
            "name": self.name,
            "family": self.family,
            "system": self.system,
            "conversation": self.conversation,
            "lines": self.lines,
            "digest": self.digest,
            "reading": self.reading,
            "stages": [
                {"user": s.user, "answer": s.answer, "output": s.output, "sampling": s.sampling}
                for s in self.stages
            ],
        }


class _Strict(dict):
    def __init__(self, values: Mapping[str, object], where: str) -> None:
        super().__init__(values)
        self.where = where

    def __missing__(self, key: str) -> object:
        raise ReaderError(
            f"prompt template {self.where}: placeholder {{{key}}} has no value; "
            f"fields given: {', '.join(sorted(self))}"
        )


def fill(text: str, values: Mapping[str, object], where: str) -> str:
    """`text.format(**values)`, raising ReaderError naming `where` and the missing field."""
    return text.format_map(_Strict(values, where))


def prompt_fields(
    question: Question,
    transcript_text: str,
    duration: float,
    num_captions: int,
    summary_words: int,
    order: Sequence[int] | None = None,
) -> dict[str, object]:
    """The values every template can use, named as the templates name them. `order`: the
    original option shown at each position (option-order debiasing), default as given."""
    if len(question.options) != len(OPTION_LETTERS):
        raise ReaderError(
            f"question {question.q_uid}: expected {len(OPTION_LETTERS)} options, "
            f"got {len(question.options)}"
        )
    shown = [question.options[i].strip() for i in (order or range(len(OPTION_LETTERS)))]
    fields: dict[str, object] = {
        "transcript": transcript_text,
        "duration": format_seconds(duration),
        "seconds_per_caption": format_seconds(duration / max(num_captions, 1)),
        "num_captions": num_captions,
        "question": question.question.strip(),
        "options": "\n".join(f"{L}. {o}" for L, o in zip(OPTION_LETTERS, shown, strict=True)),
        "options_llovi": "\n".join(
            f" {L}: {o}" for L, o in zip(OPTION_LETTERS, shown, strict=True)
        ),
        "summary_words": summary_words,
    }
    for name, option in zip(OPTION_FIELDS, shown, strict=True):
        fields[name] = option
    return fields


TEMPLATES: dict[str, PromptTemplate] = {}


def register(template: PromptTemplate) -> PromptTemplate:
    if template.name in TEMPLATES:
        raise ReaderError(f"prompt template {template.name!r} is registered twice")
    TEMPLATES[template.name] = template
    return template


# --- ours ----------------------------------------------------------------------------------

_SYSTEM = "You are a helpful expert in first-person video analysis."
_VIDEO = (
    "Below are descriptions of a first-person video, one line per moment in the form "
    "`seconds: description`, in time order; a line `a-b: description` means the same "
    "description held from second a to second b. The video is {duration} seconds long and "
    "each description covers about {seconds_per_caption} seconds. In the question and the "
    'options, "C" is the camera wearer (the person filming), whom the descriptions may '
    'call "a person", "the camera wearer" or "C".\n\n{transcript}\n\n'
)
_CHOICES = "Question: {question}\n\nOptions:\n{options}\n\n"
_ONE_LETTER = (
    "Answer with a single letter (A, B, C, D or E) and nothing else: the option that best "
    "answers the question."
)

# The transcript, the question and its options; one letter back.
register(PromptTemplate("standard", _SYSTEM, (Stage(_VIDEO + _CHOICES + _ONE_LETTER, "choice"),)))

# A summary conditioned on the question, then the answer from the summary alone.
register(
    PromptTemplate(
        "summarize_then_answer",
        _SYSTEM,
        (
            Stage(
                _VIDEO + "Question: {question}\n\nWrite a summary of the video in about "
                "{summary_words} words that keeps everything needed to answer this question.",
                "text",
                output="summary",
                sampling="summary",
            ),
            Stage(
                "Here is a summary of a first-person video {duration} seconds long:\n\n"
                '{summary}\n\n"C" is the camera wearer.\n\n' + _CHOICES + _ONE_LETTER,
                "choice",
            ),
        ),
    )
)

# Zero-shot chain of thought: reasoning, then the letter as the next turn of the chat.
register(
    PromptTemplate(
        "cot",
        _SYSTEM,
        (
            Stage(
                _VIDEO + _CHOICES + "Think step by step about what happens in the video and "
                "which option it supports. Do not give the final letter yet.",
                "text",
            ),
            Stage("Now give your final answer. " + _ONE_LETTER, "choice"),
        ),
        conversation=True,
    )
)

# --- LLoVi's flows, in structure ----------------------------------------------------------------

_LLOVI_SYSTEM = "You are an expert assistant for first-person view video analysis."
_LLOVI_LETTER_RULE = (
    "Answer the multiple-choice question with exactly one of the letters A, B, C, D, E. "
    "Write nothing else: no words and no reasons."
)
_LLOVI_DESCRIPTIONS = (
    "What follows describes a first-person view video of {duration} seconds in sentences, "
    "each one for {seconds_per_caption} seconds of it, in order, with no gaps and no "
    "overlaps. Descriptions: {transcript}.\n"
)
_LLOVI_QUESTION = (
    " Pick the answer from the choices using the descriptions; it is a single letter.\n"
    " Question: {question}.\n Choices:\n{options_llovi}\n"
)

# qa_standard: the rule first, then descriptions, question and choices; first character.
register(PromptTemplate(
    "llovi_standard", _LLOVI_SYSTEM,
    (Stage(_LLOVI_LETTER_RULE + " " + _LLOVI_DESCRIPTIONS + _LLOVI_QUESTION, "text"),),
    family="llovi", lines="llovi", digest=False, reading="first_char",
))  # fmt: skip

# sum_q then qa_sum: a summary written with the question in mind (no choices), then, as a
# separate request, the letter from the summary alone (LLoVi runs them as two commands).
register(PromptTemplate(
    "llovi_sum_q", _LLOVI_SYSTEM,
    (
        Stage(_LLOVI_DESCRIPTIONS + " Summarise the video in {summary_words} words. Someone "
              "will answer this multiple-choice question from your summary alone, so keep "
              "what it needs: {question}", "text", output="summary", sampling="summary"),
        Stage(_LLOVI_LETTER_RULE + " What follows describes a first-person view video of "
              "{duration} seconds. Descriptions: {summary}.\n" + _LLOVI_QUESTION, "text"),
    ),
    family="llovi", lines="llovi", digest=False, reading="first_char",
))  # fmt: skip

# qa_zs-cot: descriptions, question and choices, reasoning asked for; then a second turn of
# the same chat asking for the letter only; the first character of that reply.
register(PromptTemplate(
    "llovi_zs_cot", _LLOVI_SYSTEM,
    (
        Stage(_LLOVI_DESCRIPTIONS + _LLOVI_QUESTION + " Reason about it step by step before "
              "answering.", "text"),
        Stage("Now reply with exactly one of the letters A, B, C, D, E and nothing else.",
              "text"),
    ),
    family="llovi", conversation=True, lines="llovi", digest=False, reading="first_char",
))  # fmt: skip


def get_template(name: str) -> PromptTemplate:
    """The template called `name`; ReaderError listing every known name otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ReaderError(
            f"unknown prompt template {name!r}; known: {', '.join(sorted(TEMPLATES))}"
        ) from None
