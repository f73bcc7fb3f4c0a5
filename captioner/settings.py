"""Settings of the captioning stage (the `captioner:` section of config.yaml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from captioner.baseline_settings import Llava15Settings, Tag2TextSettings


@dataclass
class GenerationSettings:
    """Decoding settings shared by every captioner, so comparisons are fair."""

    prompt: str = "Describe the image in detail."
    max_new_tokens: int = 60
    # Set equal to max_new_tokens in benchmarks so random weights cannot stop early.
    min_new_tokens: int = 0
    num_beams: int = 1

    def with_overrides(self, **overrides: Any) -> GenerationSettings:
        """A copy with every override that is not None applied: a baseline's section leaves
        a decoding field None to mean "the shared value"."""
        return dataclasses.replace(
            self, **{key: value for key, value in overrides.items() if value is not None}
        )


@dataclass
class SimpleSettings:
    """The single-pass "simple model" (CLIP ViT-L/14-336 + MLP projector + OPT-125M)."""

    # A saved checkpoint directory; null builds from `vision_model` + `language_model`.
    checkpoint: str | None = None
    vision_model: str = "openai/clip-vit-large-patch14-336"
    language_model: str = "facebook/opt-125m"
    # Greedy decode steps run compiled (torch.compile; CUDA graphs on a GPU) over the
    # static KV cache: the same captions as eager; pays off where a decode step is
    # launch-bound (GPU), costs a compilation per batch shape. false: eager.
    compile_decode: bool = False

    speed_only: ClassVar[tuple[str, ...]] = ("compile_decode",)

    def model_files(self) -> dict[str, str | None]:
        """The fields naming model files (local paths or hub ids), as build() reads them."""
        return {
            "checkpoint": self.checkpoint,
            "vision_model": self.vision_model,
            "language_model": self.language_model,
        }


DEFAULT_DRAFT_TOKENS = 8


@dataclass
class MMSeRSettings(SimpleSettings):
    """MM-SeR: the simple model plus SeR-Connector self-refinement."""

    # Refinement passes: 0 is the simple model, 1 the paper's setting, N iterative.
    refine_steps: int = 1
    # Skip refinement for a frame whose coarse caption's mean token probability is at
    # least this (null: always refine).
    confidence_threshold: float | None = None
    # The instruction after the coarse caption and the refinement tokens.
    refine_prompt: str = "Correct the description above using the highlighted regions."
    # Continue the first pass's KV cache (prefill only the new tokens); false re-prefills
    # the whole sequence each pass (slower; the same captions up to float rounding).
    reuse_cache: bool = True
    # Greedy refinement verifies the coarse caption as a draft, up to this many tokens per
    # LM call, instead of writing every token in its own call (0: plain greedy). The same
    # captions up to float rounding; fewer LM calls the more a refinement keeps. null:
    # DEFAULT_DRAFT_TOKENS on GPU, 0 on CPU, where a (k+1)-token call costs ~4 single
    # steps at batch 32 and drafts only paid off when nearly all of them were kept.
    draft_tokens: int | None = None
    # When the caption conditioning and the saliency queries are taken: "during" decoding
    # (forward hooks on every step, then one step feeding the last token) or "after" it
    # (one teacher-forced forward over the caption). The same captions up to float
    # rounding; "during" measured cheaper on CPU (bench-captioner); compile_decode always
    # records after (CUDA graphs reuse the buffers hooks would keep).
    record_state: Literal["during", "after"] = "during"

    # Fields that change speed, not captions: left out of the caption cache's key.
    speed_only: ClassVar[tuple[str, ...]] = (
        "compile_decode", "reuse_cache", "draft_tokens", "record_state",
    )


@dataclass
class CaptionerSettings:
    # Which captioner: simple, mmser, llava15, tag2text.
    name: str = "mmser"
    # Frames per forward pass (frames from different videos share batches).
    batch_size: int = 32
    # auto: cuda when available, else cpu.
    device: str = "auto"
    # auto: bfloat16 on cuda, float32 on cpu.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Decode steps' linears through oneDNN with prepacked weights (captioner/packed_linear.py):
    # null = on for float32 on a CPU, where they measured faster; the same captions up to
    # float rounding. Not part of the caption cache's key.
    packed_linears: bool | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    simple: SimpleSettings = field(default_factory=SimpleSettings)
    mmser: MMSeRSettings = field(default_factory=MMSeRSettings)
    llava15: Llava15Settings = field(default_factory=Llava15Settings)
    tag2text: Tag2TextSettings = field(default_factory=Tag2TextSettings)
