"""The LLaVA-1.5 baseline captioner: a llava-hf checkpoint through transformers.

    frames -> LlavaProcessor (CLIP preprocessing, "<image>" expanded to its patch tokens)
           -> LlavaForConditionalGeneration.generate, left-padded batch -> captions

Prompt form (LLaVA-1.5's): "USER: <image>\\n{prompt} ASSISTANT:". The prompt and token
budget default to the shared `captioner.generation` settings, so LLaVA-1.5, MM-SeR and the
simple model caption under the same instruction.

    from captioner.settings import CaptionerSettings
    from captioner.base import build_captioner
    captioner = build_captioner(CaptionerSettings(name="llava15"))  # llava-hf/llava-1.5-7b-hf
    captioner.caption_batch(frames).results[0].caption  # frames: (N, H, W, 3) uint8
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from captioner.base import (
    CaptionBatch,
    Captioner,
    CaptionResult,
    check_frames,
    resolve_device_dtype,
    with_build_options,
)
from captioner.errors import CaptionerError
from captioner.packed_linear import pack_decode_linears, packing_applies
from captioner.settings import CaptionerSettings

PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def real_config() -> Any:
    """llava-hf/llava-1.5-7b-hf's configuration, written out (the hub is not needed):
    CLIP ViT-L/14 at 336 px, a 2-layer GELU projector, Vicuna-7B (LLaMA-2 7B shape) with
    32064 tokens (32000 + <image> + padding to a multiple of 64)."""
    from transformers import LlamaConfig, LlavaConfig

    from captioner.configuration_mmser import clip_vit_l14_336_config  # the same tower

    vision = clip_vit_l14_336_config()
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


class Llava15Captioner(Captioner):
    """LLaVA-1.5 behind the captioner interface."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        settings: CaptionerSettings,
        name: str = "llava15",
    ) -> None:
        """`settings`: what the captioner was built from (its identity); the prompt and
        token budget are `settings.llava15`'s overrides of `settings.generation`."""
        self.name = name
        self.model = model
        self.processor = processor
        self.settings = settings
        own = settings.llava15
        g = settings.generation.with_overrides(
            prompt=own.prompt,
            max_new_tokens=own.max_new_tokens,
            min_new_tokens=own.min_new_tokens,
            num_beams=own.num_beams,
        )
        self.prompt = g.prompt
        self.max_new_tokens = g.max_new_tokens
        self.min_new_tokens = g.min_new_tokens
        self.num_beams = g.num_beams
        device, self.dtype = resolve_device_dtype(settings.device, settings.dtype)
        self.device = torch.device(device)
        weight = next(model.parameters())
        if packing_applies(settings.packed_linears, weight.device, weight.dtype):
            pack_decode_linears(model, ("model.language_model", "lm_head"))
        # Decoder-only generation continues every row from its last token: pad on the left.
        processor.tokenizer.padding_side = "left"
        self.pad_token_id = processor.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = processor.tokenizer.eos_token_id

    def caption_batch(self, frames: Sequence[np.ndarray] | np.ndarray) -> CaptionBatch:
        frames = check_frames(frames)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        images = [Image.fromarray(frame) for frame in frames]
        text = [PROMPT_TEMPLATE.format(prompt=self.prompt)] * len(images)
        inputs = self.processor(images=images, text=text, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, self.dtype))
        timings["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                min_new_tokens=self.min_new_tokens,
                num_beams=self.num_beams,
                do_sample=False,
                pad_token_id=self.pad_token_id,
            )
        timings["generate"] = time.perf_counter() - start
        start = time.perf_counter()
        new = out[:, inputs["input_ids"].shape[1]:]  # (N, new tokens): the answers
        captions = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        timings["decode"] = time.perf_counter() - start
        return CaptionBatch([CaptionResult(caption=c.strip()) for c in captions], timings)


def _load(checkpoint: str, dtype: str) -> tuple[Any, Any]:
    """Processor and model from a llava-hf checkpoint; any mismatch raises CaptionerError."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as exc:
        raise CaptionerError(
            f"llava15 checkpoint {checkpoint}: no readable config.json ({exc})"
        ) from exc
    if config.model_type != "llava":
        raise CaptionerError(
            f"llava15 checkpoint {checkpoint}: model_type is {config.model_type!r}, expected "
            f"'llava' (a llava-hf checkpoint such as llava-hf/llava-1.5-7b-hf)"
        )
    try:
        processor = AutoProcessor.from_pretrained(checkpoint)
        model, info = LlavaForConditionalGeneration.from_pretrained(
            checkpoint,
            dtype=getattr(torch, dtype),
            attn_implementation="sdpa",
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CaptionerError(f"llava15 checkpoint {checkpoint}: cannot load ({exc})") from exc
    # transformers fills missing weights with random values and only warns: refuse instead.
    problems = [
        f"{kind} ({len(keys)}): {', '.join(sorted(map(str, keys))[:20])}"
        for kind, keys in (
            ("missing keys", info.get("missing_keys") or ()),
            ("unexpected keys", info.get("unexpected_keys") or ()),
            ("wrong shapes", info.get("mismatched_keys") or ()),
        )
        if keys
    ]
    if problems:
        raise CaptionerError(
            f"llava15 checkpoint {checkpoint} does not match its config: " + "; ".join(problems)
        )
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise CaptionerError(
            f"llava15 checkpoint {checkpoint}: expected a LlavaProcessor, got "
            f"{type(processor).__name__}"
        )
    return processor, model


def build(settings: CaptionerSettings, name: str = "llava15", **kwargs: Any) -> Llava15Captioner:
    """Build LLaVA-1.5 from `settings.llava15`; kwargs may override `checkpoint`, `device`
    and `dtype`."""
    settings = with_build_options(settings, name, kwargs, ("checkpoint",))
    try:
        settings.llava15.validate()
    except ValueError as exc:
        raise CaptionerError(str(exc)) from exc
    device, dtype = resolve_device_dtype(settings.device, settings.dtype)
    processor, model = _load(settings.llava15.checkpoint, dtype)
    model.to(device).eval()
    return Llava15Captioner(model, processor, settings, name)


def parameter_counts(settings: CaptionerSettings, name: str = "llava15") -> dict[str, int]:
    """Per-component parameters of LLaVA-1.5-7B (llava-hf layout), built on the meta device."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(real_config())
    parts = {
        "vision_tower": model.model.vision_tower,
        "multi_modal_projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
