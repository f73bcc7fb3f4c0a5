"""Every reader prompt, as a named template: system line, stages, answer parser.

A stage is one chat request `[system, user]`. Its `user` text is a format string filled
strictly from the question's fields (`prompt_fields`) plus the outputs of earlier stages
(stage `k`'s reply is the field named by its `output`). A stage's `answer` says how it is
asked: "choice" = one letter A-E (vLLM structured outputs + logprobs when enabled),
"text" = free text (max_tokens, temperature from settings). The last stage gives the answer;
a "text" last stage is read with the template's parser.

Fields: transcript, duration, seconds_per_caption, num_captions, question, options (the
block "A. ...\\nB. ..."), option_a .. option_e, summary_words.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ReaderError
from pipeline.records import OPTION_LETTERS, Question
from qa.parsing import parse_answer
from qa.transcript import format_seconds


@dataclass(frozen=True)
class Stage:
    user: str
    answer: Literal["choice", "text"]
    output: str | None = None  # the field name later stages use for this stage's reply


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    stages: tuple[Stage, ...]
    parser: Callable[[str | None, Sequence[str]], int | None] = parse_answer

    def fields(self) -> list[str]:
        """Every placeholder the stages use, in order of first use."""
        seen: list[str] = []
        for stage in self.stages:
            for _, name, _, _ in string.Formatter().parse(stage.user):
                if name and name not in seen:
                    seen.append(name)
        return seen

    def to_dict(self) -> dict[str, object]:
        """A JSON-able copy, saved next to the predictions."""
        return {
            "name": self.name,
            "system": self.system,
            "stages": [
                {"user": s.user, "answer": s.answer, "output": s.output} for s in self.stages
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
) -> dict[str, object]:
    """The values every template can use, named as the templates name them."""
    if len(question.options) != len(OPTION_LETTERS):
        raise ReaderError(
            f"question {question.q_uid}: expected {len(OPTION_LETTERS)} options, "
            f"got {len(question.options)}"
        )
    fields: dict[str, object] = {
        "transcript": transcript_text,
        "duration": format_seconds(duration),
        "seconds_per_caption": format_seconds(duration / max(num_captions, 1)),
        "num_captions": num_captions,
        "question": question.question.strip(),
        "options": "\n".join(
            f"{L}. {o.strip()}" for L, o in zip(OPTION_LETTERS, question.options, strict=True)
        ),
        "summary_words": summary_words,
    }
    for letter, option in zip(OPTION_LETTERS, question.options, strict=True):
        fields[f"option_{letter.lower()}"] = option.strip()
    return fields


_SYSTEM = "You are a helpful expert in first-person video analysis."
_VIDEO = (
    "Below are descriptions of a first-person video, one line per moment in the form "
    "`seconds: description`, in time order. The video is {duration} seconds long and each "
    "line covers about {seconds_per_caption} seconds.\n\n{transcript}\n\n"
)
_CHOICES = "Question: {question}\n\nOptions:\n{options}\n\n"
_ONE_LETTER = (
    "Answer with a single letter (A, B, C, D or E) and nothing else: the option that best "
    "answers the question."
)

TEMPLATES: dict[str, PromptTemplate] = {}


def register(template: PromptTemplate) -> PromptTemplate:
    if template.name in TEMPLATES:
        raise ReaderError(f"prompt template {template.name!r} is registered twice")
    TEMPLATES[template.name] = template
    return template


# LLoVi's standard prompt: transcript, question, options; one letter back.
register(PromptTemplate("standard", _SYSTEM, (Stage(_VIDEO + _CHOICES + _ONE_LETTER, "choice"),)))

# LLoVi's two-step prompt: a summary conditioned on the question, then the answer from it.
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
            ),
            Stage(
                "Here is a summary of a first-person video {duration} seconds long:\n\n"
                "{summary}\n\n" + _CHOICES + _ONE_LETTER,
                "choice",
            ),
        ),
    )
)

# Zero-shot chain of thought: reason first, end with a fixed sentence the parser reads.
register(
    PromptTemplate(
        "cot",
        _SYSTEM,
        (
            Stage(
                _VIDEO + _CHOICES + "Think step by step about what happens in the video, "
                "then finish with a last line of the form `The answer is (X)`, where X is "
                "one of A, B, C, D, E.",
                "text",
            ),
        ),
    )
)


def get_template(name: str) -> PromptTemplate:
    """The template called `name`; ReaderError listing every known name otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ReaderError(
            f"unknown prompt template {name!r}; known: {', '.join(sorted(TEMPLATES))}"
        ) from None
