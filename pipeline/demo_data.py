"""The bundled demo dataset: small synthetic videos in EgoSchema's layout, from a fixed seed,
and the demo captioner trained on the same drawings.

Each video is a sequence of scenes; a scene is a plain background with one coloured shape
moving across it, drawn by the synthetic world's renderer (`pipeline.world.DEMO_WORLD`).
Every question's answer follows from what is drawn (which colour came first, which shape
came last, how many scenes), so a reader with good captions could get it right. Generated
once under `data/demo/` and reused.

`train_demo_captioner` trains a tiny MM-SeR on still images of that world with
`mmser train` (stage 0, align, caption, refine; a few minutes on 2 cores, cached beside
the data), so the demo's captions describe its frames. It learned a synthetic world:
that shows the pipeline and the training working, not real-world caption quality.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.synth import write_video
from pipeline.world import DEMO_WORLD, WorldObject, WorldScene, render

COLOURS = DEMO_WORLD.colours
BACKGROUNDS = DEMO_WORLD.backgrounds
SHAPES = DEMO_WORLD.shapes
# Bump when the generator changes, so cached demo data is rebuilt. 2: square frames drawn
# by the world's renderer (the decoder resizes to 336 x 336 without distorting shapes).
DEMO_VERSION = 2


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    seconds: float


def _draw_scene_frame(scene: Scene, t: float, width: int, height: int) -> np.ndarray:
    """One frame of a scene at fraction t in [0, 1): the shape slides left to right."""
    r = DEMO_WORLD.sizes[""] / 2  # radius, as a share of the height
    margin = r * height / width
    cx = margin + t * (1 - 2 * margin)
    cy = 0.5 + 0.2 * np.sin(2 * np.pi * t)
    obj = WorldObject(scene.shape, scene.colour, "", cx, cy)
    return render(WorldScene((obj,), scene.background), DEMO_WORLD, width, height)


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
    width: int = 144,
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


# Stage-0 and training steps of the demo captioner (about 4 minutes on 2 cores).
DEMO_TRAINING = {"images": 1500, "vision_steps": 800, "text_steps": 100, "align": 60,
                 "caption": 350, "refine": 150}


def train_demo_captioner(root: str | Path, config_path: str | None = None) -> Path:
    """A tiny MM-SeR trained on the demo world through `mmser train`, under
    root/captioner; returns its checkpoint folder (reused when already trained)."""

    from pipeline.config import load_config
    from pipeline.train import describe, run_training
    from pipeline.world import build_world

    root = Path(root)
    final = root / "captioner" / "refine" / "model"
    stamp = root / "captioner" / "demo_training.json"
    if (final / "config.json").exists() and stamp.exists() and \
            json.loads(stamp.read_text()) == DEMO_TRAINING:
        return final
    n = DEMO_TRAINING
    world = build_world(root / "world", DEMO_WORLD, {"train": n["images"], "val": 100},
                        vision_steps=n["vision_steps"], text_steps=n["text_steps"])
    overrides = [
        f"train.vision_model={world.vision_model}",
        f"train.language_model={world.language_model}",
        f"train.output_dir={root / 'captioner'}",
        f"train.data.train=[{{format: llava, path: {world.root}/train.json}}]",
        f"train.data.eval=[{{format: llava, path: {world.root}/val.json}}]",
        f"train.perturb.word_lists={world.root}/word_lists.json",
        "train.learning_rate=0.001", "train.batch_size=32", "train.eval_steps=50",
        "train.save_steps=50", "train.save_total_limit=1", "train.dataloader_workers=0",
        "train.logging_steps=25", "train.max_caption_tokens=16",
        "train.perturb.max_length_change=0.3", "train.pairs.own_max=500",
        "captioner.generation.max_new_tokens=16",
        "train.connector={connector_hidden_size: 64, connector_num_layers: 1, "
        "connector_num_heads: 2, num_refine_tokens: 8, connector_layers: [1, 2, 3, 4]}",
    ]
    config = load_config(config_path, overrides)
    for stage in ("align", "caption", "refine"):
        steps = dataclasses.replace(config.train, max_steps=n[stage])
        print(describe(run_training(dataclasses.replace(config, train=steps), stage)))
    stamp.write_text(json.dumps(DEMO_TRAINING))
    return final
