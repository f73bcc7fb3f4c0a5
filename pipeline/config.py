"""One typed config for the whole product, loaded once from `config.yaml` at the entry point.

Each stage owns a small dataclass (sampling and ray here, the captioner's in
`captioner.settings`, the reader's in `qa.settings`); `Config` assembles them. `load_config`
reads YAML, applies `key.sub=value` overrides and validates every key against the
dataclass types: an unknown key or a wrong type raises `ConfigError` naming the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from captioner.caption_metrics import MetricSettings
from captioner.settings import CaptionerSettings
from captioner.train_data import DataSource
from captioner.train_settings import TrainSettings
from pipeline.errors import ConfigError
from qa.settings import JudgeSettings, ReaderSettings

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"


@dataclass
class DatasetSettings:
    """A registered dataset: an EgoSchema-format folder or a folder tree of videos."""

    format: Literal["egoschema", "folder"] = "egoschema"
    root: str = "data/egoschema"
    # EgoSchema only: fetch the hub's tables with huggingface_hub when questions.json is
    # missing, and import them (`mmser data egoschema --from` does the same from a copy).
    download: bool = False
    download_videos: bool = False  # and the video zips (about 105 GB)
    hf_repo: str = "lmms-lab/egoschema"
    # Only questions with a public answer (EgoSchema's 500-question subset).
    subset_only: bool = False


@dataclass
class SamplingSettings:
    """How frames are sampled from each video (decord)."""

    # fps: `fps` frames per second of video (LLoVi's EgoSchema setting is 1: one caption a
    # second); uniform: `num_frames` frames spread evenly over the whole video.
    policy: Literal["fps", "uniform"] = "fps"
    fps: float = 1.0
    num_frames: int = 8
    # Decode straight to this size (width, height); null keeps the video's own size.
    # 336 is CLIP ViT-L/14-336's input: resizing in the decoder avoids a full-size copy.
    resize: list[int] | None = field(default_factory=lambda: [336, 336])
    # A video whose decoding takes longer is abandoned (the worker process is killed).
    decode_timeout_s: float = 120.0
    # decord's own threads per video; 1 because parallelism comes from Ray workers.
    num_threads: int = 1

    def validate(self) -> None:
        if self.policy not in ("fps", "uniform"):
            raise ValueError(f"policy must be 'fps' or 'uniform', got {self.policy!r}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 2):
            raise ValueError(f"resize must be null or [width, height] >= 2, got {self.resize}")
        if self.decode_timeout_s <= 0:
            raise ValueError(f"decode_timeout_s must be > 0, got {self.decode_timeout_s}")
        if self.num_threads < 0:
            raise ValueError(
                f"num_threads must be >= 0 (0: decord's default), got {self.num_threads}"
            )


@dataclass
class RaySettings:
    """Where and how wide the Ray stages run."""

    # null: start a private local cluster; "auto" or "ray://host:port": join one.
    address: str | None = None
    # CPUs of the local cluster (null: all cores).
    num_cpus: int | None = None
    # Parallel decode workers per node (each num_cpus=1, decord num_threads=1).
    decode_workers: int = 2
    # Captioner actors per node without GPUs (with GPUs: one actor per GPU).
    cpu_caption_actors: int = 1
    # Use Ray at all; false runs every stage serially in this process (for debugging).
    enabled: bool = True

    def validate(self) -> None:
        if self.decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1, got {self.decode_workers}")
        if self.cpu_caption_actors < 1:
            raise ValueError(f"cpu_caption_actors must be >= 1, got {self.cpu_caption_actors}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be null or >= 1, got {self.num_cpus}")


@dataclass
class CacheSettings:
    """The offline caption cache."""

    dir: str = "data/cache"
    # sampled: size + 64 x 64 KiB chunks (constant cost; misses same-size edits between
    # chunks); full: hash every byte (exact, linear in file size).
    fingerprint: Literal["sampled", "full"] = "sampled"


@dataclass
class OutputSettings:
    """Where runs are written."""

    runs_dir: str = "runs"


@dataclass
class EvalCaptionsSettings:
    """The config's `eval_captions:` section."""

    # The split to score, in the training data's forms: [{format, path, image_root, split,
    # limit}] (a coco Karpathy file with split: test, a LLaVA JSON, a folder of images).
    data: list[DataSource] = field(default_factory=list)
    # Score this file instead of captioning: JSONL of {"id", "caption"} (this command's own
    # captions.jsonl works), a COCO results list [{"image_id", "caption"}], or {id: caption}.
    predictions: str | None = None
    batch_size: int | None = None  # images per captioner call (null: captioner.batch_size)
    metrics: MetricSettings = field(default_factory=MetricSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)


@dataclass
class Config:
    datasets: dict[str, DatasetSettings] = field(default_factory=dict)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    captioner: CaptionerSettings = field(default_factory=CaptionerSettings)
    reader: ReaderSettings = field(default_factory=ReaderSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval_captions: EvalCaptionsSettings = field(default_factory=EvalCaptionsSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading and validation -------------------------------------------------------------
# Hand-written rather than pydantic: the whole schema is plain dataclasses that each stage
# owns, and the ~60 lines below give errors in the project's own words (key, value, allowed).


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp` and build dataclasses; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad
        return _build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"config key '{key}': unsupported schema type {tp!r}")


def _build_dataclass(cls: Any, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise ConfigError(
            f"unknown config key {where}; allowed keys"
            f"{' under ' + repr(prefix) if prefix else ''}: {', '.join(sorted(known))}"
        )
    kwargs = {
        name: _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in values.items()
    }
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"config section '{prefix or 'top level'}': {exc}") from exc
    return obj


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted_key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`reader.concurrency=8` -> ("reader.concurrency", 8); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key, value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read `config.yaml` (or `path`), apply `key.sub=value` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return _build_dataclass(Config, raw, "")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Validate an in-memory mapping (tests, programmatic use)."""
    return _build_dataclass(Config, values, "")
