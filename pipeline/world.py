"""A synthetic world of drawn scenes with one canonical caption each (the evidence world).

One generator serves two configurations:
- `LEARN_WORLD`: two objects (shape, colour, size, position) and the spatial relation
  between them, e.g. "a large red circle to the left of a small blue square". Used to show
  that MM-SeR's refinement learns to correct a caption by looking at the image
  (`make bench-learn`).
- `DEMO_WORLD`: one shape on a coloured background, the scenes of the demo videos
  (`pipeline/demo_data.py` draws its frames with `render`), e.g.
  "a red circle on a grey background". The demo captioner is trained on it.

Every scene has exactly ONE right caption: objects are named in a fixed order (the left
one first when they sit side by side, the upper one first when stacked), so "A to the left
of B" and "B to the right of A" are never both right (a pilot measured that two right
orderings cap exact match near 50%). The two objects never share a colour or a shape, so
the caption names each unambiguously. Some (colour, shape) combinations are held out of
the train and validation splits entirely and appear only in the test split.

    from pipeline.world import LEARN_WORLD, write_world
    root = write_world("data/world", LEARN_WORLD, {"train": 4000, "val": 200, "test": 1000})
    # root/train.json (LLaVA conversation JSON + "slots"), root/images/train/00000.png, ...

Nothing here is downloaded; the same seed gives the same files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

HeldOut = Literal["exclude", "include"]


@dataclass(frozen=True)
class WorldSpec:
    """What a world can contain and how it is drawn and described."""

    name: str
    colours: dict[str, tuple[int, int, int]]
    shapes: tuple[str, ...]
    # Size word -> object diameter as a fraction of the image height. One size: the
    # caption leaves the size word out.
    sizes: dict[str, float]
    backgrounds: dict[str, tuple[int, int, int]]
    num_objects: int  # 1 or 2
    # The caption names the background ("... on a grey background").
    mention_background: bool
    # (colour, shape) pairs never drawn in the train and validation splits.
    held_out: tuple[tuple[str, str], ...] = ()
    image_size: tuple[int, int] = (64, 64)  # (width, height) of written images
    colour_jitter: int = 12  # +- per channel, so colour is a range, not one RGB value
    noise: int = 6  # +- per pixel of background grain
    prompt: str = "Describe the image in detail."  # the human turn of the written JSON

    @property
    def relations(self) -> tuple[str, ...]:
        return ("to the left of", "above") if self.num_objects == 2 else ()


LEARN_WORLD = WorldSpec(
    name="learn",
    colours={
        "red": (215, 45, 40), "green": (45, 175, 60), "blue": (45, 85, 220),
        "yellow": (235, 210, 45), "purple": (140, 60, 185), "white": (240, 240, 240),
    },
    shapes=("circle", "square", "triangle", "diamond", "cross"),
    sizes={"small": 0.24, "large": 0.38},
    backgrounds={"grey": (70, 70, 70)},
    num_objects=2,
    mention_background=False,
    held_out=(("red", "triangle"), ("green", "cross"), ("blue", "diamond"),
              ("yellow", "circle"), ("purple", "square")),
)  # fmt: skip

# The demo videos' palette (pipeline/demo_data.py); one object size, the background named.
DEMO_WORLD = WorldSpec(
    name="demo",
    colours={
        "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
        "yellow": (235, 215, 40), "purple": (140, 60, 180), "orange": (240, 140, 30),
        "white": (245, 245, 245),
    },
    shapes=("circle", "square", "triangle"),
    sizes={"": 1 / 3},
    backgrounds={"grey": (110, 110, 110), "black": (15, 15, 15), "teal": (20, 90, 100)},
    num_objects=1,
    mention_background=True,
    image_size=(96, 96),
    colour_jitter=0,
    noise=0,
)  # fmt: skip

WORLDS = {"learn": LEARN_WORLD, "demo": DEMO_WORLD}


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, as a fraction of the width
    cy: float  # centre, as a fraction of the height


@dataclass(frozen=True)
class WorldScene:
    """Objects in caption order (the left or upper one first) and their relation."""

    objects: tuple[WorldObject, ...]
    background: str
    relation: str | None = None  # "to the left of" | "above" for two objects


# --- captions -----------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _noun_phrase(obj: WorldObject) -> str:
    words = [w for w in (obj.size, obj.colour, obj.shape) if w]
    return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: WorldScene, spec: WorldSpec) -> str:
    """The scene's one canonical caption."""
    text = _noun_phrase(scene.objects[0])
    if len(scene.objects) == 2:
        text += f" {scene.relation} {_noun_phrase(scene.objects[1])}"
    if spec.mention_background:
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


def slots(scene: WorldScene, spec: WorldSpec) -> dict[str, str]:
    """What a caption must get right, slot by slot: obj1_colour, obj1_shape, [obj1_size],
    (the same for obj2, relation), [background]."""
    out: dict[str, str] = {}
    for i, obj in enumerate(scene.objects, start=1):
        out[f"obj{i}_colour"] = obj.colour
        out[f"obj{i}_shape"] = obj.shape
        if len(spec.sizes) > 1:
            out[f"obj{i}_size"] = obj.size
    if scene.relation is not None:
        out["relation"] = scene.relation
    if spec.mention_background:
        out["background"] = scene.background
    return out


def _alternatives(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _caption_pattern(spec: WorldSpec) -> re.Pattern[str]:
    size = f"(?P<size{{i}}>{_alternatives(spec.sizes)}) " if len(spec.sizes) > 1 else ""
    obj = (rf"an? {size}(?P<colour{{i}}>{_alternatives(spec.colours)}) "
           rf"(?P<shape{{i}}>{_alternatives(spec.shapes)})")  # fmt: skip
    text = obj.format(i=1)
    if spec.num_objects == 2:
        text += rf" (?P<relation>{_alternatives(spec.relations)}) " + obj.format(i=2)
    if spec.mention_background:
        text += rf" on an? (?P<background>{_alternatives(spec.backgrounds)}) background"
    return re.compile(rf"^\s*{text}\s*\.?\s*$", re.IGNORECASE)


def parse_caption(text: str, spec: WorldSpec) -> dict[str, str] | None:
    """The slots a caption states, or None when it does not follow the world's grammar."""
    match = _caption_pattern(spec).match(text)
    if match is None:
        return None
    found = {k: v.lower() for k, v in match.groupdict().items()}
    out: dict[str, str] = {}
    for i in range(1, spec.num_objects + 1):
        out[f"obj{i}_colour"] = found[f"colour{i}"]
        out[f"obj{i}_shape"] = found[f"shape{i}"]
        if len(spec.sizes) > 1:
            out[f"obj{i}_size"] = found[f"size{i}"]
    if spec.num_objects == 2:
        out["relation"] = found["relation"]
    if spec.mention_background:
        out["background"] = found["background"]
    return out


def slot_accuracy(predicted: str, truth: dict[str, str], spec: WorldSpec) -> float:
    """Share of the truth's slots the predicted caption gets right (0 when unparseable)."""
    parsed = parse_caption(predicted, spec) or {}
    return sum(parsed.get(k) == v for k, v in truth.items()) / len(truth)


def object_boxes(scene: WorldScene, spec: WorldSpec) -> list[dict[str, float | str]]:
    """Where each object is drawn: its centre and radii as fractions of the width and the
    height (stage 0 labels the patches it covers)."""
    width, height = spec.image_size
    return [
        {"shape": o.shape, "colour": o.colour, "size": o.size, "cx": round(o.cx, 4),
         "cy": round(o.cy, 4), "rx": round(spec.sizes[o.size] / 2 * height / width, 4),
         "ry": round(spec.sizes[o.size] / 2, 4)}
        for o in scene.objects
    ]


def word_lists(spec: WorldSpec) -> dict[str, dict[str, list[str]]]:
    """The world's interchangeable words, in the perturber's WordLists JSON form: a
    perturbation swaps a word for another the world uses, so it never produces a word that
    only perturbations contain (a side channel a model could read without the image)."""
    lists: dict[str, dict[str, list[str]]] = {
        "entity": {"object": list(spec.shapes)},
        "attribute": {"colour": list(spec.colours)},
    }
    if len(spec.sizes) > 1:
        lists["attribute"]["size"] = list(spec.sizes)
    if spec.relations:
        lists["relation"] = {"spatial": list(spec.relations)}
    return lists


# --- sampling -----------------------------------------------------------------------------


def _is_held_out(obj: WorldObject, spec: WorldSpec) -> bool:
    return (obj.colour, obj.shape) in spec.held_out


def scene_is_held_out(scene: WorldScene, spec: WorldSpec) -> bool:
    return any(_is_held_out(o, spec) for o in scene.objects)


def _draw_object(rng: np.random.Generator, spec: WorldSpec, avoid: WorldObject | None,
                 allow_held_out: bool) -> tuple[str, str, str]:
    """(shape, colour, size), in WorldObject's field order."""
    while True:
        colour = str(rng.choice(list(spec.colours)))
        shape = str(rng.choice(spec.shapes))
        if avoid is not None and (colour == avoid.colour or shape == avoid.shape):
            continue
        if not allow_held_out and (colour, shape) in spec.held_out:
            continue
        return shape, colour, str(rng.choice(list(spec.sizes)))


def sample_scene(rng: np.random.Generator, spec: WorldSpec, held_out: HeldOut) -> WorldScene:
    """A random scene; `held_out="exclude"` never draws a held-out (colour, shape) pair."""
    allow = held_out == "include"
    background = str(rng.choice(list(spec.backgrounds)))
    width, height = spec.image_size
    aspect = height / width
    if spec.num_objects == 1:
        shape, colour, size = _draw_object(rng, spec, None, allow)
        r = spec.sizes[size] / 2
        cx = rng.uniform(r * aspect + 0.02, 1 - r * aspect - 0.02)
        cy = rng.uniform(r + 0.02, 1 - r - 0.02)
        return WorldScene((WorldObject(shape, colour, size, cx, cy),), background)
    first = WorldObject(*_draw_object(rng, spec, None, allow), 0.0, 0.0)
    second = WorldObject(*_draw_object(rng, spec, first, allow), 0.0, 0.0)
    relation = str(rng.choice(spec.relations))
    horizontal = relation == "to the left of"
    # Radii as fractions of the width (along x) or the height (along y).
    along = aspect if horizontal else 1.0
    across_scale = 1.0 if horizontal else aspect
    r1, r2 = spec.sizes[first.size] / 2, spec.sizes[second.size] / 2
    # Along the relation's axis: the first object in the first part of the image, the second
    # after it with a clear gap; across it: both near one line, so the relation is plain.
    gap = 0.06
    lo1, hi2 = r1 * along + 0.02, 1 - r2 * along - 0.02
    span = hi2 - lo1 - ((r1 + r2) * along + gap)
    a1 = lo1 + rng.uniform(0, max(span, 0.0))
    a2 = rng.uniform(min(a1 + (r1 + r2) * along + gap, hi2), hi2)
    margin = max(r1, r2) * across_scale + 0.04
    across = rng.uniform(margin, 1 - margin)
    jitter = rng.uniform(-0.04, 0.04, size=2)
    if horizontal:
        c1, c2 = (a1, across + jitter[0]), (a2, across + jitter[1])
    else:
        c1, c2 = (across + jitter[0], a1), (across + jitter[1], a2)
    objects = (
        WorldObject(first.shape, first.colour, first.size, *c1),
        WorldObject(second.shape, second.colour, second.size, *c2),
    )
    return WorldScene(objects, background, relation)


# --- drawing ------------------------------------------------------------------------------


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float,
                r: float) -> np.ndarray:
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85)
    if shape == "triangle":  # pointing up, base at the bottom
        rows = dy + r
        return (rows >= 0) & (rows <= 2 * r) & (abs(dx) <= rows / 2)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r
    if shape == "cross":
        arm = r * 0.35
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: WorldScene, spec: WorldSpec, width: int, height: int,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw `scene` as an RGB uint8 image (height, width, 3). With `rng`, colours vary by
    up to `spec.colour_jitter` per channel and the background gets `spec.noise` grain."""
    frame = np.empty((height, width, 3), dtype=np.int16)
    frame[:] = spec.backgrounds[scene.background]
    if rng is not None and spec.noise:
        frame += rng.integers(-spec.noise, spec.noise + 1, frame.shape, dtype=np.int16)
    ys, xs = np.ogrid[:height, :width]
    for obj in scene.objects:
        r = spec.sizes[obj.size] * height / 2
        mask = _shape_mask(obj.shape, xs, ys, obj.cx * width, obj.cy * height, r)
        colour = np.array(spec.colours[obj.colour], dtype=np.int16)
        if rng is not None and spec.colour_jitter:
            colour = colour + rng.integers(-spec.colour_jitter, spec.colour_jitter + 1, 3)
        frame[np.broadcast_to(mask, (height, width))] = colour
    return frame.clip(0, 255).astype(np.uint8)


# --- writing a dataset --------------------------------------------------------------------

# Splits are drawn from different seeds: seed + this offset.
SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


@dataclass
class WorldInfo:
    """What `write_world` wrote, kept in world.json beside the data."""

    spec: dict
    seed: int
    splits: dict[str, int]
    held_out_in_test: int = 0
    files: dict[str, str] = field(default_factory=dict)


def _spec_dict(spec: WorldSpec) -> dict:
    out = asdict(spec)
    out["held_out"] = [list(p) for p in spec.held_out]
    out["colours"] = {k: list(v) for k, v in spec.colours.items()}
    out["backgrounds"] = {k: list(v) for k, v in spec.backgrounds.items()}
    out["image_size"] = list(spec.image_size)
    return out


def write_world(root: str | Path, spec: WorldSpec, splits: dict[str, int],
                seed: int = 0) -> Path:
    """Write images and LLaVA-style JSON per split under `root` (skipped when world.json
    already records the same spec, seed and sizes). Train and validation exclude the
    held-out combinations; test includes them. Each JSON item carries "slots" (the truth,
    slot by slot) and "held_out" beside the conversation."""
    from PIL import Image

    root = Path(root)
    info = WorldInfo(spec=_spec_dict(spec), seed=seed, splits=dict(splits))
    stamp = root / "world.json"
    if stamp.exists():
        old = json.loads(stamp.read_text())
        wanted = _as_json({"spec": info.spec, "seed": seed, "splits": info.splits})
        if {k: old.get(k) for k in ("spec", "seed", "splits")} == wanted:
            return root
    width, height = spec.image_size
    for split, count in splits.items():
        if split not in SPLIT_SEED_OFFSET:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLIT_SEED_OFFSET)}")
        rng = np.random.default_rng(seed + SPLIT_SEED_OFFSET[split])
        policy: HeldOut = "include" if split == "test" else "exclude"
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        items = []
        for i in range(count):
            scene = sample_scene(rng, spec, policy)
            name = f"{i:05d}.png"
            Image.fromarray(render(scene, spec, width, height, rng)).save(folder / name)
            held = scene_is_held_out(scene, spec)
            info.held_out_in_test += int(held and split == "test")
            items.append({
                "id": f"{spec.name}-{split}-{i:05d}",
                "image": f"images/{split}/{name}",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{spec.prompt}"},
                    {"from": "gpt", "value": caption(scene, spec)},
                ],
                "slots": slots(scene, spec),
                "objects": object_boxes(scene, spec),
                "held_out": held,
            })
        (root / f"{split}.json").write_text(json.dumps(items, indent=0))
        info.files[split] = f"{split}.json"
    (root / "word_lists.json").write_text(json.dumps(word_lists(spec), indent=1))
    info.files["word_lists"] = "word_lists.json"
    stamp.write_text(json.dumps(asdict(info), indent=1))
    return root


def _as_json(values: dict) -> dict:
    """`values` as it reads back from JSON (tuples become lists), for comparing stamps."""
    return json.loads(json.dumps(values))


def spec_from_dict(values: dict) -> WorldSpec:
    """The inverse of the spec stored in world.json."""
    values = dict(values)
    values["colours"] = {k: tuple(v) for k, v in values["colours"].items()}
    values["backgrounds"] = {k: tuple(v) for k, v in values["backgrounds"].items()}
    values["shapes"] = tuple(values["shapes"])
    values["held_out"] = tuple(tuple(p) for p in values["held_out"])
    values["image_size"] = tuple(values["image_size"])
    return WorldSpec(**values)


def load_world_spec(root: str | Path) -> WorldSpec:
    """The spec of the world written under `root`."""
    return spec_from_dict(json.loads((Path(root) / "world.json").read_text())["spec"])


__all__ = [
    "DEMO_WORLD", "LEARN_WORLD", "WORLDS", "WorldObject", "WorldScene", "WorldSpec", "caption",
    "load_world_spec", "parse_caption", "render", "sample_scene", "slot_accuracy", "slots",
    "word_lists", "write_world",
]  # fmt: skip


# --- a world ready for `mmser train` ------------------------------------------------------


def text_corpus(spec: WorldSpec, n: int, seed: int) -> list[str]:
    """`n` captions of random scenes from the world's whole grammar, held-out colour-shape
    pairs included: text for the stand-in LM (no image goes with them)."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng, spec, "include"), spec) for _ in range(n)]


@dataclass
class WorldComponents:
    """What `build_world` leaves: the data and the stage-0 components standing in for
    openai/clip-vit-large-patch14-336 and facebook/opt-125m."""

    root: Path
    vision_model: Path
    language_model: Path
    stand_in: dict


def build_world(
    root: str | Path, spec: WorldSpec, splits: dict[str, int], seed: int = 0,
    vision_steps: int = 400, text_steps: int = 200, components: bool = True,
    world_seed: int = 0,
) -> WorldComponents:
    """Write the world's data under `root` (from `world_seed`) and, with `components`,
    tiny CLIP and OPT pretrained on it (stage 0, captioner/stand_in.py) from model seed
    `seed` under root/components/seed-{seed}; both are reused when already there for the
    same settings."""
    from captioner.random_weights import WORLD_SIZES, build_tiny_components
    from captioner.stand_in import pretrain_components
    from captioner.train_data import DataSource, load_caption_source

    root = write_world(root, spec, splits, seed=world_seed)
    folder = root / "components" / f"seed-{seed}"
    stamp = folder / "built.json"
    params = {"sizes": asdict(WORLD_SIZES), "vision_steps": vision_steps,
              "text_steps": text_steps, "seed": seed, "world": _spec_dict(spec),
              "text": "grammar"}
    params = _as_json(params)
    if components and not (stamp.exists() and json.loads(stamp.read_text()) == params):
        stamp.unlink(missing_ok=True)  # written again only once stage 0 has finished
        vision_dir, text_dir = build_tiny_components(folder, WORLD_SIZES, seed=seed)
        train = load_caption_source(DataSource("llava", str(root / "train.json"))).samples
        val = load_caption_source(DataSource("llava", str(root / "val.json"))).samples
        pretrain_components(vision_dir, text_dir, train, val, vision_steps=vision_steps,
                            text_steps=text_steps, seed=seed,
                            text=text_corpus(spec, len(train), seed=world_seed + 7))
        stamp.write_text(json.dumps(params))
    report_path = folder / "stand_in.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return WorldComponents(root, folder / "clip", folder / "opt", report)
