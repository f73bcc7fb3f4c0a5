"""The captioning stage's scheduler with the real tiny MM-SeR captioner (serial and Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from captioner.random_weights import build_tiny_checkpoint
from captioner.settings import CaptionerSettings, GenerationSettings, MMSeRSettings
from pipeline.caption_stage import CaptionedVideo, CaptionFailure, CaptionWorker, caption_videos
from pipeline.config import RaySettings
from pipeline.decode import DecodeFailure
from pipeline.errors import CaptionerError
from pipeline.records import SampledFrames


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> CaptionerSettings:
    checkpoint = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "mmser")
    return CaptionerSettings(
        name="mmser", batch_size=4, device="cpu", dtype="float32",
        generation=GenerationSettings(max_new_tokens=6),
        mmser=MMSeRSettings(checkpoint=str(checkpoint)),
    )


@pytest.fixture(scope="module")
def worker(settings) -> CaptionWorker:
    return CaptionWorker(settings)


def _video(video_id: str, n: int, seed: int, dtype=np.uint8) -> SampledFrames:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n, 48, 64, 3)).astype(dtype)
    return SampledFrames(video_id, Path(f"{video_id}.mp4"), np.arange(n), np.arange(n, dtype=float),
                         frames, float(n), 1.0)


def test_videos_share_batches_and_match_captioning_each_alone(settings, worker):
    videos = [_video("a", 3, 0), _video("b", 6, 1), _video("c", 1, 2)]
    expected = {v.video_id: [r.caption for r in worker(v.frames.copy()).results] for v in videos}
    failure = DecodeFailure("bad", Path("bad.mp4"), "moov atom not found")
    stream = [videos[0], failure, videos[1], videos[2]]
    out = list(caption_videos(iter(stream), settings, RaySettings(enabled=False), worker))
    assert failure in out  # decode failures pass through, in the same stream
    done = {o.frames.video_id: o for o in out if isinstance(o, CaptionedVideo)}
    assert set(done) == {"a", "b", "c"}
    for video_id, captioned in done.items():
        # Batches of 4 mix frames of different videos; each frame keeps its own caption.
        assert [r.caption for r in captioned.results] == expected[video_id]
        assert captioned.caption_seconds > 0
        assert captioned.frames.frames.size == 0  # pixels released once captioned


def test_a_bad_batch_is_retried_per_video_and_only_the_bad_video_fails(settings, worker):
    good, bad = _video("good", 2, 3), _video("bad", 2, 4, dtype=np.float32)
    out = list(caption_videos(iter([good, bad]), settings, RaySettings(enabled=False), worker))
    failures = [o for o in out if isinstance(o, CaptionFailure)]
    done = [o for o in out if isinstance(o, CaptionedVideo)]
    assert [f.video_id for f in failures] == ["bad"]
    assert "uint8" in failures[0].reason
    assert [d.frames.video_id for d in done] == ["good"] and len(done[0].results) == 2


def test_ray_actor_that_cannot_build_its_captioner_stops_the_run_with_the_reason(
    settings, tmp_path
):
    from pipeline.ray_cluster import init_ray

    init_ray(RaySettings())
    broken = CaptionerSettings(
        name="mmser", device="cpu", mmser=MMSeRSettings(checkpoint=str(tmp_path / "absent"))
    )
    with pytest.raises(CaptionerError, match=r"could not start in its Ray actor.*absent"):
        list(caption_videos(iter([_video("a", 1, 0)]), broken, RaySettings(cpu_caption_actors=1)))


def test_ray_path_gives_the_serial_captions(settings, worker):
    from pipeline.ray_cluster import init_ray

    init_ray(RaySettings())
    videos = [_video("a", 3, 5), _video("b", 2, 6)]
    expected = {v.video_id: [r.caption for r in worker(v.frames.copy()).results] for v in videos}
    out = list(caption_videos(iter(videos), settings, RaySettings(cpu_caption_actors=1)))
    assert {o.frames.video_id: [r.caption for r in o.results] for o in out} == expected
