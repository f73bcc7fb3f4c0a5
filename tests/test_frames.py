"""decord sampling of one video, checked by content: every frame carries its index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import SamplingSettings
from pipeline.errors import ConfigError, VideoDecodeError
from pipeline.frames import check_sampling, choose_indices, sample_video
from pipeline.synth import read_index, write_indexed_video

FPS = 30
NUM_FRAMES = 90  # 3 s
# Variable frame rate: frames alternately held 60 ms and 20 ms (25 fps on average).
VFR_PTS = np.concatenate([[0], np.cumsum([60 if i % 2 == 0 else 20 for i in range(99)])]) / 1000


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("frames")
    cfr = write_indexed_video(root / "cfr.mp4", NUM_FRAMES, fps=FPS)
    write_indexed_video(root / "vfr.mp4", len(VFR_PTS), fps=25, pts_seconds=VFR_PTS)
    # faststart: the index comes first, so a truncated copy opens and fails while decoding.
    streamable = write_indexed_video(root / "fast.mp4", NUM_FRAMES, fps=FPS, faststart=True)
    data = streamable.read_bytes()
    (root / "truncated_stream.mp4").write_bytes(data[: int(len(data) * 0.6)])
    data = cfr.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # loses the index (moov)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    (root / "empty.mp4").write_bytes(b"")
    (root / "folder.mp4").mkdir()
    _write_audio_only(root / "audio_only.mp4")
    return {p.stem: p for p in root.iterdir()}


def _write_audio_only(path: Path) -> None:
    """An MP4 holding one AAC audio stream and no video."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for _ in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32),
                                               format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def stamped(frames: np.ndarray) -> list[int]:
    return [read_index(frame) for frame in frames]


def test_fps_policy_samples_one_frame_per_second_by_content(videos):
    sampled = sample_video(videos["cfr"], "cfr", SamplingSettings(policy="fps", resize=None))
    assert sampled.indices.tolist() == [0, 30, 60]
    assert stamped(sampled.frames) == [0, 30, 60]
    np.testing.assert_allclose(sampled.timestamps, [0.0, 1.0, 2.0], atol=1e-4)
    assert sampled.frames.shape == (3, 120, 160, 3) and sampled.frames.dtype == np.uint8
    assert sampled.duration == pytest.approx(3.0, abs=1e-4)
    assert sampled.avg_fps == pytest.approx(30.0)
    assert sampled.decode_seconds > 0


def test_fps_policy_at_four_frames_per_second(videos):
    sampled = sample_video(videos["cfr"], "cfr", SamplingSettings(fps=4.0, resize=None))
    expected = [int(k * 30 / 4) for k in range(12)]  # t = k/4 s, frame i starts at i/30 s
    assert stamped(sampled.frames) == expected == sampled.indices.tolist()


def test_uniform_policy_spreads_frames_evenly_by_content(videos):
    sampled = sample_video(
        videos["cfr"], "cfr", SamplingSettings(policy="uniform", num_frames=8, resize=None)
    )
    # The frame on screen at the middle of each of 8 equal spans of 3 s.
    expected = [int((k + 0.5) * NUM_FRAMES / 8) for k in range(8)]
    assert sampled.indices.tolist() == expected
    assert stamped(sampled.frames) == expected


def test_variable_frame_rate_timestamps_are_the_decoders_own(videos):
    sampled = sample_video(videos["vfr"], "vfr", SamplingSettings(fps=1.0, resize=None))
    # The frame on screen at t = 0, 1, 2, 3 s is the last one starting at or before t.
    expected = [int(np.searchsorted(VFR_PTS, t, side="right") - 1) for t in (0, 1, 2, 3)]
    assert sampled.indices.tolist() == expected
    assert stamped(sampled.frames) == expected
    np.testing.assert_allclose(sampled.timestamps, VFR_PTS[expected], atol=1e-4)
    # Counting frames at the average rate would have put these elsewhere.
    assert expected != [int(t * 25) for t in (0, 1, 2, 3)]


def test_resize_at_decode_gives_the_asked_size(videos):
    sampling = SamplingSettings(policy="uniform", num_frames=4, resize=[224, 168])
    sampled = sample_video(videos["cfr"], "cfr", sampling)
    assert sampled.frames.shape == (4, 168, 224, 3)
    assert stamped(sampled.frames) == sampled.indices.tolist()


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("corrupt", "Invalid data found"),  # FFmpeg's words, from decord's stderr
        ("truncated", "incomplete file: no MP4 index (moov atom), truncated or still being"),
        ("truncated", "moov atom not found"),  # decord's own text is kept after the reason
        ("audio_only", "no video stream (audio streams only: audio only?)"),
        ("audio_only", "cannot find video stream"),
        ("truncated_stream", "partial file"),
        ("empty", "empty file"),
        ("missing", "no such file"),
        ("folder", "directory"),
    ],
)
def test_bad_files_raise_naming_the_file_and_the_real_reason(videos, name, words):
    path = videos.get(name, videos["cfr"].parent / f"{name}.mp4")
    with pytest.raises(VideoDecodeError) as info:
        sample_video(path, name, SamplingSettings(resize=None))
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert words in info.value.reason


def test_choose_indices_uniform_with_more_frames_than_the_video_gives_each_once():
    starts = np.arange(5) / 10.0
    timestamps = np.stack([starts, starts + 0.1], axis=1)
    indices = choose_indices(timestamps, SamplingSettings(policy="uniform", num_frames=12))
    assert indices.tolist() == [0, 1, 2, 3, 4]


def test_choose_indices_fps_covers_the_tail_of_the_video():
    starts = np.arange(75) / 30.0  # 2.5 s
    timestamps = np.stack([starts, starts + 1 / 30], axis=1)
    assert choose_indices(timestamps, SamplingSettings(fps=1.0)).tolist() == [0, 30, 60]


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"fps": 0.0}, "sampling.fps"),
        ({"policy": "uniform", "num_frames": 0}, "sampling.num_frames"),
        ({"resize": [336]}, "sampling.resize"),
        ({"decode_timeout_s": 0.0}, "sampling.decode_timeout_s"),
    ],
)
def test_impossible_sampling_settings_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        check_sampling(SamplingSettings(**changes))
