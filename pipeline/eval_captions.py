"""`mmser eval-captions`: caption a dataset's test split (or read a predictions file), then
score it with the standard caption metrics (captioner.caption_metrics) and, when asked, an
LLM judge (qa.judge).

    run = evaluate_captions(config, captioner="mmser", checkpoint="runs/train/refine/model")
    print(run.table)

The run folder (`--out`, default runs/captions-<data>-<captioner>-<time>/) gets:
  captions.jsonl   one line per image as soon as its batch is captioned: {"id", "image",
                   "prediction", "coarse", "refine_passes", "error"}; a rerun with the same
                   --out captions only the images not in it yet (nothing finished is lost)
  per_image.jsonl  {"id", "image", "prediction", "references", "scores", "judge", "error"}
  report.html      each image with references, coarse -> refined edits, per-image scores
                   (pipeline/report_captions.py; `mmser report RUN` rebuilds it)
  metrics.json     {"metrics", "not_computed", "tokenizer", "bertscore_model", "judge_model",
                   "n_items", "n_scored", "n_failed", "failed", "captioner", "data", ...}

An image that cannot be read or captioned, or has no prediction in the file, is listed with
its reason and left out of the scores (n_failed says how many); it never stops the run.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from captioner.caption_metrics import CaptionScores, score_captions
from captioner.train_data import CaptionSample, DataSource, decode_rgb, load_caption_sources
from pipeline.config import Config, EvalCaptionsSettings
from pipeline.errors import DatasetError, PipelineError
from qa.answers import read_jsonl
from qa.judge import judge_captions, judge_model_problem, mean_score

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    id: str
    image: str
    prediction: str | None
    coarse: str | None = None
    refine_passes: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CaptionRun:
    """What `evaluate_captions` wrote and measured."""

    run_dir: Path
    scores: CaptionScores | None
    summary: dict[str, Any]
    table: str


# --- predictions ---------------------------------------------------------------------------


def read_predictions(path: str | Path) -> dict[str, str]:
    """{id: caption} from a predictions file (see `EvalCaptionsSettings.predictions`)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: predictions file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = None
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, caption in data.items():
            if not isinstance(caption, str):
                raise DatasetError(f"{path}: item {key!r}: caption is not text")
            out[str(key)] = caption
        return out
    rows: list[tuple[str, Any]] = []
    if isinstance(data, list):
        rows = [(f"item {i}", row) for i, row in enumerate(data)]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: line {number}: not JSON ({exc})") from exc
    for where, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: {where}: expected an object, got {type(row).__name__}")
        key = row.get("id", row.get("image_id"))
        caption = row.get("caption", row.get("prediction"))
        if key is None:
            raise DatasetError(f"{path}: {where}: no 'id' or 'image_id'")
        if caption is None and row.get("error"):
            continue  # a failed image of an earlier run: it has no prediction
        if not isinstance(caption, str):
            raise DatasetError(f"{path}: {where}: no 'caption' text")
        out[str(key)] = caption
    return out


def _caption_rows(path: Path) -> dict[str, Prediction]:
    """captions.jsonl of an earlier, maybe killed, run; failed images are tried again."""
    rows = read_jsonl(path, lambda d: Prediction(**d), "a caption line", DatasetError)
    return {row.id: row for row in rows if row.error is None}


def caption_samples(
    captioner: Any,
    samples: Sequence[CaptionSample],
    out_path: Path,
    batch_size: int,
    progress: bool = True,
) -> dict[str, Prediction]:
    """Caption every sample, appending one line per image to `out_path` as each batch ends;
    samples already captioned there are not captioned again."""
    from tqdm.auto import tqdm

    done = _caption_rows(out_path)
    todo = [s for s in samples if s.id not in done]
    if done:
        log.info("%s: %d images captioned before, %d to go", out_path, len(done), len(todo))
    with out_path.open("a", encoding="utf-8") as fh, tqdm(
        total=len(todo), desc="caption", unit="image", disable=not progress
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            rows = _caption_batch(captioner, batch)
            for row in rows:
                fh.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
                if row.error is None:
                    done[row.id] = row
                else:
                    done.setdefault(row.id, row)
            fh.flush()
            bar.update(len(batch))
    return done


def _caption_batch(captioner: Any, batch: Sequence[CaptionSample]) -> list[Prediction]:
    rows: dict[str, Prediction] = {}
    readable: list[tuple[CaptionSample, Any]] = []
    for sample in batch:
        pixels = decode_rgb(sample.image)
        if pixels is None:
            rows[sample.id] = Prediction(sample.id, sample.image, None,
                                         error=f"image unreadable: {sample.image}")
        else:
            readable.append((sample, pixels))
    if readable:
        try:
            results = captioner.caption_batch([p for _, p in readable]).results
        except Exception as exc:  # find the one frame that fails; the rest are captioned
            if len(readable) == 1:
                sample = readable[0][0]
                why = f"captioning failed: {type(exc).__name__}: {exc}"
                rows[sample.id] = Prediction(sample.id, sample.image, None, error=why)
                results = []
            else:
                for sample, _ in readable:
                    rows.update({r.id: r for r in _caption_batch(captioner, [sample])})
                results = []
        for (sample, _), result in zip(readable, results, strict=False):
            rows[sample.id] = Prediction(sample.id, sample.image, result.caption,
                                         result.coarse_caption, result.refine_passes)
    return [rows[s.id] for s in batch]


# --- the run -------------------------------------------------------------------------------


def _label(sources: Sequence[DataSource]) -> str:
    first = Path(sources[0].path)
    label = first.stem if first.suffix else first.name
    if sources[0].split:
        label += f"-{sources[0].split}"
    return label + (f"+{len(sources) - 1}" if len(sources) > 1 else "")


def evaluate_captions(
    config: Config,
    captioner: str | None = None,
    checkpoint: str | None = None,
    predictions: str | None = None,
    out: str | None = None,
    judge: bool | None = None,
    progress: bool = True,
) -> CaptionRun:
    """Caption (or read) and score `config.eval_captions.data`; see the module doc."""
    settings: EvalCaptionsSettings = config.eval_captions
    predictions = predictions or settings.predictions
    if not settings.data:
        raise PipelineError("eval_captions.data is empty: name the split to score there, e.g. "
                            "--set 'eval_captions.data=[{format: coco, path: "
                            "data/coco/dataset_coco.json, split: test}]'")
    settings.metrics.validate()
    loaded = load_caption_sources(settings.data)  # logs a summary line per source
    samples = loaded.samples
    if not samples:
        raise PipelineError("eval_captions.data: no usable image in " + loaded.name)
    name = "predictions" if predictions else (captioner or config.captioner.name)
    run_dir = Path(out) if out else Path(config.outputs.runs_dir) / (
        f"captions-{_label(settings.data)}-{name}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {f"{s.item}": s.reason for s in loaded.skipped}
    captioner_info: dict[str, Any]
    if predictions:
        given = read_predictions(predictions)
        rows = {s.id: Prediction(s.id, s.image, given[s.id]) for s in samples if s.id in given}
        for s in samples:
            if s.id not in given:
                failed[s.id] = f"no prediction in {predictions}"
        extra = len(set(given) - {s.id for s in samples})
        if extra:
            log.warning("%s: %d predictions name ids not in the data (ignored)", predictions, extra)
        captioner_info = {"predictions": str(predictions)}
    else:
        from captioner.base import build_captioner, captioner_identity

        captioner_settings = copy.deepcopy(config.captioner)
        if checkpoint:
            getattr(captioner_settings, name).checkpoint = checkpoint
        model = build_captioner(captioner_settings, name)
        batch = settings.batch_size or captioner_settings.batch_size
        rows = caption_samples(model, samples, run_dir / "captions.jsonl", batch, progress)
        for row in list(rows.values()):
            if row.error is not None:
                failed[row.id] = row.error
                del rows[row.id]
        captioner_info = {"name": name, "identity": captioner_identity(captioner_settings, name)}
    references = {s.id: list(s.captions) for s in samples}
    scored = [s for s in samples if s.id in rows]
    scores = None
    if scored:
        scores = score_captions({s.id: rows[s.id].prediction or "" for s in scored},
                                {s.id: references[s.id] for s in scored}, settings.metrics)
    judgements, judge_model = {}, None
    if (settings.judge.enabled if judge is None else judge) and scored:
        judgements = judge_captions(
            [(s.id, rows[s.id].prediction or "", references[s.id]) for s in scored],
            config.reader, settings.judge, progress=progress,
        )
        judge_model = config.reader.model_name
    n_items = len(samples) + len(loaded.skipped)
    summary = _summary(scores, judgements, judge_model, config, n_items, len(scored), failed)
    summary.update(captioner=captioner_info, data=[asdict(s) for s in settings.data],
                   run_dir=str(run_dir))
    with (run_dir / "per_image.jsonl").open("w", encoding="utf-8") as fh:
        for s in samples:
            row = rows.get(s.id)
            line = {
                "id": s.id, "image": s.image,
                "prediction": row.prediction if row else None,
                "coarse": row.coarse if row else None,
                "references": references[s.id],
                "scores": scores.per_item.get(s.id, {}) if scores and row else {},
                "judge": judgements[s.id].to_dict() if s.id in judgements else None,
                "error": failed.get(s.id),
            }
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    from pipeline.report_captions import eval_captions_view

    eval_captions_view(run_dir, f"{name} on {_label(settings.data)}", samples, rows, failed,
                       scores, settings.metrics)  # RUN/report.html: each image, its edits
    table = format_table(summary, title=f"{name} on {_label(settings.data)}")
    return CaptionRun(run_dir, scores, summary, table)


def _summary(
    scores: CaptionScores | None,
    judgements: dict[str, Any],
    judge_model: str | None,
    config: Config,
    n_items: int,
    n_scored: int,
    failed: dict[str, str],
) -> dict[str, Any]:
    summary: dict[str, Any] = scores.to_dict() if scores else {
        "metrics": {}, "not_computed": {}, "tokenizer": None, "bertscore_model": None}
    summary["judge_model"] = None
    if judgements:
        value, unreadable = mean_score(judgements)
        problem = judge_model_problem(config.reader)
        summary["judge_unreadable"] = unreadable
        if problem:
            summary["not_computed"]["judge"] = problem
        elif value is None:
            summary["not_computed"]["judge"] = "no judge reply could be read"
        else:
            summary["metrics"]["judge"] = value
            summary["judge_model"] = judge_model
    summary.update(n_items=n_items, n_scored=n_scored, n_failed=len(failed), failed=failed)
    return summary


def format_table(summary: dict[str, Any], title: str) -> str:
    """The metrics as a small table, with what they were computed with."""
    lines = [f"caption quality: {title}",
             f"  scored {summary['n_scored']} images, {summary['n_failed']} failed or missing"]
    if summary.get("tokenizer"):
        lines.append(f"  tokenizer: {summary['tokenizer']}")
    if summary.get("bertscore_model"):
        lines.append(f"  BERTScore model: {summary['bertscore_model']}")
    if summary.get("judge_model"):
        lines.append(f"  judge: {summary['judge_model']} (0-100)")
    lines += ["", f"| {'metric':<13} | {'value':>8} |", f"|{'-' * 15}|{'-' * 10}|"]
    for key, value in summary["metrics"].items():
        lines.append(f"| {key:<13} | {value:>8.4f} |")
    for key, why in summary["not_computed"].items():
        lines.append(f"| {key:<13} | {'-':>8} |  not computed: {why}")
    return "\n".join(lines)
