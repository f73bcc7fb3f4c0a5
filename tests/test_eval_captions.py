"""`mmser eval-captions` end to end: a COCO Karpathy split with several references per
image (one image corrupt), captioned by the session's tiny random MM-SeR or read from a
predictions file, scored, resumed; and the LLM judge against a real vLLM CPU server
serving the tiny random reader (one server for the module).

Random weights: the captions are nonsense and no score here is a quality figure; the
tests check what is written, what is reused and what is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image
from reader_fixtures import tiny_settings

from captioner.caption_metrics import java_path
from pipeline.cli import main
from pipeline.errors import DatasetError
from pipeline.eval_captions import read_predictions
from qa.judge import (
    JudgeSettings,
    judge_captions,
    judge_model_problem,
    judge_request,
    judge_schema,
    parse_judgement,
)
from qa.server import ManagedServer
from qa.tiny import build_tiny_reader

SENTENCES = {
    0: ["A red circle above a blue square.", "a red disk over a blue box"],
    1: ["a dog sleeps on a mat", "A brown dog lying on a rug.", "dog asleep on a mat"],
    2: ["Two green triangles beside a star."],
    3: ["a cat on a chair", "a black cat sitting on a chair"],  # its image is corrupt
    4: ["a training image"],  # split train: not scored
}
LEXICAL = "eval_captions.metrics.names=[bleu, rougeL, cider]"


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Karpathy-style dataset_coco.json: 4 test images (one corrupt), 1 train image."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i, sentences in SENTENCES.items():
        name = f"COCO_val2014_{i:012d}.jpg"
        if i == 3:
            (root / "val2014" / name).write_bytes(b"not a jpeg")
        else:
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val2014" / name)
        images.append({
            "filepath": "val2014", "filename": name, "imgid": i, "cocoid": 1000 + i,
            "split": "train" if i == 4 else "test",
            "sentences": [{"raw": s, "tokens": s.lower().split()} for s in sentences],
        })  # fmt: skip
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def common(coco: Path, tiny_dir: Path) -> list[str]:
    return [
        "--data", str(coco), "--format", "coco", "--split", "test",
        "--set", f"captioner.mmser.checkpoint={tiny_dir}",
        "--set", "captioner.generation.max_new_tokens=6",
        "--set", "captioner.device=cpu", "--set", "captioner.dtype=float32",
        "--set", LEXICAL,
    ]  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_captions_scores_and_resumes(coco: Path, tiny_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["eval-captions", "--captioner", "mmser", "--out", str(out),
                 *common(coco, tiny_dir)]) == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| cider")  # the table comes last
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_scored"] == 3 and metrics["n_failed"] == 1 and metrics["n_items"] == 4
    (failed_id, why), = metrics["failed"].items()
    assert "1003" in failed_id and "image" in why  # the corrupt file, named with its reason
    assert set(metrics["metrics"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider"}
    expected_tokenizer = "ptb" if java_path() else "python"
    assert metrics["tokenizer"].startswith(expected_tokenizer)
    assert metrics["captioner"]["name"] == "mmser"
    per_image = {row["id"]: row for row in lines(out / "per_image.jsonl")}
    assert len(per_image) == 3  # the corrupt image never loaded; it is in metrics' failed
    for row in per_image.values():
        cocoid = int(row["id"].rsplit("-", 1)[-1]) if "-" in row["id"] else None
        assert row["prediction"] is not None and row["coarse"] is not None
        assert set(row["scores"]) == set(metrics["metrics"])
        assert len(row["references"]) >= 1 and cocoid != 1003
    refs_by_count = sorted(len(r["references"]) for r in per_image.values())
    assert refs_by_count == [1, 2, 3]  # every reference of an image is kept
    captions = lines(out / "captions.jsonl")
    assert len(captions) == 3
    # Rerun into the same folder: nothing is captioned again, the scores are the same.
    assert main(["eval-captions", "--captioner", "mmser", "--out", str(out),
                 *common(coco, tiny_dir)]) == 0
    assert lines(out / "captions.jsonl") == captions
    assert json.loads((out / "metrics.json").read_text())["metrics"] == metrics["metrics"]
    # The captions as a predictions file score the same.
    again = tmp_path / "from-file"
    assert main(["eval-captions", "--predictions", str(out / "captions.jsonl"),
                 "--out", str(again), *common(coco, tiny_dir)]) == 0
    assert json.loads((again / "metrics.json").read_text())["metrics"] == metrics["metrics"]


def test_prediction_files_in_each_form(coco: Path, tiny_dir: Path, tmp_path: Path) -> None:
    from captioner.train_data import DataSource, load_caption_source

    ids = [s.id for s in load_caption_source(DataSource("coco", str(coco), split="test")).samples]
    as_dict = {ids[0]: "a red circle above a blue square", ids[1]: "a dog on a mat"}
    as_list = [{"image_id": k, "caption": v} for k, v in as_dict.items()]
    for name, content in (("d.json", json.dumps(as_dict)), ("l.json", json.dumps(as_list)),
                          ("j.jsonl", "\n".join(json.dumps({"id": k, "caption": v})
                                                for k, v in as_dict.items()))):
        path = tmp_path / name
        path.write_text(content)
        assert read_predictions(path) == as_dict
        out = tmp_path / f"run-{name}"
        assert main(["eval-captions", "--predictions", str(path), "--out", str(out),
                     *common(coco, tiny_dir)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["n_scored"] == 2
        assert metrics["failed"][ids[2]].startswith("no prediction in")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": ids[0], "caption": "x"}) + "\n{oops\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 2: not JSON"):
        read_predictions(bad)
    assert main(["eval-captions", "--predictions", str(tmp_path / "none.jsonl"),
                 *common(coco, tiny_dir)]) == 2  # a clear error, not a traceback


def test_judge_replies_are_read_strictly() -> None:
    settings = JudgeSettings(max_tokens=64)
    good = parse_judgement('{"score": 73, "reason": "same objects"}', "stop", settings)
    assert good.score == 73.0 and good.reason == "same objects" and good.error is None
    assert parse_judgement('{"score": 7', "length", settings).error.startswith("truncated")
    assert parse_judgement("seventy", "stop", settings).error.startswith("malformed JSON")
    for text in ('{"score": 101, "reason": ""}', '{"score": true, "reason": ""}',
                 '{"reason": "no score"}', "[1, 2]"):
        judgement = parse_judgement(text, "stop", settings)
        assert judgement.score is None and "no score 0-100" in judgement.error, text


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    model = build_tiny_reader(tmp_path_factory.mktemp("judge-reader"))
    log = tmp_path_factory.mktemp("judge-reader-log") / "server.log"
    # xgrammar lets a reply put any whitespace between JSON tokens, and a random model
    # fills max_tokens with newlines; the server-wide switch (not a request field) stops it.
    no_free_whitespace = '{"backend": "xgrammar", "disable_any_whitespace": true}'
    settings = tiny_settings(model, concurrency=4, extra_args=[
        "--enforce-eager", "--structured-outputs-config", no_free_whitespace])
    with ManagedServer(settings, log_path=log) as managed:
        yield managed


def test_judge_request_against_the_tiny_reader(reader: ManagedServer) -> None:
    settings = JudgeSettings(max_tokens=96, reason_max_chars=24)
    request = judge_request(reader.settings, settings, "a cat", ["a dog", "a puppy"])
    assert request["model"] == "tiny-reader" and request["temperature"] == 0.0
    assert request["extra_body"]["structured_outputs"]["json"] == judge_schema(settings)
    user = request["messages"][1]["content"]
    assert "Candidate caption:\na cat" in user and "- a dog\n- a puppy" in user
    items = [(f"i{k}", cand, refs) for k, (cand, refs) in enumerate(
        [("a cat", ["a dog"]), ("a red circle", ["a red circle", "a red disk"]),
         ("two men", ["two women walking"]), ("", ["an empty caption"])])]
    judgements = judge_captions(items, reader.settings, settings, server=reader,
                                progress=False)
    assert sorted(judgements) == ["i0", "i1", "i2", "i3"]
    for judgement in judgements.values():
        # Constrained decoding: a random model's reply is still the schema's JSON, and a
        # short reason bound keeps it within max_tokens, so every reply is read.
        assert judgement.error is None, judgement
        jsonschema.validate(json.loads(judgement.reply), judge_schema(settings))
        assert 0 <= judgement.score <= 100 and isinstance(judgement.reason, str)
    assert "random-weights test model" in judge_model_problem(reader.settings)


def test_eval_captions_never_reports_the_tiny_readers_judgement(
    coco: Path, tiny_dir: Path, tmp_path: Path, reader: ManagedServer
) -> None:
    path = tmp_path / "p.json"
    from captioner.train_data import DataSource, load_caption_source

    ids = [s.id for s in load_caption_source(DataSource("coco", str(coco), split="test")).samples]
    path.write_text(json.dumps(dict.fromkeys(ids, "a red circle")))
    out = tmp_path / "judged"
    s = reader.settings
    assert main(["eval-captions", "--predictions", str(path), "--out", str(out), "--judge",
                 "--set", "reader.mode=external", "--set", f"reader.url={reader.base_url}",
                 "--set", f"reader.model={s.model}", "--set", f"reader.served_name={s.served_name}",
                 "--set", "eval_captions.judge.reason_max_chars=24",
                 *common(coco, tiny_dir)]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert "judge" not in metrics["metrics"] and metrics["judge_model"] is None
    assert "random-weights test model" in metrics["not_computed"]["judge"]
    for row in lines(out / "per_image.jsonl"):
        assert row["judge"]["error"] is None and 0 <= row["judge"]["score"] <= 100
