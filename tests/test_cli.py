"""The command line: cache build / ls / export / gc on a folder archive, config errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from captioner.random_weights import build_tiny_checkpoint
from pipeline.cli import main
from pipeline.synth import write_video


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, list[str]]:
    import numpy as np

    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(0)
    for rel in ("trip/day1.mp4", "trip/day2.mkv"):
        frames = (rng.integers(0, 255, (1, 1, 3)) * np.ones((15, 96, 128, 3))).astype(np.uint8)
        write_video(root / rel, frames, fps=5)
    (root / "trip" / "broken.mp4").write_bytes(b"not a video")
    checkpoint = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "mmser")
    overrides = [
        "--set", f"cache.dir={root.parent / (root.name + '-cache')}",
        "--set", f"captioner.mmser.checkpoint={checkpoint}",
        "--set", "captioner.generation.max_new_tokens=4", "--set", "ray.enabled=false",
        "--set", "sampling.resize=[64, 64]",
    ]
    return root, overrides


def test_cache_build_ls_export_gc(archive, tmp_path, capsys):
    root, overrides = archive
    assert main(["cache", "build", str(root), *overrides]) == 0
    out = capsys.readouterr().out
    assert "3 videos under" in out and "2 captioned (6 frames)" in out
    assert "FAILED trip/broken (decode)" in out

    # A second build captions nothing: both good videos come from the cache.
    assert main(["cache", "build", str(root), *overrides]) == 0
    assert "2 already cached, 0 captioned" in capsys.readouterr().out

    assert main(["cache", "ls", *overrides]) == 0
    listing = capsys.readouterr().out
    assert "trip/day1" in listing and "trip/day2" in listing

    parquet = tmp_path / "captions.parquet"
    assert main(["cache", "export", str(parquet), *overrides]) == 0
    table = pd.read_parquet(parquet)
    assert len(table) == 6 and set(table["video_id"]) == {"trip/day1", "trip/day2"}
    assert table["caption"].map(len).gt(0).all()

    # gc: once a video is deleted its record goes (a dry run first removes nothing).
    (root / "trip" / "day2.mkv").unlink()
    assert main(["cache", "gc", "--dry-run", *overrides]) == 0
    capsys.readouterr()
    assert main(["cache", "export", str(parquet), *overrides]) == 0
    assert len(pd.read_parquet(parquet)) == 6
    assert main(["cache", "gc", *overrides]) == 0
    capsys.readouterr()
    assert main(["cache", "export", str(parquet), *overrides]) == 0
    assert set(pd.read_parquet(parquet)["video_id"]) == {"trip/day1"}


def test_bad_override_is_a_clear_error_and_exit_2(capsys):
    assert main(["config", "--set", "sampling.fps=fast"]) == 2
    err = capsys.readouterr().err
    assert "config key 'sampling.fps': got 'fast', expected float" in err


def test_captioners_lists_every_registered_captioner_with_its_size(capsys):
    assert main(["captioners"]) == 0
    out = capsys.readouterr().out
    for name, millions in (("llava15", "7063.4M"), ("mmser", "481.8M"), ("simple", "430.1M"),
                           ("tag2text", "372.0M")):
        assert any(line.startswith(name) and millions in line for line in out.splitlines())
