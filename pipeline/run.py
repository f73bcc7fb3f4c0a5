"""The whole run: dataset -> captioned transcripts (pipeline/captioning.py) -> reader ->
predictions, metrics and report (pipeline/report.py).

    mmser videoqa --dataset egoschema --captioner mmser        (make videoqa DATASET=...)

Rerunning the same command resumes the newest unfinished run folder of that dataset and
captioner: cached videos are not captioned again and answered questions are not asked
again. A run folder's run.json records what decides its answers; a resume with anything
different is refused (`check_same_run`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from captioner.base import captioner_identity, check_captioner_name
from pipeline.cache import sampling_identity
from pipeline.captioning import Failure, caption_videos_cached
from pipeline.config import Config
from pipeline.datasets import Dataset, load_dataset
from pipeline.errors import PipelineError
from pipeline.report import build_metrics, render_report
from pipeline.report_html import write_html_report

log = logging.getLogger(__name__)


# Reader settings that change answers (not how fast they come: concurrency, timeouts, ...).
_ANSWER_KEYS = ("model", "served_name", "system_prompt", "structured_choice", "temperature",
                "max_tokens", "summary_words", "max_model_len", "reserve_tokens",
                "dedup_threshold", "digest", "digest_similarity", "permutations", "llovi")


def run_identity(config: Config, dataset: str, captioner: str) -> dict[str, Any]:
    """Everything that decides a run's answers: the dataset, the captioner (its identity,
    model files fingerprinted), the sampling, the template and its text, and the reader's
    answer-changing settings. A run folder is only resumed by a run of the same identity."""
    from qa.prompts import get_template

    reader = dataclasses.asdict(config.reader)
    template = get_template(config.reader.template)
    return {
        "dataset": dataset,
        "dataset_settings": dataclasses.asdict(config.datasets[dataset])
        if dataset in config.datasets else None,
        "captioner": captioner_identity(config.captioner, captioner),
        "sampling": sampling_identity(config.sampling),
        "template": template.to_dict(),
        "reader": {k: reader[k] for k in _ANSWER_KEYS},
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k),
                                                     f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def check_same_run(folder: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume `folder` with settings that would mix answers of two runs."""
    path = folder / "run.json"
    if not path.exists():
        if (folder / "predictions.jsonl").exists():
            raise PipelineError(
                f"{folder} has answers but no run.json (made by an older version): its "
                "settings cannot be checked; rerun with --new for a new run folder"
            )
        return
    old = json.loads(path.read_text())
    changed = _differences(old, json.loads(json.dumps(identity)))
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8
                                          else "")
        raise PipelineError(
            f"{folder} was run with other settings ({shown}); resuming would mix answers "
            "of two configurations: rerun with --new for a new run folder (or --run-dir DIR)"
        )


def choose_run_dir(config: Config, dataset: str, captioner: str, run_dir: str | None,
                   new: bool) -> tuple[Path, bool]:
    """The run folder and whether it resumes an unfinished run of the same dataset/captioner."""
    if run_dir:
        path = Path(run_dir)
        return path, (path / "config.yaml").exists()
    root = Path(config.outputs.runs_dir)
    label = Path(dataset).name if "/" in dataset else dataset
    prefix = f"{label}-{captioner}-"
    if not new and root.is_dir():
        unfinished = sorted(
            p for p in root.glob(prefix + "*")
            if p.is_dir() and not (p / "metrics.json").exists()
        )
        if unfinished:
            return unfinished[-1], True
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{prefix}{stamp}", False


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def run_videoqa(
    config: Config,
    dataset_name: str,
    captioner_name: str | None = None,
    run_dir: str | None = None,
    new: bool = False,
) -> Path:
    """Answer every question of a dataset; returns the run folder. Raises PipelineError only
    when nothing at all could be done."""
    from qa.evaluate import AnswerRecord, write_submission
    from qa.reader import answer_questions

    captioner_name = captioner_name or config.captioner.name
    check_captioner_name(captioner_name)  # before any output is written
    dataset: Dataset = load_dataset(dataset_name, config.datasets)
    folder, resumed = choose_run_dir(config, dataset_name, captioner_name, run_dir, new)
    identity = run_identity(config, dataset_name, captioner_name)
    if resumed:
        check_same_run(folder, identity)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'resuming' if resumed else 'run folder'}: {folder}")
    (folder / "run.json").write_text(json.dumps(identity, indent=1))
    snapshot = dict(config.to_dict(), run={"dataset": dataset_name, "captioner": captioner_name})
    (folder / "config.yaml").write_text(yaml.safe_dump(snapshot, sort_keys=False))
    failures_path = folder / "failures.jsonl"
    failures_path.unlink(missing_ok=True)  # rewritten from scratch: a resume retries failures

    def record_failure(failure: Failure) -> None:
        _append_jsonl(failures_path, dataclasses.asdict(failure))

    for video_id in dataset.missing_videos:
        record_failure(Failure(video_id, str(dataset.root / "videos" / f"{video_id}.mp4"),
                               "load", "video file is missing"))

    t0 = time.perf_counter()
    videos = [dataset.videos[v] for v in sorted({q.video_id for q in dataset.answerable()})]
    captions = caption_videos_cached(videos, config, captioner_name, on_failure=record_failure)
    t_caption = time.perf_counter() - t0
    items = [(q, captions.transcripts[q.video_id]) for q in dataset.questions
             if q.video_id in captions.transcripts]
    if not items:
        raise PipelineError(
            f"nothing to answer: all {len(dataset.questions)} questions' videos failed; "
            f"see {failures_path}"
        )
    t1 = time.perf_counter()
    answers = answer_questions(config.reader, items, folder / "predictions.jsonl")
    t_read = time.perf_counter() - t1
    for answer in answers:
        if answer.error:
            record_failure(Failure(answer.q_uid, "", "read", answer.error))
    # Questions whose video failed count as failed answers (0 strict, 0.2 LLoVi-style) and
    # are written -1 in the submission: nothing is invented, nothing silently dropped.
    video_errors = {f.video_id: f"{f.stage}: {f.reason}" for f in captions.failures}
    video_errors.update((v, "load: video file is missing") for v in dataset.missing_videos)
    with (folder / "predictions.jsonl").open("a") as fh:
        for q in dataset.questions:
            if q.video_id not in captions.transcripts:
                record = AnswerRecord(
                    q_uid=q.q_uid, video_id=q.video_id, prediction=None, letter=None,
                    option_probs=None, raw_output="", answer=q.answer,
                    error=f"video failed, question not asked ({video_errors.get(q.video_id)})",
                )
                answers.append(record)
                fh.write(record.to_json() + "\n")
    write_submission(answers, folder)
    metrics = build_metrics(dataset, captions, answers, captioner_name, config,
                            {"caption_stage": t_caption, "read": t_read,
                             "total": time.perf_counter() - t0})
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "report.md").write_text(render_report(metrics))
    write_html_report(folder, config, dataset, captions.transcripts, answers)
    print(render_report(metrics))
    return folder


