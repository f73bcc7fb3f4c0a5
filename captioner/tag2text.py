"""The Tag2Text baseline captioner: recognise tags, then write a tag-guided caption.

    frames -> resize to S x S, ImageNet normalisation -> Swin-B image tokens
           -> tagging head -> tags (sigmoid > per-tag threshold, minus deleted tags)
           -> "[ENC] tag | tag | ..." fused with the image (tag encoder)
           -> BERT decoder, prefix "[DEC] a picture of", beam search -> caption

Loads the official `tag2text_swin_14m.pth` (see `tag2text_checkpoint`). Needs the tag list
file and the bert-base-uncased vocabulary; nothing is downloaded when they are local.

    from captioner.settings import CaptionerSettings
    from captioner.base import build_captioner
    captioner = build_captioner(CaptionerSettings(name="tag2text"))
    batch = captioner.caption_batch(frames)  # frames: (N, H, W, 3) uint8
    batch.results[0].caption, batch.results[0].tags
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache, EncoderDecoderCache

from captioner.base import (
    CaptionBatch,
    Captioner,
    CaptionResult,
    check_frames,
    resolve_device_dtype,
    with_build_options,
)
from captioner.baseline_settings import Tag2TextSettings
from captioner.errors import CaptionerError
from captioner.packed_linear import pack_decode_linears, packing_applies
from captioner.settings import CaptionerSettings
from captioner.tag2text_checkpoint import load_into, read_checkpoint, read_tag_list
from captioner.tag2text_model import Tag2TextArch, Tag2TextModel, parameter_breakdown

# torchvision-free copy of the reference transform: Resize((S, S)) (PIL bilinear),
# ToTensor, Normalize with ImageNet statistics.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess(frames: list[np.ndarray], size: int) -> torch.Tensor:
    """(H, W, 3) uint8 frames -> (N, 3, size, size) float32, normalised."""
    out = np.empty((len(frames), 3, size, size), dtype=np.float32)
    for i, frame in enumerate(frames):
        resized = Image.fromarray(frame).resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, dtype=np.float32) / 255.0  # (S, S, 3)
        out[i] = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return torch.from_numpy(out)


def load_tokenizer(source: str) -> Any:
    """bert-base-uncased's WordPiece tokenizer plus [DEC] (bos) and [ENC], as in Tag2Text."""
    from transformers import BertTokenizer

    try:
        tokenizer = BertTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise CaptionerError(
            f"Tag2Text tokenizer {source}: cannot load a BERT vocabulary "
            f"(a directory with vocab.txt, or a hub id): {exc}"
        ) from exc
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class Tag2TextCaptioner(Captioner):
    """Tag2Text behind the captioner interface; `tags` are filled in every result."""

    def __init__(
        self,
        model: Tag2TextModel,
        tokenizer: Any,
        tags: list[str],
        settings: CaptionerSettings,
        name: str = "tag2text",
    ) -> None:
        """`settings`: what the captioner was built from (its identity); the token budget
        and beams are `settings.tag2text`'s overrides of `settings.generation`."""
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.tags = tags
        self.settings = settings
        self.own = own = settings.tag2text
        device, self.dtype = resolve_device_dtype(settings.device, settings.dtype)
        self.device = torch.device(device)
        weight = next(model.parameters())
        if packing_applies(settings.packed_linears, weight.device, weight.dtype):
            pack_decode_linears(model, ("text_decoder",))  # what runs once per decode step
        g = settings.generation.with_overrides(
            max_new_tokens=own.max_new_tokens,
            min_new_tokens=own.min_new_tokens,
            num_beams=own.num_beams,
        )
        self.max_new_tokens = g.max_new_tokens
        self.min_new_tokens = g.min_new_tokens
        self.num_beams = g.num_beams
        self.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")

        num_tags = len(tags)
        bad = [i for i in own.delete_tag_indices if i >= num_tags]
        bad += [int(k) for k in own.class_thresholds if int(k) >= num_tags]
        if bad:
            raise CaptionerError(
                f"tag2text.delete_tag_indices / class_thresholds: tag indices {bad} are beyond "
                f"the tag list's {num_tags} tags"
            )
        thresholds = torch.full((num_tags,), own.threshold)
        for key, value in own.class_thresholds.items():
            thresholds[int(key)] = value
        self.thresholds = thresholds.to(self.device)
        self.keep = torch.ones(num_tags, dtype=torch.bool, device=self.device)
        self.keep[list(own.delete_tag_indices)] = False

        # "[DEC] a picture of" without the trailing [SEP]: the decoder continues from it.
        prompt_ids = tokenizer(own.prompt, return_tensors="pt").input_ids[:, :-1]
        prompt_ids[:, 0] = tokenizer.bos_token_id
        self.prompt_ids = prompt_ids.to(self.device)  # (1, P)
        limit = model.arch.max_positions
        if prompt_ids.shape[1] + self.max_new_tokens > limit:
            raise CaptionerError(
                f"tag2text: prompt ({prompt_ids.shape[1]} tokens) + max_new_tokens "
                f"({self.max_new_tokens}) exceeds the decoder's {limit} positions"
            )

    # --- the three stages ------------------------------------------------------------------

    def recognise(self, image: torch.Tensor) -> list[list[str]]:
        """Image tokens (B, 1 + L, Cv) -> each frame's tags, in tag-list order."""
        probs = torch.sigmoid(self.model.tag_logits(image).float())  # (B, T)
        chosen = (probs > self.thresholds) & self.keep
        return [[self.tags[i] for i in row.nonzero().flatten().tolist()] for row in chosen]

    def describe(self, image: torch.Tensor, tags: list[list[str]]) -> list[str]:
        """Image tokens (B, 1 + L, Cv) + tags -> captions, beam search on the BERT decoder."""
        B = image.shape[0]
        enc = self.tokenizer(
            [" | ".join(t) for t in tags],
            padding="max_length",
            truncation=True,
            max_length=self.own.max_tag_tokens,
            return_tensors="pt",
        ).to(self.device)
        tag_ids = enc.input_ids.clone()
        tag_ids[:, 0] = self.enc_token_id  # [CLS] -> [ENC]
        states = self.model.encode_tags(tag_ids, enc.attention_mask, image)  # (B, N, D)
        prompt = self.prompt_ids.expand(B, -1)
        # A decoder with cross-attention needs a self- plus cross-attention cache;
        # generate() would make a plain one for this decoder-only model.
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = self.model.text_decoder.generate(
            input_ids=prompt,
            past_key_values=cache,
            attention_mask=torch.ones_like(prompt),
            # The reference attends to every tag position, padding included: no mask here.
            encoder_hidden_states=states,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
            repetition_penalty=self.own.repetition_penalty,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = out[:, prompt.shape[1]:]
        return [c.strip() for c in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def caption_batch(self, frames: Sequence[np.ndarray] | np.ndarray) -> CaptionBatch:
        frames = check_frames(frames)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        pixels = preprocess(frames, self.model.arch.image_size)
        pixels = pixels.to(self.device, dtype=getattr(torch, self.dtype))
        timings["preprocess"] = time.perf_counter() - start
        with torch.inference_mode():
            start = time.perf_counter()
            image = self.model.encode_image(pixels)
            timings["vision"] = time.perf_counter() - start
            start = time.perf_counter()
            tags = self.recognise(image)
            timings["tagging"] = time.perf_counter() - start
            start = time.perf_counter()
            captions = self.describe(image, tags)
            timings["caption"] = time.perf_counter() - start
        results = [
            CaptionResult(caption=c, tags=tuple(t)) for c, t in zip(captions, tags, strict=True)
        ]
        return CaptionBatch(results=results, timings=timings)


# --- registry entry points ------------------------------------------------------------------


def make_arch(settings: Tag2TextSettings, num_tags: int) -> Tag2TextArch:
    """The real architecture with `settings.architecture` overrides applied."""
    known = {f.name for f in dataclasses.fields(Tag2TextArch)}
    unknown = sorted(set(settings.architecture) - known)
    if unknown:
        raise CaptionerError(
            f"tag2text.architecture: unknown keys {unknown}; allowed: {', '.join(sorted(known))}"
        )
    values = {"image_size": settings.image_size, **settings.architecture, "num_tags": num_tags}
    arch = Tag2TextArch(**values)
    try:
        arch.validate()
    except ValueError as exc:
        raise CaptionerError(f"tag2text.architecture: {exc}") from exc
    return arch


def build(settings: CaptionerSettings, name: str = "tag2text", **kwargs: Any) -> Tag2TextCaptioner:
    """Build Tag2Text from `settings.tag2text`; kwargs may override `checkpoint`, `device`,
    `dtype`, `tag_list` and `tokenizer`."""
    settings = with_build_options(settings, name, kwargs, ("checkpoint", "tag_list", "tokenizer"))
    s = settings.tag2text
    try:
        s.validate()
    except ValueError as exc:
        raise CaptionerError(str(exc)) from exc
    device, dtype = resolve_device_dtype(settings.device, settings.dtype)
    checkpoint = Path(s.checkpoint)
    tags = read_tag_list(s.tag_list_path())
    tokenizer = load_tokenizer(s.tokenizer)
    arch = make_arch(s, len(tags))
    if len(tokenizer) != arch.vocab_size:
        raise CaptionerError(
            f"Tag2Text tokenizer {s.tokenizer}: {len(tokenizer)} tokens with [DEC] and [ENC], "
            f"but the architecture's vocabulary has {arch.vocab_size}"
        )
    official = read_checkpoint(checkpoint)
    model = Tag2TextModel(arch)
    load_into(model, official, str(checkpoint))
    del official
    model.to(device=device, dtype=getattr(torch, dtype)).eval()
    return Tag2TextCaptioner(model, tokenizer, tags, settings, name)


def parameter_counts(settings: CaptionerSettings, name: str = "tag2text") -> dict[str, int]:
    """Per-component parameters of the official Tag2Text (Swin-B 384, 3429 tags), built on
    the meta device; weights shared by the tagging head and tag encoder are counted once."""
    with torch.device("meta"):
        model = Tag2TextModel(Tag2TextArch())
    return parameter_breakdown(model)
