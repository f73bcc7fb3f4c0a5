"""The `simple` and `mmser` captioners (registry entries in captioner/base.py).

    from captioner.base import build_captioner
    captioner = build_captioner(settings, "mmser", checkpoint="checkpoints/tiny-mmser")
    batch = captioner.caption_batch(frames)   # frames: (N, H, W, 3) uint8
    batch.results[0].caption, batch.results[0].coarse_caption, batch.timings

Both load the same checkpoint format (`MMSeRForConditionalGeneration`); `simple` runs
only the first pass (refine_steps 0), whatever the checkpoint holds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    CompileConfig,
    GenerationConfig,
    OPTForCausalLM,
)

from captioner.base import (
    CaptionBatch,
    Captioner,
    CaptionResult,
    check_frames,
    image_backend,
    resolve_device_dtype,
    with_build_options,
)
from captioner.configuration_mmser import MMSeRConfig, real_config
from captioner.errors import CaptionerError
from captioner.modeling_mmser import (
    MMSeRForConditionalGeneration,
    PassState,
    count_parameters,
    register_auto_classes,
)
from captioner.packed_linear import pack_decode_linears, packing_applies
from captioner.sequence import build_layout, encode_captions
from captioner.settings import DEFAULT_DRAFT_TOKENS, CaptionerSettings

IMAGE_TOKEN = "<image>"
NAMES = ("simple", "mmser")
# What runs once per decode step (packed on CPU): the OPT decoder and its LM head.
DECODER_LINEARS = ("model.language_model", "lm_head")


def from_components(
    vision_model: str,
    language_model: str,
    refine: bool = True,
    connector: dict[str, Any] | None = None,
) -> tuple[MMSeRForConditionalGeneration, Any, Any]:
    """A trainable starting point: pretrained CLIP vision tower and OPT (hub ids or local
    directories), a fresh projector and SeR-Connector. Returns (model, processor, tokenizer).
    """
    vision = CLIPVisionModel.from_pretrained(vision_model)
    lm = OPTForCausalLM.from_pretrained(language_model)
    processor = AutoImageProcessor.from_pretrained(vision_model, backend=image_backend())
    tokenizer = AutoTokenizer.from_pretrained(language_model, padding_side="left")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id >= lm.config.vocab_size:
        # OPT-125M has unused rows 50265-50271; a tokenizer without room needs a resize.
        lm.resize_token_embeddings(len(tokenizer))
    v = vision.config
    config = MMSeRConfig(
        vision_config=v.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_index=image_id,
        image_seq_length=(v.image_size // v.patch_size) ** 2,
        refine=refine,
        **(connector or {}),
    )
    model = MMSeRForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.tie_weights()
    return model, processor, tokenizer


class MMSeRCaptioner(Captioner):
    """Batched captioning with optional self-refinement (refine_steps 0 = simple model)."""

    def __init__(
        self,
        name: str,
        model: MMSeRForConditionalGeneration,
        processor: Any,
        tokenizer: Any,
        settings: CaptionerSettings,
        fingerprint: str | None = None,
    ) -> None:
        """`settings`: what the captioner was built from (its identity). `fingerprint` is
        ignored (the identity fingerprints the settings' checkpoint); kept for callers that
        still pass it."""
        self.name = name
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.settings = settings
        mm = settings.mmser
        self.refine_steps = mm.refine_steps if name == "mmser" else 0
        self.confidence_threshold = mm.confidence_threshold if name == "mmser" else None
        if self.refine_steps < 0:
            raise CaptionerError(
                f"captioner.mmser.refine_steps must be >= 0, got {mm.refine_steps}"
            )
        if mm.draft_tokens is not None and mm.draft_tokens < 0:
            raise CaptionerError(
                f"captioner.mmser.draft_tokens must be >= 0 or null, got {mm.draft_tokens}"
            )
        if self.refine_steps and model.ser_connector is None:
            raise CaptionerError(
                f"captioner {name!r}: refine_steps={self.refine_steps} needs a checkpoint with a "
                "SeR-Connector, but this one is a simple model (config.refine is false)"
            )
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if packing_applies(settings.packed_linears, self.device, self.dtype):
            pack_decode_linears(model, DECODER_LINEARS)
        # Draft verification pays where a decode step is memory-bound (GPU), see settings.
        auto_draft = DEFAULT_DRAFT_TOKENS if self.device.type == "cuda" else 0
        self.max_draft = auto_draft if mm.draft_tokens is None else mm.draft_tokens
        cfg = model.config
        gen = settings.generation
        # A trained checkpoint carries the prompts it learned; a model built from components
        # (or an older checkpoint) takes the config's.
        self.prompt = cfg.caption_prompt or gen.prompt
        self.refine_prompt = cfg.refine_prompt or mm.refine_prompt
        self.layout = build_layout(
            tokenizer, cfg.image_token_index, cfg.image_seq_length, self.prompt,
            self.refine_prompt,
        )
        self.prompt_ids = torch.tensor(self.layout.prompt_ids, device=self.device)  # (S,)
        self.instruction_ids = self.layout.instruction_tensor(self.device)  # (I,)
        self.record_after = name == "mmser" and mm.record_state == "after"
        own = settings.simple if name == "simple" else mm
        self.generation = GenerationConfig(
            max_new_tokens=gen.max_new_tokens,
            min_new_tokens=gen.min_new_tokens,
            num_beams=gen.num_beams,
            do_sample=False,
            eos_token_id=self.layout.eos_token_id,
            pad_token_id=self.layout.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            compile_config=compile_config(self.device) if own.compile_decode else None,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def caption_batch(self, frames: Sequence[np.ndarray] | np.ndarray) -> CaptionBatch:
        """B frames (H, W, 3) uint8 -> B results; timings in seconds per stage."""
        return self._caption(frames, given=None)

    def refine_given(
        self, frames: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str],
        zero_refinement: bool = False,
    ) -> CaptionBatch:
        """Refine the given captions of B frames instead of the model's own coarse ones:
        each result's `coarse_caption` is the given caption, `caption` its refinement
        (refine_steps passes; the confidence threshold does not apply, as the model did not
        write the given caption). For evaluation: a perturbed caption in, a corrected one
        out; `zero_refinement` replaces the refinement tokens by zeros (a control)."""
        if not self.refine_steps:
            raise CaptionerError(f"captioner {self.name!r} does not refine (refine_steps 0)")
        frames = check_frames(frames)
        if len(captions) != len(frames):
            raise CaptionerError(f"{len(captions)} captions given for {len(frames)} frames")
        return self._caption(frames, given=list(captions), zero_refinement=zero_refinement)

    def _caption(
        self, frames: Sequence[np.ndarray] | np.ndarray, given: list[str] | None,
        zero_refinement: bool = False,
    ) -> CaptionBatch:
        frames = check_frames(frames)
        B = len(frames)
        timings: dict[str, float] = {}
        start = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal start
            self._sync()
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - start
            start = now

        pixels = self.processor(images=frames, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)  # (B, 3, H, W)
        lap("preprocess")
        with torch.inference_mode():
            # The simple model (no refinement) keeps no connector features.
            features = self.model.encode_images(pixels, multi_layer=self.refine_steps > 0)
        lap("vision")
        input_ids = self.prompt_ids[None].expand(B, -1)  # one prompt: no padding needed
        mask = torch.ones_like(input_ids)
        # Greedy decoding writes into preallocated (static) KV caches: with a reused cache,
        # one KVArena for every pass, each pass viewing only the positions it can write.
        greedy = self.generation.num_beams == 1
        T, n_instr = self.generation.max_new_tokens, len(self.instruction_ids)
        reuse = self.settings.mmser.reuse_cache
        # A verified draft (last refinement pass) may spend up to T more slots on rejections.
        slack = T if self.refine_steps and self.max_draft else 0

        def room(last: bool) -> int | None:
            """Cache positions one pass writes after its prompt."""
            return (T + (slack if last else 0)) if greedy else None

        arena_room = None
        if greedy and reuse and self.refine_steps:
            arena_room = self.model.cache_room(T, self.refine_steps, n_instr, slack)
        if given is None:
            state = self.model.caption_pass(
                input_ids, mask, features, self.generation, keep_state=self.refine_steps > 0,
                cache_room=room(last=False), arena_room=arena_room,
                record_after=self.record_after,
            )
            coarse = self.tokenizer.batch_decode(state.tokens, skip_special_tokens=True)
        else:
            tokens = encode_captions(self.tokenizer, given, T + 1, self.layout).to(self.device)
            state = self.model.given_caption_pass(
                input_ids, mask, features, tokens, self.layout.eos_token_id
            )
            coarse = list(given)
        lap("coarse")
        captions, passes, counters = self._refine(
            state, features, list(coarse), room, reuse, zero_refinement,
            threshold=self.confidence_threshold if given is None else None,
        )
        if self.refine_steps:
            lap("refine")
        results = [
            CaptionResult(
                caption=captions[i].strip(),
                coarse_caption=coarse[i].strip() if self.refine_steps else None,
                refine_passes=passes[i],
            )
            for i in range(B)
        ]
        return CaptionBatch(results=results, timings=timings, counters=counters)

    def _refine(
        self, state: PassState, features: Any, captions: list[str], room: Any, reuse: bool,
        zero_refinement: bool, threshold: float | None,
    ) -> tuple[list[str], list[int], dict[str, int]]:
        """Up to refine_steps refinement passes over the rows of `state`. Before every pass
        a row stops when its latest caption is confident enough (mean token probability >=
        `threshold`) or when the previous pass left it unchanged (adaptive stopping)."""
        passes = [0] * len(captions)
        counters: dict[str, int] = {}
        changed = torch.ones(len(captions), dtype=torch.bool, device=self.device)
        for step in range(self.refine_steps):
            keep = changed
            if threshold is not None:
                keep = keep & (state.confidence < threshold)
            if not bool(keep.any()):
                break
            if not bool(keep.all()):
                state = state.select(keep.nonzero()[:, 0])
            state = self.model.refine_pass(
                state, features, self.instruction_ids, self.generation,
                keep_state=step + 1 < self.refine_steps,
                reuse_cache=reuse,
                cache_room=room(last=step + 1 == self.refine_steps),
                max_draft=self.max_draft,
                zero_refinement=zero_refinement,
                record_after=self.record_after,
            )
            for key, value in (state.draft_stats or {}).items():
                counters[f"draft_{key}"] = counters.get(f"draft_{key}", 0) + value
            texts = self.tokenizer.batch_decode(state.tokens, skip_special_tokens=True)
            rows = state.rows.tolist()
            # Adaptive stop: a frame whose caption this pass left unchanged is done.
            changed = torch.tensor(
                [texts[i].strip() != captions[r].strip() for i, r in enumerate(rows)],
                device=self.device,
            )
            for i, r in enumerate(rows):
                captions[r] = texts[i]
                passes[r] += 1
        return captions, passes, counters


def compile_config(device: torch.device) -> CompileConfig:
    """How decode steps are compiled: CUDA graphs on a GPU (a decode step there is bound by
    kernel launches), inductor's default mode elsewhere (a CPU has no graphs to replay)."""
    config = CompileConfig(fullgraph=False, dynamic=False,
                           mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True  # generate compiles only on accelerators unless told
    return config


def _settings_for(settings: CaptionerSettings, name: str) -> Any:
    if name not in NAMES:
        raise CaptionerError(f"captioner.mmser builds {', '.join(NAMES)}, not {name!r}")
    return settings.simple if name == "simple" else settings.mmser


def build(settings: CaptionerSettings, name: str, **kwargs: Any) -> MMSeRCaptioner:
    """Build `simple` or `mmser`. kwargs override settings: checkpoint, device, dtype."""
    _settings_for(settings, name)
    settings = with_build_options(settings, name, kwargs, ("checkpoint",))
    own = _settings_for(settings, name)
    device, dtype_name = resolve_device_dtype(settings.device, settings.dtype)
    dtype = getattr(torch, dtype_name)
    if own.checkpoint is not None:
        path = Path(own.checkpoint)
        if not (path / "config.json").is_file():
            raise CaptionerError(f"{path}: not a checkpoint directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise CaptionerError(f"{path}: no .safetensors weights in this checkpoint directory")
        model = MMSeRForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa"
        )
        register_auto_classes()  # the Auto loaders below read the checkpoint's config.json
        processor = AutoImageProcessor.from_pretrained(path, backend=image_backend())
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    else:
        # An untrained projector/connector: the identity says so (checkpoint null).
        model, processor, tokenizer = from_components(
            own.vision_model, own.language_model, refine=name == "mmser"
        )
        model = model.to(dtype)
        model.set_attn_implementation("sdpa")
    return MMSeRCaptioner(name, model.to(device), processor, tokenizer, settings)


def parameter_counts(settings: CaptionerSettings, name: str) -> dict[str, int]:
    """Per-component parameters at the real size (CLIP ViT-L/14-336 + OPT-125M), on meta."""
    _settings_for(settings, name)
    with torch.device("meta"):
        model = MMSeRForConditionalGeneration(real_config(refine=name == "mmser"))
    return count_parameters(model)


__all__ = ["MMSeRCaptioner", "build", "from_components", "parameter_counts"]
