"""The bundled demo dataset: small synthetic videos in EgoSchema's layout, from a fixed seed.

Each video is a sequence of scenes; a scene is a plain background with one coloured shape
moving across it. Every question's answer follows from what is drawn (which colour came
first, which shape came last, how many scenes), so a reader with good captions could get
it right. Generated once under `data/demo/` and reused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.synth import write_video

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (110, 110, 110),
    "black": (15, 15, 15),
    "teal": (20, 90, 100),
}
SHAPES = ("circle", "square", "triangle")
DEMO_VERSION = 1  # bump when the generator changes, so cached demo data is rebuilt


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    seconds: float


def _draw_scene_frame(scene: Scene, t: float, width: int, height: int) -> np.ndarray:
    """One frame of a scene at fraction t in [0, 1): the shape slides left to right."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = BACKGROUNDS[scene.background]
    size = height // 3
    cx = int(size + t * (width - 2 * size))
    cy = height // 2 + int(0.2 * height * np.sin(2 * np.pi * t))
    ys, xs = np.ogrid[:height, :width]
    if scene.shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= (size // 2) ** 2
    elif scene.shape == "square":
        mask = (abs(xs - cx) <= size // 2) & (abs(ys - cy) <= size // 2)
    else:  # triangle pointing up
        top = cy - size // 2
        rows = ys - top
        mask = (rows >= 0) & (rows <= size) & (abs(xs - cx) <= rows // 2)
    frame[np.broadcast_to(mask, (height, width))] = COLOURS[scene.colour]
    return frame


def _frames(scenes: list[Scene], fps: float, width: int, height: int) -> Iterator[np.ndarray]:
    for scene in scenes:
        n = int(round(scene.seconds * fps))
        for i in range(n):
            yield _draw_scene_frame(scene, i / n, width, height)


def _options(rng: np.random.Generator, correct: str, pool: list[str]) -> tuple[list[str], int]:
    """Five options: the correct one plus four distractors from `pool`, shuffled."""
    distractors = [p for p in pool if p != correct]
    picked = list(rng.choice(distractors, size=4, replace=False)) + [correct]
    order = rng.permutation(5)
    options = [str(picked[i]) for i in order]
    return options, options.index(correct)


def _question(rng: np.random.Generator, scenes: list[Scene]) -> tuple[str, list[str], int]:
    kind = int(rng.integers(3))
    if kind == 0:
        correct = scenes[0].colour
        options, answer = _options(rng, correct, list(COLOURS))
        text = "Which colour was the first moving shape in the video?"
        return text, [f"The first shape was {o}." for o in options], answer
    if kind == 1:
        correct = scenes[-1].shape
        pool = list(SHAPES) + ["star", "hexagon"]
        options, answer = _options(rng, correct, pool)
        return "Which shape appears last in the video?", [f"A {o}." for o in options], answer
    correct = str(len(scenes))
    options, answer = _options(rng, correct, [str(n) for n in range(1, 8)])
    text = "How many different scenes, each with one moving shape, does the video show?"
    return text, [f"{o} scenes." for o in options], answer


def generate_demo_dataset(
    root: str | Path,
    num_videos: int = 8,
    seconds: float = 30.0,
    fps: float = 10.0,
    width: int = 192,
    height: int = 144,
    seed: int = 0,
) -> Path:
    """Write the demo dataset under `root` (skipped when already there for these settings)."""
    root = Path(root)
    params = dict(num_videos=num_videos, seconds=seconds, fps=fps, width=width, height=height,
                  seed=seed, version=DEMO_VERSION)
    stamp = root / "demo_params.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return root
    rng = np.random.default_rng(seed)
    questions, answers = [], {}
    for v in range(num_videos):
        q_uid = f"demo-{v:03d}"
        n_scenes = int(rng.integers(2, 5))
        colours = rng.choice(list(COLOURS), size=n_scenes, replace=False)
        scenes = [
            Scene(
                shape=str(rng.choice(SHAPES)),
                colour=str(colour),
                background=str(rng.choice(list(BACKGROUNDS))),
                seconds=seconds / n_scenes,
            )
            for colour in colours
        ]
        write_video(root / "videos" / f"{q_uid}.mp4", _frames(scenes, fps, width, height), fps=fps)
        text, options, answer = _question(rng, scenes)
        entry = {"q_uid": q_uid, "question": text}
        entry.update({f"option {j}": o for j, o in enumerate(options)})
        questions.append(entry)
        answers[q_uid] = answer
    (root / "questions.json").write_text(json.dumps(questions, indent=1))
    (root / "subset_answers.json").write_text(json.dumps(answers, indent=1))
    stamp.write_text(json.dumps(params))
    return root
