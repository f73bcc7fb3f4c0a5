"""What the HTML report of a videoqa run shows, gathered once and kept in the run folder.

At the end of a run `save_report_data` writes RUN/report_data.json: every video the
questions ask about (id, path, duration, its captions with coarse caption and refinement
passes), the questions with their options, and the prompt each question's reader saw,
rebuilt with the reader's own functions (qa/) because answer records keep the reply, not
the prompt. `load_run` reads it back with metrics.json, predictions.jsonl and failures.jsonl,
so `mmser report RUN` needs neither the dataset config nor the cache.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.datasets import Dataset
from pipeline.errors import PipelineError
from pipeline.records import Question, Transcript

log = logging.getLogger(__name__)

DATA_FILE = "report_data.json"
# What `mmser report` needs in a run folder, each with what writes it.
REQUIRED = {"metrics.json": "written when the run finishes",
            "predictions.jsonl": "the reader's answers",
            DATA_FILE: "written beside report.md by this version's runs"}


@dataclass
class RunData:
    folder: Path
    metrics: dict[str, Any]
    identity: dict[str, Any]  # run.json
    videos: list[dict[str, Any]]
    questions: list[dict[str, Any]]
    prompts: dict[str, list[str]]  # q_uid -> each stage's user message
    prompt_note: str
    answers: dict[str, dict[str, Any]]  # q_uid -> AnswerRecord as a dict
    failures: list[dict[str, Any]] = field(default_factory=list)
    snapshot: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml


def _question_dict(q: Question) -> dict[str, Any]:
    return {"q_uid": q.q_uid, "video_id": q.video_id, "question": q.question,
            "options": list(q.options), "answer": q.answer}


def _rebuild_prompts(config: Config, items: list[tuple[Question, Transcript]],
                     answers: dict[str, Any]) -> tuple[dict[str, list[str]], str]:
    """Each question's user messages as the reader built them: the same budget, digest and
    template fill (first option order; later stages get the replies the run recorded)."""
    from qa.prompts import fill, prompt_fields
    from qa.reader import Reader
    from qa.transcript import fit_transcript, render_lines

    s = config.reader
    reader = Reader(s, "http://127.0.0.1:9/v1")  # never sends: only its prompt parts
    template = reader.template
    words = s.llovi.summary_words if template.family == "llovi" else s.summary_words
    out: dict[str, list[str]] = {}
    for q, transcript in items:
        try:
            fields = prompt_fields(q, "", transcript.duration, 0, words)
            digest = s.digest_similarity if (template.digest and s.digest) else None
            lines, report = fit_transcript(transcript, reader.budget_tokens(fields, q.q_uid),
                                           reader.count_tokens, s.dedup_threshold, digest,
                                           template.lines)
            count = len(lines) if "subsample" in report.policy else len(transcript.captions)
            text = render_lines(lines, template.lines)
            record = answers.get(q.q_uid)
            replies = list(record.stage_outputs) if record else []
            outputs: dict[str, object] = {}
            messages = []
            for i, stage in enumerate(template.stages):
                order = reader.shift_orders()[0] if stage.shows_options() else None
                values = prompt_fields(q, text, transcript.duration, count, words, order)
                values.update(outputs)
                messages.append(fill(stage.user, values, f"{template.name!r} stage {i + 1}"))
                if stage.output and i < len(replies):
                    outputs[stage.output] = replies[i].strip()
            out[q.q_uid] = [f"[system]\n{reader.system}"] + messages
        except Exception as exc:  # the report stands without one prompt
            out[q.q_uid] = [f"(the prompt could not be rebuilt: {exc})"]
    note = (f"rebuilt after the run from the transcript with the reader's own functions "
            f"(template {template.name!r}, token counter: {reader.counter_kind})")
    return out, note


def save_report_data(folder: Path, config: Config, dataset: Dataset,
                     transcripts: dict[str, Transcript], answers: list[Any]) -> Path:
    """Write RUN/report_data.json from what the run has in memory."""
    videos = []
    for video_id in sorted({q.video_id for q in dataset.questions}):
        item = dataset.videos.get(video_id)
        transcript = transcripts.get(video_id)
        videos.append({
            "video_id": video_id,
            "path": str(item.path) if item else str(dataset.root / "videos" / f"{video_id}.mp4"),
            "duration": transcript.duration if transcript else None,
            "captions": [
                {"timestamp": float(c.timestamp), "caption": c.caption,
                 "coarse_caption": c.coarse_caption, "refine_passes": int(c.refine_passes)}
                for c in (transcript.captions if transcript else [])
            ],
        })
    by_id = {a.q_uid: a for a in answers}
    items = [(q, transcripts[q.video_id]) for q in dataset.questions
             if q.video_id in transcripts]
    prompts, note = _rebuild_prompts(config, items, by_id)
    data = {"videos": videos, "questions": [_question_dict(q) for q in dataset.questions],
            "prompts": prompts, "prompt_note": note}
    path = folder / DATA_FILE
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    from qa.answers import read_jsonl

    return read_jsonl(path, dict, f"a JSON record of {path.name}", PipelineError)


def load_run(folder: str | Path) -> RunData:
    """A finished run folder's report inputs; PipelineError naming the folder and every
    missing file when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: not a folder (expected a videoqa run folder)")
    missing = [f"{name} ({why})" for name, why in REQUIRED.items() if not (folder / name).exists()]
    if missing:
        raise PipelineError(f"{folder} is not a finished videoqa run: missing "
                            + ", ".join(missing) + " (nor a caption evaluation folder: no "
                            "caption_view.json)")
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        data = json.loads((folder / DATA_FILE).read_text())
        identity = json.loads((folder / "run.json").read_text()) \
            if (folder / "run.json").exists() else {}
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{folder}: a report input is not valid JSON: {exc}") from exc
    answers = {r["q_uid"]: r for r in _jsonl(folder / "predictions.jsonl")}
    snapshot: dict[str, Any] = {}
    if (folder / "config.yaml").exists():
        import yaml

        snapshot = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    return RunData(folder=folder, metrics=metrics, identity=identity,
                   videos=data["videos"], questions=data["questions"],
                   prompts=data.get("prompts", {}), prompt_note=data.get("prompt_note", ""),
                   answers=answers, failures=_jsonl(folder / "failures.jsonl"),
                   snapshot=snapshot)
