"""The whole run on tiny generated videos: tiny MM-SeR captioner, real Ray, real vLLM server.

One managed run covers the product starting and stopping its own vLLM server; the later
runs talk to one shared server in external mode (a vLLM start costs ~40 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from captioner.random_weights import build_tiny_checkpoint
from pipeline.cache import CaptionCache
from pipeline.compare import compare_table, load_runs
from pipeline.config import load_config
from pipeline.demo_data import generate_demo_dataset
from pipeline.errors import PipelineError
from pipeline.run import run_videoqa
from qa.server import ManagedServer
from qa.settings import ReaderSettings
from qa.tiny import build_tiny_reader
from tests.reader_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("e2e-models")
    return {
        "mmser": build_tiny_checkpoint(base / "mmser-tiny", refine=True),
        "reader": build_tiny_reader(base / "reader-tiny"),
    }


def _reader_overrides(reader_dir: Path, port: int, mode: str = "managed") -> list[str]:
    overrides = [
        f"reader.model={reader_dir}", "reader.served_name=tiny-reader", f"reader.mode={mode}",
        f"reader.port={port}", "reader.max_model_len=4096", "reader.extra_args=[--enforce-eager]",
        "reader.env={VLLM_CPU_KVCACHE_SPACE: '1'}", "reader.health_timeout_s=400",
        "reader.max_tokens=16", "reader.reserve_tokens=64", "reader.max_retries=1",
        "reader.retry_backoff_s=0.2",
    ]
    if mode == "external":
        overrides.append(f"reader.url=http://127.0.0.1:{port}/v1")
    return overrides


def _overrides(tmp: Path, models: dict[str, Path], dataset_root: Path, port: int,
               mode: str = "external", ray: bool = True) -> list[str]:
    return [
        f"datasets.tiny.root={dataset_root}", "datasets.tiny.format=egoschema",
        f"cache.dir={tmp / 'cache'}", f"outputs.runs_dir={tmp / 'runs'}",
        "captioner.name=mmser", f"captioner.mmser.checkpoint={models['mmser']}",
        "captioner.batch_size=8", "captioner.generation.max_new_tokens=8",
        "sampling.resize=[64, 64]", f"ray.enabled={str(ray).lower()}",
        "ray.decode_workers=1", "ray.cpu_caption_actors=1",
    ] + _reader_overrides(models["reader"], port, mode)


@pytest.fixture(scope="module")
def reader_server(models):
    settings = ReaderSettings(
        model=str(models["reader"]), served_name="tiny-reader", port=free_port(),
        max_model_len=4096, extra_args=["--enforce-eager"],
        env={"VLLM_CPU_KVCACHE_SPACE": "1"}, health_timeout_s=400,
    )
    with ManagedServer(settings):
        yield settings.port


def _dataset(root: Path, n: int, seconds: float = 6.0) -> Path:
    return generate_demo_dataset(root, num_videos=n, seconds=seconds, fps=5, width=160,
                                 height=120, seed=1)


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_managed_run_then_warm_rerun_hits_the_cache(tmp_path, models):
    data = _dataset(tmp_path / "data", 3)
    config = load_config(overrides=_overrides(tmp_path, models, data, free_port(), "managed"))
    folder = run_videoqa(config, "tiny", "mmser")

    metrics = json.loads((folder / "metrics.json").read_text())
    predictions = _predictions(folder)
    submission = pd.read_csv(folder / "submission.csv")
    answers = json.loads((folder / "submission.json").read_text())
    # Outputs exist and agree with each other.
    assert metrics["questions"] == 3 and metrics["captioned_videos"] == 3
    assert metrics["captioned_frames"] == 3 * 6  # 6 s at 1 fps
    assert metrics["cache_hits"] == 0 and metrics["failed_videos"] == 0
    assert {p["q_uid"] for p in predictions} == set(answers) == set(submission["q_uid"])
    for p in predictions:
        expected = -1 if p["prediction"] is None else p["prediction"]
        assert answers[p["q_uid"]] == expected
        assert p["error"] is None
        assert p["letter"] in ("A", "B", "C", "D", "E")
        assert abs(sum(p["option_probs"]) - 1) < 1e-3
    correct = sum(p["prediction"] == p["answer"] for p in predictions)
    assert metrics["accuracy"]["correct"] == correct
    assert metrics["answered"] == 3
    for stage in ("decode_and_caption", "read", "total"):
        assert metrics["wall_clock_s"][stage] > 0
    assert (folder / "report.md").read_text().startswith("# tiny with mmser")
    assert (folder / "config.yaml").exists()
    failures = folder / "failures.jsonl"
    assert not failures.exists() or failures.read_text() == ""
    records = list(CaptionCache(tmp_path / "cache").iter_records())
    assert len(records) == 3 and all(r.frames == 6 for r in records)
    assert all(c.coarse_caption is not None for r in records for c in r.captions)

    # A second run of the same command: a new run folder, every video from the cache.
    second = run_videoqa(config, "tiny", "mmser")
    assert second != folder
    again = json.loads((second / "metrics.json").read_text())
    assert again["cache_hits"] == 3 and again["captioned_frames"] == 0

    # The report carries the captioner timing rows; `compare` puts both runs in one table.
    timing = metrics["captioner_timing"]
    # The tiny checkpoint's own size (from its safetensors headers), not the real model's.
    assert 1e5 < timing["parameters"] < 1e7
    assert timing["seconds_per_egoschema_video"] == pytest.approx(
        180 / timing["frames_per_second"], rel=0.01)
    assert "s per EgoSchema video" in (folder / "report.md").read_text()
    table = compare_table(load_runs([folder, second]))
    rows = [line for line in table.splitlines() if line.startswith("| mmser")]
    assert len(rows) == 2 and str(folder) in table and str(second) in table


def test_corrupt_video_fails_alone(tmp_path, models, reader_server):
    data = _dataset(tmp_path / "data", 3)
    (data / "videos" / "demo-001.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage" * 10)
    config = load_config(overrides=_overrides(tmp_path, models, data, reader_server))
    folder = run_videoqa(config, "tiny", "mmser")
    metrics = json.loads((folder / "metrics.json").read_text())
    failures = [json.loads(x) for x in (folder / "failures.jsonl").read_text().splitlines()]
    assert [f["video_id"] for f in failures] == ["demo-001"]
    assert failures[0]["stage"] == "decode" and "demo-001.mp4" in failures[0]["path"]
    assert metrics["answered"] == 2 and metrics["failed_questions"] == 1
    predictions = {p["q_uid"]: p for p in _predictions(folder)}
    assert predictions["demo-001"]["prediction"] is None
    assert "video failed" in predictions["demo-001"]["error"]
    assert json.loads((folder / "submission.json").read_text())["demo-001"] == -1


def test_killed_run_resumes_without_captioning_any_video_twice(tmp_path, models, reader_server):
    data = _dataset(tmp_path / "data", 6, seconds=10.0)
    overrides = _overrides(tmp_path, models, data, reader_server, ray=False)
    overrides += ["captioner.batch_size=2", "captioner.generation.min_new_tokens=8"]
    command = [sys.executable, "-m", "pipeline", "videoqa", "--dataset", "tiny"]
    for o in overrides:
        command += ["--set", o]
    records_dir = tmp_path / "cache" / "records"
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if records_dir.exists() and any(records_dir.rglob("*.json")):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 mid-run
    proc.wait()
    cached_before = len(list(records_dir.rglob("*.json")))
    assert cached_before >= 1
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and not (runs[0] / "metrics.json").exists()

    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {runs[0]}" in result.stdout
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    # Every video is captioned exactly once across the two processes.
    assert metrics["cache_hits"] == cached_before
    assert metrics["captioned_videos"] == 6 - cached_before
    assert len(list(records_dir.rglob("*.json"))) == 6
    assert metrics["answered"] == 6


def test_resuming_with_other_settings_is_refused_naming_them(tmp_path, models, reader_server):
    data = _dataset(tmp_path / "data", 2, seconds=4.0)
    overrides = _overrides(tmp_path, models, data, reader_server, ray=False)
    folder = tmp_path / "runs" / "fixed"
    folder.mkdir(parents=True)
    # An unfinished run of the standard template: run.json, a config, no metrics yet.
    config = load_config(None, overrides)
    from pipeline.run import run_identity

    (folder / "run.json").write_text(json.dumps(run_identity(config, "tiny", "mmser")))
    (folder / "config.yaml").write_text("{}")
    changed = load_config(None, [*overrides, "reader.template=cot", "reader.permutations=2"])
    with pytest.raises(PipelineError, match=r"other settings \(reader\.permutations, "
                       r"template\.conversation, .*--new"):
        run_videoqa(changed, "tiny", "mmser", run_dir=str(folder))
    assert not (folder / "predictions.jsonl").exists()  # refused before any work
    # The same settings resume; a new folder is always allowed.
    assert (run_videoqa(config, "tiny", "mmser", run_dir=str(folder)) / "metrics.json").exists()
    assert run_videoqa(changed, "tiny", "mmser", new=True) != folder


def _hub_copy(egoschema: Path, out: Path) -> Path:
    """The demo dataset rewritten in the hub's layout (lmms-lab/egoschema): parquet tables
    GENERATION (answers hidden) and Subset (answers as string indices), videos in a zip."""
    import zipfile

    questions = json.loads((egoschema / "questions.json").read_text())
    answers = json.loads((egoschema / "subset_answers.json").read_text())

    def table(rows: list[dict], with_answers: bool) -> pd.DataFrame:
        return pd.DataFrame({
            "question_idx": [str(i) for i in range(len(rows))],
            "question": [q["question"] for q in rows],
            "video_idx": [q["q_uid"] for q in rows],
            "option": [[f"{L}. {q[f'option {i}']}" for i, L in enumerate("ABCDE")]
                       for q in rows],
            "answer": [str(answers[q["q_uid"]]) if with_answers else "" for q in rows],
        })  # fmt: skip

    for config, rows, with_answers in (("GENERATION", questions, False),
                                       ("Subset", [q for q in questions if q["q_uid"] in answers],
                                        True)):
        (out / config).mkdir(parents=True)
        table(rows, with_answers).to_parquet(out / config / "test-00000-of-00001.parquet")
    with zipfile.ZipFile(out / "videos_chunked_01.zip", "w") as archive:
        for video in sorted((egoschema / "videos").glob("*.mp4")):
            archive.write(video, f"videos/{video.name}")
    return out


def test_an_imported_hub_copy_runs_end_to_end(tmp_path, models, reader_server):
    from pipeline.cli import main

    hub = _hub_copy(_dataset(tmp_path / "generated", 3, seconds=4.0), tmp_path / "hub")
    root = tmp_path / "imported"
    overrides = _overrides(tmp_path, models, root, reader_server, ray=False)
    sets = [item for o in overrides for item in ("--set", o)]
    assert main(["data", "tiny", "--from", str(hub), *sets]) == 0
    assert sorted(p.name for p in (root / "videos").iterdir()) == [
        f"demo-{i:03d}.mp4" for i in range(3)]
    folder = run_videoqa(load_config(None, overrides), "tiny", "mmser", new=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["questions"] == 3 and metrics["answered"] == 3
    assert metrics["failed_videos"] == 0
