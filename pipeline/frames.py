"""Sample frames of one video with decord: pick frames by the decoder's own timestamps.

    from pipeline.config import SamplingSettings
    sampled = sample_video("clip.mp4", "clip", SamplingSettings(policy="fps", fps=1.0))
    sampled.frames.shape  # (N, H, W, 3) uint8; N = one frame per second of video

Policies (see `choose_indices`):
  fps      one frame every 1/fps seconds of video time: the frame on screen at t0 + k/fps.
  uniform  `num_frames` frames, the one on screen at the middle of each of N equal spans.
Both work on the decoder's presentation timestamps, so variable-frame-rate video samples by
time, not by frame count.

This runs in the calling process and can hang inside decord's native code; run it where it
can be killed (`pipeline.decode` does).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.config import SamplingSettings
from pipeline.errors import ConfigError, VideoDecodeError
from pipeline.records import SampledFrames

# --- index choice -----------------------------------------------------------------------


# Timestamps come rounded from the stream's time base (decord gives float32-like values:
# 1 s may read 1.0000001); a frame starting this close after t counts as on screen at t.
_TIME_TOLERANCE_S = 1e-4


def _frames_at(times: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time: the last frame starting at or before it.

    times: (K,) seconds; starts: (F,) frame start times, ascending. Returns (K,) int64.
    """
    found = np.searchsorted(starts, times + _TIME_TOLERANCE_S, side="right") - 1
    return np.clip(found, 0, len(starts) - 1)


def check_sampling(sampling: SamplingSettings) -> None:
    """Raise ConfigError naming the key when a sampling setting cannot work: the settings'
    own `validate` (the one set of bounds, also applied when the config is loaded), for
    settings built in code rather than read from config.yaml."""
    try:
        sampling.validate()
    except ValueError as exc:  # its messages start with the field: "fps must be > 0, ..."
        field = str(exc).split(" ", 1)[0]
        raise ConfigError(f"config key 'sampling.{field}': {exc}") from exc


def choose_indices(timestamps: np.ndarray, sampling: SamplingSettings) -> np.ndarray:
    """Frame indices to decode for one video, sorted and unique.

    timestamps: (F, 2) float, each frame's [start, end) in seconds (decord's
    `get_frame_timestamp`). Returns (N,) int64. Two sample times that fall on the same frame
    (a frame held long in variable-frame-rate video, or N > F) give that frame once.
    """
    check_sampling(sampling)
    if len(timestamps) == 0:
        raise ValueError("the video has no frames")
    starts = timestamps[:, 0]
    t0, t_end = float(starts[0]), float(timestamps[-1, 1])
    duration = max(t_end - t0, 0.0)
    if sampling.policy == "fps":
        # One sample per 1/fps seconds; the last starts before the video ends.
        count = max(int(np.ceil(duration * sampling.fps - 1e-9)), 1)
        times = t0 + np.arange(count) / sampling.fps
    else:  # uniform: the middle of each of N equal spans
        times = t0 + (np.arange(sampling.num_frames) + 0.5) * duration / sampling.num_frames
    return np.unique(_frames_at(times, starts)).astype(np.int64)


# --- decord's stderr --------------------------------------------------------------------
# decord raises a bare "Error reading <file>..." and prints the real reason (FFmpeg's and its
# own) on file descriptor 2. We point fd 2 at a temporary file around each call to keep it.
# The lock: fd 2 is process-wide, so two threads must not swap it at once.
_STDERR_LOCK = threading.Lock()
_DECORD_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ")  # "[12:01:12] src/x.cc:83: "
_FFMPEG_PREFIX = re.compile(r"^\[[\w,.\-]+ @ 0x[0-9a-f]+\] ")  # "[mov,mp4 @ 0x5562] "


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what native code writes to fd 2 meanwhile; the list is filled on exit."""
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _reason(exc: BaseException, stderr: list[str], path: str) -> str:
    """The real reason: decord's and FFmpeg's last messages, else the exception's text."""

    def clean(line: str) -> str:
        return _FFMPEG_PREFIX.sub("", _DECORD_PREFIX.sub("", line.strip())).replace(path, "file")

    messages: list[str] = []
    for line in stderr:
        if clean(line) not in messages:
            messages.append(clean(line))
    detail = "; ".join(messages[-3:])
    # decord's own text may carry a native stack trace after the first line.
    lines = str(exc).strip().splitlines()
    text = clean(lines[0]) if lines else type(exc).__name__
    return f"{text} ({detail})" if detail else text


def _top_level_boxes(path: Path, limit: int = 64) -> list[str] | None:
    """The top-level box types of an ISO-BMFF (MP4 / MOV) file, None when it is not one; a
    box cut short by the end of the file is named "<type> (cut short)". Hand-written:
    FFmpeg's "moov atom not found" goes to its log, not to the exception, and reading
    8-byte box headers needs no library."""
    boxes: list[str] = []
    try:
        size_total = path.stat().st_size
        with path.open("rb") as fh:
            offset = 0
            while offset + 8 <= size_total and len(boxes) < limit:
                fh.seek(offset)
                header = fh.read(8)
                size, kind = int.from_bytes(header[:4], "big"), header[4:8]
                if size == 1:  # a 64-bit size follows
                    size = int.from_bytes(fh.read(8), "big")
                elif size == 0:  # the box runs to the end of the file
                    size = size_total - offset
                if size < 8 or not kind.isascii():
                    break
                # A box running past the end of the file is cut short: not a whole box.
                name = kind.decode("ascii", "replace")
                boxes.append(name if offset + size <= size_total else name + " (cut short)")
                offset += size
    except OSError:
        return None
    return boxes if boxes and boxes[0].split()[0] in ("ftyp", "wide", "free", "mdat", "moov") \
        else None


def _plain_reason(path: Path, reason: str) -> str:
    """A plain reason before decord's own text for the two cases users meet most."""
    if "cannot find video stream" not in reason and "moov atom" not in reason:
        return reason
    boxes = _top_level_boxes(path)
    if boxes is not None and "moov" not in boxes:
        return ("incomplete file: no MP4 index (moov atom), truncated or still being "
                f"written; {reason}")
    try:
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no"]
                return f"no video stream ({', '.join(kinds)} streams only: audio only?); {reason}"
    except Exception:  # PyAV cannot read it either: decord's text is all there is
        pass
    return reason


# --- sampling ---------------------------------------------------------------------------


def sample_video(path: str | Path, video_id: str, sampling: SamplingSettings) -> SampledFrames:
    """Decode the frames `sampling` asks for from one video.

    Returns SampledFrames with frames (N, H, W, 3) uint8 RGB, at `sampling.resize` [w, h]
    when set (scaled inside the decoder, no full-size copy). Raises VideoDecodeError naming
    the file and decord's own reason when the file is missing, unreadable or corrupt.
    """
    from decord import VideoReader, cpu
    from decord._ffi.base import DECORDError

    path = Path(path)
    if not path.exists():
        raise VideoDecodeError(str(path), "no such file")
    if path.is_dir():
        raise VideoDecodeError(str(path), "is a directory, not a video file")
    if path.is_file() and path.stat().st_size == 0:
        raise VideoDecodeError(str(path), "empty file (0 bytes)")
    check_sampling(sampling)
    size = {}
    if sampling.resize is not None:
        size = {"width": int(sampling.resize[0]), "height": int(sampling.resize[1])}

    start = time.perf_counter()
    stderr: list[str] = []
    try:
        with _captured_stderr() as stderr:
            reader = VideoReader(str(path), ctx=cpu(0), num_threads=sampling.num_threads, **size)
            try:
                num_frames = len(reader)
                timestamps = reader.get_frame_timestamp(np.arange(num_frames))
                indices = choose_indices(np.asarray(timestamps, dtype=np.float64), sampling)
                frames = reader.get_batch(indices.tolist()).asnumpy()
                avg_fps = float(reader.get_avg_fps())
            finally:
                # A VideoReader left alive keeps decoding ahead and grows to gigabytes.
                del reader
                gc.collect()
    except (RuntimeError, DECORDError, ValueError) as exc:
        reason = _plain_reason(path, _reason(exc, stderr, str(path)))
        raise VideoDecodeError(str(path), reason) from exc

    if frames.shape[0] != len(indices):
        raise VideoDecodeError(
            str(path), f"asked decord for {len(indices)} frames, got {frames.shape[0]}"
        )
    return SampledFrames(
        video_id=video_id,
        path=path,
        indices=indices,
        timestamps=timestamps[indices, 0].astype(np.float64),
        frames=frames,
        duration=float(timestamps[-1, 1] - timestamps[0, 0]),
        avg_fps=avg_fps,
        decode_seconds=time.perf_counter() - start,
    )
