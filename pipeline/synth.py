"""Synthetic test and demo videos, written with PyAV (H.264). Nothing here is downloaded."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float = 30.0,
    codec: str = "libx264",
    pts_seconds: Iterable[float] | None = None,
    crf: int = 23,
) -> Path:
    """Encode RGB uint8 frames (H, W, 3) to `path`.

    `pts_seconds`, when given, sets each frame's presentation time (variable frame rate);
    otherwise frames are spaced 1/fps apart. H and W must be even for yuv420p.
    """
    import av  # PyAV: only needed where videos are generated

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    time_base = Fraction(1, 90000)
    times = iter(pts_seconds) if pts_seconds is not None else None
    with av.open(str(path), mode="w") as container:
        stream = None
        for i, frame in enumerate(frames):
            if stream is None:
                height, width = frame.shape[:2]
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height = width, height
                stream.pix_fmt = "yuv420p"
                stream.time_base = time_base
                stream.options = {"crf": str(crf), "preset": "veryfast"}
                stream.codec_context.time_base = time_base
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            seconds = next(times) if times is not None else i / fps
            video_frame.pts = int(round(seconds / time_base))
            video_frame.time_base = time_base
            for packet in stream.encode(video_frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    return path


# Frame-index stamping: each frame carries its index as a row of black/white blocks, so
# a test can read back which frame the decoder returned, whatever the codec did to it.
INDEX_BITS = 12


def stamp_index(frame: np.ndarray, index: int, block: int = 8) -> np.ndarray:
    """Draw `index` in binary as INDEX_BITS blocks of `block` px along the top row."""
    for bit in range(INDEX_BITS):
        value = 255 if (index >> bit) & 1 else 0
        frame[:block, bit * block : (bit + 1) * block] = value
    return frame


def read_index(frame: np.ndarray, block: int = 8) -> int:
    """Read back the index drawn by `stamp_index` (robust to compression noise)."""
    index = 0
    for bit in range(INDEX_BITS):
        cell = frame[1 : block - 1, bit * block + 1 : (bit + 1) * block - 1]
        if cell.mean() > 127:
            index |= 1 << bit
    return index


def indexed_frames(num_frames: int, width: int = 160, height: int = 120) -> Iterable[np.ndarray]:
    """Frames on a mid-grey background with their index stamped on."""
    for i in range(num_frames):
        frame = np.full((height, width, 3), 128, dtype=np.uint8)
        yield stamp_index(frame, i)


def write_indexed_video(
    path: str | Path, num_frames: int, fps: float = 30.0, width: int = 160, height: int = 120,
    pts_seconds: Iterable[float] | None = None,
) -> Path:
    """A video whose every frame carries its own index (see `stamp_index`)."""
    return write_video(
        path, indexed_frames(num_frames, width, height), fps=fps, pts_seconds=pts_seconds, crf=18
    )
