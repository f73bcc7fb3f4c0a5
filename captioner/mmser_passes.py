"""MM-SeR's inference passes' pieces: the image features, the state a pass leaves
(`PassState`), KV-cache helpers, and the hook recorders that fill the state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import (
    Cache,
    DynamicCache,
    LogitsProcessor,
    StaticCache,
)

# --- outputs and pass state ---------------------------------------------------------------


@dataclass
class VisionFeatures:
    """The single vision pass over a batch of B images (N patches each, CLS dropped)."""

    image_embeds: torch.Tensor  # (B, N, D) layer -2 projected into the LM's embedding space
    multi_layer: torch.Tensor | None  # (B, L, N, Dv) connector_layers; None without connector


@dataclass
class PassState:
    """What one captioning pass leaves for the next, for the b frames still refining.

    The sequence `embeds` holds everything the LM has seen or written so far (prompt with
    image tokens, every caption and refinement block); `cache` holds keys/values of all
    of it but the last token (None when the next pass must prefill from scratch).
    """

    rows: torch.Tensor  # (b,) index of each row in the original batch
    embeds: torch.Tensor  # (b, P, D) the whole sequence, this pass's caption included
    mask: torch.Tensor  # (b, P) 1 = attend; 0 = padding, EOS and tokens after it
    cache: DynamicCache | None
    image_pos: torch.Tensor  # (b, N) positions of the image tokens in the sequence
    tokens: torch.Tensor  # (b, T) this pass's caption tokens (padding after EOS)
    token_mask: torch.Tensor  # (b, T) 1 on real caption tokens
    confidence: torch.Tensor  # (b,) mean probability of the chosen caption tokens
    cond: torch.Tensor | None  # (b, T, D) final hidden state of the position producing each token
    saliency: torch.Tensor | None  # (b, N) sums to 1 over the image tokens
    draft_stats: dict[str, int] | None = None  # how a verified draft fared (draft_decoding)
    # (b, T, V) the LM's logits at each written token, when the generation config asks for
    # them (output_logits): tests compare them with the training forward's.
    logits: torch.Tensor | None = None
    # The allocation `cache` views (greedy passes that continue one another's cache).
    arena: KVArena | None = None

    def select(self, keep: torch.Tensor) -> PassState:
        """Keep only rows `keep` (b',) for the next pass (adaptive stopping)."""
        if self.arena is not None and self.cache is not None:
            written = cached_length(self.cache)
            self.arena.keep_rows(keep, written)
            cache = self.arena.cache(self.cache.get_max_length(), written)
        else:
            cache = self.cache
            if cache is not None:
                select_cache_rows(cache, keep)
        pick = lambda t: None if t is None else t[keep]  # noqa: E731
        return replace(
            self,
            cache=cache,
            rows=self.rows[keep],
            embeds=self.embeds[keep],
            mask=self.mask[keep],
            image_pos=self.image_pos[keep],
            tokens=self.tokens[keep],
            token_mask=self.token_mask[keep],
            confidence=self.confidence[keep],
            cond=pick(self.cond),
            saliency=pick(self.saliency),
            logits=pick(self.logits),
        )


def new_cache(config, max_len: int | None) -> Cache:
    """A KV cache for one batch: static (preallocated for `max_len` positions) when the
    length is known, else dynamic. Growing a DynamicCache copies every layer's keys and
    values at each decode step; at batch 32 on CPU that made a decode step ~2.3x slower."""
    if max_len is None:
        return DynamicCache(config=config)
    return StaticCache(config=config, max_cache_len=max_len)


class KVArena:
    """The keys and values of every pass over one batch, in one allocation per layer.

    Each pass decodes into a StaticCache whose layers are views of the first `length`
    positions of the arena: attention reads only the positions this pass can write (a
    cache sized for every pass made MM-SeR's coarse pass read all of them, ~1.2x the simple
    model's length at real size), and the next pass continues in place, with no copy.
    Dropping rows for adaptive stopping moves the kept rows' written positions to the
    front; that is the only copy. Written by hand: transformers' caches are either one
    fixed length or grown by copying at every step.
    """

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        heads = config.num_attention_heads
        shape = (batch, heads, max_len, config.hidden_size // heads)
        self.config = config
        self.max_len = max_len
        self.rows = batch
        zeros = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.keys = [zeros() for _ in range(config.num_hidden_layers)]
        self.values = [zeros() for _ in range(config.num_hidden_layers)]

    def cache(self, length: int, written: int = 0) -> StaticCache:
        """A StaticCache of `length` positions over the arena, `written` of them filled."""
        if length > self.max_len:
            raise ValueError(f"a pass needs {length} cache positions, the arena has {self.max_len}")
        cache = StaticCache(config=self.config, max_cache_len=length)
        for layer, keys, values in zip(cache.layers, self.keys, self.values, strict=True):
            # What StaticLayer.lazy_initialization sets, without allocating.
            layer.dtype, layer.device = keys.dtype, keys.device
            layer.batch_size, layer.num_heads = self.rows, keys.shape[1]
            layer.k_head_dim = layer.v_head_dim = keys.shape[-1]
            layer.keys = keys[: self.rows, :, :length]
            layer.values = values[: self.rows, :, :length]
            layer.cumulative_length = torch.tensor(written, device=keys.device)
            layer.is_initialized = True
        return cache

    @torch.inference_mode()  # the arena is made in a pass, as inference tensors
    def keep_rows(self, keep: torch.Tensor, written: int) -> None:
        """Keep rows `keep` (b',): their first `written` positions move to rows 0..b'-1."""
        for tensor in (*self.keys, *self.values):
            kept = tensor[: self.rows, :, :written].index_select(0, keep)
            tensor[: kept.shape[0], :, :written] = kept
        self.rows = int(keep.numel())


def cached_length(cache: Cache) -> int:
    """Positions written to `cache` (a StaticCache's tensors are longer than that)."""
    return int(cache.get_seq_length())


def rewind_cache(cache: Cache, length: int) -> None:
    """Forget every position from `length` on: the next forward writes there again."""
    if isinstance(cache, DynamicCache):
        cache.crop(length)
        return
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.cumulative_length.fill_(length)


def select_cache_rows(cache: Cache, keep: torch.Tensor) -> None:
    """Keep rows `keep` of every layer, in place (StaticCache layers have no
    batch_select_indices of their own)."""
    if isinstance(cache, DynamicCache):
        cache.batch_select_indices(keep)
        return
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)
            layer.batch_size = int(keep.numel())


# --- recorders (hooks and a logits processor) ---------------------------------------------


class _StateRecorder:
    """Forward hooks that keep module outputs at sequence positions >= `start`.

    Calls are counted along the sequence from `offset` (the positions already in the KV
    cache when the first call comes): a prefill covers several positions, each decode step
    one. `outputs()` concatenates the kept parts along the sequence axis: (B, T, D) per
    module, for positions start, start + 1, ...
    """

    def __init__(self, modules: Sequence[nn.Module], start: int, offset: int = 0) -> None:
        self.modules = list(modules)
        self.start = start
        self.seen = [offset] * len(self.modules)
        self.kept: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self.handles: list = []

    def __enter__(self) -> _StateRecorder:
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, i: int):
        def hook(module, args, output):
            first, length = self.seen[i], output.shape[1]
            self.seen[i] += length
            skip = max(0, self.start - first)
            if skip < length:
                self.kept[i].append(output[:, skip:])

        return hook

    def outputs(self) -> list[torch.Tensor]:
        return [torch.cat(k, dim=1) for k in self.kept]


class _ConfidenceRecorder(LogitsProcessor):
    """Records the probability of the greedy choice at every step, (B,) per step."""

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.probs.append(scores.float().softmax(-1).amax(-1))
        return scores


