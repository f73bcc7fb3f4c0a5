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
    faststart: bool = False,
) -> Path:
    """Encode RGB uint8 frames (H, W, 3) to `path`.

    `pts_seconds`, when given, sets each frame's presentation time (variable frame rate);
    otherwise frames are spaced 1/fps apart. H and W must be even for yuv420p.
    `faststart` puts the MP4 index (moov) first, as streaming files do: a truncated copy of
    such a file still opens, and fails only where the missing data is read.
    """
    import av  # PyAV: only needed where videos are generated

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    time_base = Fraction(1, 90000)
    times = iter(pts_seconds) if pts_seconds is not None else None
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
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
# Block sizes are fractions of the frame size, so the index survives a resize at decode.
INDEX_BITS = 12
_CELLS_ACROSS = INDEX_BITS + 4  # blocks per frame width (4 spare keep the row off the edge)
_CELLS_DOWN = 8  # block height as a fraction of the frame height


def _cell(frame: np.ndarray, bit: int) -> tuple[slice, slice]:
    height, width = frame.shape[:2]
    bw, bh = width / _CELLS_ACROSS, height / _CELLS_DOWN
    return slice(0, int(round(bh))), slice(int(round(bit * bw)), int(round((bit + 1) * bw)))


def stamp_index(frame: np.ndarray, index: int) -> np.ndarray:
    """Draw `index` (< 2**INDEX_BITS) in binary as blocks along the top of `frame` (H, W, 3)."""
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"frame index {index} does not fit in {INDEX_BITS} bits")
    for bit in range(INDEX_BITS):
        rows, cols = _cell(frame, bit)
        frame[rows, cols] = 255 if (index >> bit) & 1 else 0
    return frame


def _middle(span: slice) -> slice:
    quarter = (span.stop - span.start) // 4
    return slice(span.start + quarter, span.stop - quarter)


def read_index(frame: np.ndarray) -> int:
    """Read back the index drawn by `stamp_index`, at any size the frame was decoded to.

    Only the middle half of each block is read, so compression noise and the blur a resize
    leaves at block edges do not matter.
    """
    index = 0
    for bit in range(INDEX_BITS):
        rows, cols = _cell(frame, bit)
        if frame[_middle(rows), _middle(cols)].mean() > 127:
            index |= 1 << bit
    return index


def indexed_frames(num_frames: int, width: int = 160, height: int = 120) -> Iterable[np.ndarray]:
    """Frames on a mid-grey background with their index stamped on."""
    for i in range(num_frames):
        frame = np.full((height, width, 3), 128, dtype=np.uint8)
        yield stamp_index(frame, i)


def write_indexed_video(
    path: str | Path, num_frames: int, fps: float = 30.0, width: int = 160, height: int = 120,
    pts_seconds: Iterable[float] | None = None, faststart: bool = False,
) -> Path:
    """A video whose every frame carries its own index (see `stamp_index`)."""
    return write_video(
        path, indexed_frames(num_frames, width, height), fps=fps, pts_seconds=pts_seconds,
        crf=18, faststart=faststart,
    )


def textured_frames(
    num_frames: int, width: int = 640, height: int = 480, seed: int = 0
) -> Iterable[np.ndarray]:
    """Camera-like frames: a detailed random texture panning across the view, index stamped.

    Unlike flat frames these cost the encoder and the decoder real work (benchmarks).
    """
    rng = np.random.default_rng(seed)
    # Coarse colour blobs plus fine grain, on a canvas twice the frame size to pan over.
    coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    canvas = np.kron(coarse, np.ones((32, 32, 1), dtype=np.uint8))
    canvas = (canvas.astype(np.int16) + rng.integers(-24, 25, canvas.shape)).clip(0, 255)
    canvas = canvas.astype(np.uint8)
    span_y, span_x = canvas.shape[0] - height, canvas.shape[1] - width
    for i in range(num_frames):
        # A slow elliptical pan, so consecutive frames differ as in a hand-held video.
        angle = 2 * np.pi * i / 900
        y = int((0.5 + 0.5 * np.sin(angle)) * span_y)
        x = int((0.5 + 0.5 * np.cos(angle)) * span_x)
        yield stamp_index(canvas[y : y + height, x : x + width].copy(), i % 2**INDEX_BITS)
