"""MM-SeR: LLaVA-1.5 with OPT-125M, plus self-refinement through a SeR-Connector.

Reads top to bottom: pass state, hook recorders, the SeR-Connector, the model (vision,
saliency, inference passes, training forwards).

The simple model is transformers' LLaVA with an OPT text model (the subclass only fixes
where OPT keeps its tied embeddings). Self-refinement is OUR RECONSTRUCTION of the paper
(Song et al., arXiv 2508.21451, no code released):

1. `encode_images`: the vision tower runs once per image; layer -2 (without CLS) is
   projected into the LM (LLaVA-1.5), and the `connector_layers` patch features are kept.
2. `caption_pass`: the LM writes the coarse caption. Forward hooks keep, for every caption
   token, the query of the saliency layers and the final hidden state AT THAT TOKEN (the
   state that has read it; the last token is fed once more after decoding so the state
   that has read the whole caption is there too). The saliency map is the LM's own
   attention from those queries to the image tokens, recomputed from the keys (exact for
   OPT, whose positions are absolute), averaged over layers, heads and caption tokens.
3. `refine_pass`: the SeR-Connector turns (multi-layer features, saliency, coarse-caption
   hidden states) into K refinement tokens; the LM continues the SAME sequence
   [image][prompt][coarse caption][K refinement tokens][refine instruction] from the KV
   cache of the first pass, so the extra cost is a prefill of K + I tokens and the
   refined caption's decode. Iterating appends further passes to the same sequence.
4. Training (`caption_forward`, `refinement_forward`, dispatched from `forward`) builds the
   same sequence teacher-forced, without handing a KV cache between calls (gradient
   checkpointing would drop it): captioner/sequence.py is the one layout of both.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    Cache,
    DynamicCache,
    GenerationConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    StaticCache,
)
from transformers import initialization as hf_init
from transformers.utils import ModelOutput

from captioner.configuration_mmser import MMSeRConfig
from captioner.draft_decoding import draft_greedy, draft_lengths
from captioner.errors import CaptionerError
from captioner.sequence import caption_mask, label_mask

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

    def select(self, keep: torch.Tensor) -> PassState:
        """Keep only rows `keep` (b',) for the next pass (adaptive stopping)."""
        if self.cache is not None:
            select_cache_rows(self.cache, keep)
        pick = lambda t: None if t is None else t[keep]  # noqa: E731
        return replace(
            self,
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


def cached_length(cache: Cache) -> int:
    """Positions written to `cache` (a StaticCache's tensors are longer than that)."""
    return int(cache.get_seq_length())


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


# --- the SeR-Connector --------------------------------------------------------------------


class _Attention(nn.Module):
    """Multi-head attention of queries x over a context (SDPA), with an optional mask/bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, Q, C), ctx (B, S, C), mask (B, 1 or H, 1, S) bool or additive -> (B, Q, C)."""
        B, Q, C = x.shape
        S, H = ctx.shape[1], self.heads
        q = self.q_proj(x).view(B, Q, H, C // H).transpose(1, 2)  # (B, H, Q, C/H)
        k = self.k_proj(ctx).view(B, S, H, C // H).transpose(1, 2)  # (B, H, S, C/H)
        v = self.v_proj(ctx).view(B, S, H, C // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Q, C/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, Q, C))


class SeRBlock(nn.Module):
    """Queries attend to each other, to the coarse caption, then to the weighted patches."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, heads)
        self.norm_text = nn.LayerNorm(dim)
        self.text_attn = _Attention(dim, heads)
        self.norm_vision = nn.LayerNorm(dim)
        self.vision_attn = _Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        # How strongly saliency steers each head's look at the patches: learned, starting
        # at 1 (the full log-saliency bias); a head can learn to ignore the map (0) or
        # sharpen it (> 1).
        self.saliency_scale = nn.Parameter(torch.ones(heads))

    def forward(
        self,
        q: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        vision: torch.Tensor,
        log_saliency: torch.Tensor,
    ) -> torch.Tensor:
        """q (B, K, C); text (B, T, C) with mask (B, 1, 1, T); vision (B, N, C) with the
        log-saliency bias (B, N) -> (B, K, C)."""
        h = self.norm_self(q)
        q = q + self.self_attn(h, h)
        q = q + self.text_attn(self.norm_text(q), text, text_mask)
        bias = self.saliency_scale[None, :, None, None] * log_saliency[:, None, None, :]
        q = q + self.vision_attn(self.norm_vision(q), vision, bias.to(q.dtype))  # (B, H, 1, N)
        return q + self.mlp(self.norm_mlp(q))


class SeRConnector(nn.Module):
    """Our reconstruction of the SeR-Connector: caption-guided, saliency-weighted
    cross-attention over multi-layer CLIP features, writing K refinement tokens.

    Patches are fused across layers per patch (LayerNorm + Linear over the concatenated
    layers). Saliency enters as an additive log(N * s) bias on the vision cross-attention
    logits, scaled per block and head by a learned `saliency_scale`: a uniform map changes
    nothing, salient patches are up-weighted as much as training finds useful.
    """

    def __init__(self, config: MMSeRConfig) -> None:
        super().__init__()
        layers = len(config.connector_layers)
        d_vision = config.vision_config.hidden_size
        d_text = config.text_config.hidden_size
        dim = config.connector_hidden_size
        fused = layers * d_vision
        self.fuse = nn.Sequential(nn.LayerNorm(fused), nn.Linear(fused, dim))
        self.text_in = nn.Sequential(nn.LayerNorm(d_text), nn.Linear(d_text, dim))
        self.queries = nn.Parameter(torch.zeros(config.num_refine_tokens, dim))
        self.blocks = nn.ModuleList(
            SeRBlock(dim, config.connector_num_heads, config.connector_mlp_ratio)
            for _ in range(config.connector_num_layers)
        )
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, d_text))

    def forward(
        self,
        multi_layer: torch.Tensor,
        saliency: torch.Tensor,
        caption: torch.Tensor,
        caption_mask: torch.Tensor,
    ) -> torch.Tensor:
        """multi_layer (B, L, N, Dv), saliency (B, N), caption hidden states (B, T, D) with
        mask (B, T) -> refinement tokens (B, K, D) in the LM's embedding space."""
        B, L, N, Dv = multi_layer.shape
        dtype = self.queries.dtype
        patches = multi_layer.to(dtype).permute(0, 2, 1, 3).reshape(B, N, L * Dv)  # (B, N, L*Dv)
        vision = self.fuse(patches)  # (B, N, C)
        log_saliency = torch.log(saliency.float().clamp_min(1e-6) * N)  # (B, N)
        text = self.text_in(caption.to(dtype))  # (B, T, C)
        # A row with an empty caption attends to all positions rather than to none (NaN).
        seen = caption_mask.bool() | (caption_mask.sum(1, keepdim=True) == 0)
        text_mask = seen[:, None, None, :]  # (B, 1, 1, T)
        q = self.queries.unsqueeze(0).expand(B, -1, -1)  # (B, K, C)
        for block in self.blocks:
            q = block(q, text, text_mask, vision, log_saliency)
        return self.out(q)


# --- training outputs ---------------------------------------------------------------------


@dataclass
class MMSeRTrainingOutput(ModelOutput):
    """What a training forward returns. `loss` is what the optimiser minimises: the caption
    loss, plus (refine stage) the refinement loss and `caption_weight` x the caption loss."""

    loss: torch.Tensor | None = None
    caption_loss: torch.Tensor | None = None  # teacher-forced caption cross-entropy
    refine_loss: torch.Tensor | None = None  # cross-entropy of the refined caption
    caption_logits: torch.Tensor | None = None  # (B, T, V) at the caption's label positions
    refine_logits: torch.Tensor | None = None  # (B, Tt, V) at the refined caption's


def _token_loss(
    logits: torch.Tensor, targets: torch.Tensor, eos_token_id: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over each caption's tokens and its EOS (padding after EOS ignored).
    logits (B, T, V) at the positions predicting targets (B, T); `rows` (B,) bool keeps
    only some rows (None: all)."""
    keep = label_mask(targets, eos_token_id).bool()
    if rows is not None:
        keep = keep & rows.bool()[:, None]
    labels = targets.masked_fill(~keep, -100)
    if not bool(keep.any()):  # no row counts: a zero that still has a gradient
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


# --- the model ----------------------------------------------------------------------------


class MMSeRForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-1.5 + OPT (the simple model) with an optional SeR-Connector (MM-SeR)."""

    config_class = MMSeRConfig
    config: MMSeRConfig
    # OPT keeps its embeddings at decoder.embed_tokens (LLaVA's default key is Llama's).
    _tied_weights_keys = {"lm_head.weight": "model.language_model.decoder.embed_tokens.weight"}

    def __init__(self, config: MMSeRConfig) -> None:
        super().__init__(config)
        self.ser_connector = SeRConnector(config) if config.refine else None
        self.post_init()

    def save_pretrained(self, *args: Any, save_original_format: bool = False, **kwargs: Any):
        """Saved under the model's own parameter names, not reverted to llava-hf's layout
        (transformers 5 renames LLaVA keys on save by default): the Trainer reloads its
        checkpoints (resume, best model) with a plain load_state_dict that skips the
        renaming (transformers#43701), which silently left the weights of a resumed run
        unloaded. from_pretrained reads both layouts."""
        return super().save_pretrained(*args, save_original_format=save_original_format, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SeRConnector):
            hf_init.normal_(module.queries, mean=0.0, std=0.02)
        if isinstance(module, SeRBlock):
            hf_init.ones_(module.saliency_scale)

    # -- vision: one pass per image --------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> VisionFeatures:
        """pixel_values (B, 3, H, W) -> VisionFeatures; the vision tower runs once."""
        cfg = self.config
        out = self.model.vision_tower(pixel_values, output_hidden_states=True)
        hidden = out.hidden_states  # num_layers + 1 tensors of (B, 1 + N, Dv)
        image_embeds = self.model.multi_modal_projector(hidden[cfg.vision_feature_layer][:, 1:])
        multi = None
        if self.ser_connector is not None:
            multi = torch.stack([hidden[i][:, 1:] for i in cfg.connector_layers], dim=1)
        return VisionFeatures(image_embeds=image_embeds, multi_layer=multi)

    def embed_prompt(
        self, input_ids: torch.Tensor, features: VisionFeatures
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, S) with N image placeholders per row -> embeds (B, S, D) with the
        image features scattered in, and the image token positions (B, N)."""
        B, N = features.image_embeds.shape[:2]
        is_image = input_ids == self.config.image_token_index  # (B, S)
        counts = is_image.sum(1)
        if bool((counts != N).any()):
            raise CaptionerError(
                f"image placeholder count per prompt {counts.tolist()} does not match the "
                f"{N} image features per image"
            )
        embeds = self.get_input_embeddings()(input_ids)
        embeds = embeds.masked_scatter(is_image[..., None], features.image_embeds.to(embeds.dtype))
        image_pos = is_image.nonzero()[:, 1].view(B, N)
        return embeds, image_pos

    # -- saliency --------------------------------------------------------------------------

    def attention_saliency(
        self,
        queries: list[torch.Tensor],
        keys: list[torch.Tensor],
        mask: torch.Tensor,
        query_start: int,
        image_pos: torch.Tensor,
        token_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The LM's attention from the caption tokens to the image tokens.

        queries: per saliency layer (B, T, D), q_proj outputs at sequence positions
        query_start .. query_start + T - 1 (the caption tokens); keys: the same layers'
        keys (B, H, >=Pc, D/H) over positions 0..Pc-1, Pc = query_start + T (a KV cache's,
        or k_proj outputs reshaped); mask (B, >=Pc); image_pos (B, N); token_mask (B, T)
        -> saliency (B, N), averaged over layers, heads and real caption tokens,
        normalised to sum 1 (uniform where a row has no caption tokens).
        """
        text = self.config.text_config
        H = text.num_attention_heads
        B, T, D = queries[0].shape
        N = image_pos.shape[1]
        scale = (D // H) ** -0.5
        Pc = query_start + T
        key_pos = torch.arange(Pc, device=mask.device)
        query_pos = query_start + torch.arange(T, device=mask.device)
        allowed = mask[:, None, None, :Pc].bool() & (key_pos[None, :] <= query_pos[:, None])
        # A query always sees itself, even where the mask has a hole (EOS, padding): its
        # row then stays finite; such rows carry no weight below.
        allowed = allowed | (key_pos[None, :] == query_pos[:, None])
        gather_idx = image_pos[:, None, None, :].expand(B, H, T, N)
        saliency = torch.zeros(B, T, N, device=mask.device)
        for q, k in zip(queries, keys, strict=True):
            k = k[:, :, :Pc].float()  # (B, H, Pc, D/H)
            q = q.float().view(B, T, H, D // H).transpose(1, 2) * scale  # (B, H, T, D/H)
            scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
            probs = scores.softmax(-1)  # (B, H, T, Pc)
            saliency += probs.gather(-1, gather_idx).mean(1)  # (B, T, N)
        weight = token_mask.float()[..., None]  # (B, T, 1)
        saliency = (saliency * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # (B, N)
        total = saliency.sum(-1, keepdim=True)
        uniform = torch.full_like(saliency, 1.0 / N)
        return torch.where(total > 0, saliency / total.clamp_min(1e-12), uniform)

    def _saliency_modules(self) -> list[nn.Module]:
        decoder = self.model.language_model.decoder
        return [decoder.layers[i].self_attn.q_proj for i in self.config.saliency_layers]

    def _key_modules(self) -> list[nn.Module]:
        decoder = self.model.language_model.decoder
        return [decoder.layers[i].self_attn.k_proj for i in self.config.saliency_layers]

    def _recorded_modules(self) -> list[nn.Module]:
        """Saliency-layer queries, then the final hidden state (the caption conditioning)."""
        return [*self._saliency_modules(), self.model.language_model.decoder.final_layer_norm]

    def _cache_keys(self, cache: Cache) -> list[torch.Tensor]:
        return [cache.layers[i].keys for i in self.config.saliency_layers]

    def _recorded_keys(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """k_proj outputs (B, L, D) -> keys as a KV cache holds them (B, H, L, D/H)."""
        H = self.config.text_config.num_attention_heads
        return [k.view(k.shape[0], k.shape[1], H, -1).transpose(1, 2) for k in outputs]

    def _finish_state(
        self, state: PassState, recorded: list[torch.Tensor], keys: list[torch.Tensor],
        start: int,
    ) -> PassState:
        """Attach the caption conditioning and the saliency map to `state` from the recorded
        caption-token outputs (queries per saliency layer, then final hidden states)."""
        T = state.tokens.shape[1]
        state.cond = recorded[-1][:, :T]
        state.saliency = self.attention_saliency(
            [q[:, :T] for q in recorded[:-1]], keys, state.mask, start, state.image_pos,
            state.token_mask,
        )
        return state

    # -- passes ----------------------------------------------------------------------------

    def _plain_greedy(self, generation: GenerationConfig) -> bool:
        """Whether `generate` would decode with no logits processor beyond the min-length EOS
        ban, i.e. what draft_greedy implements. Options left unset are filled from the
        checkpoint's generation_config.json, as `generate` does."""
        merged = copy.deepcopy(generation)
        merged.update(defaults_only=True, **self.generation_config.to_dict())
        processors = (
            "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
            "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "min_length",
            "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
        )  # fmt: skip
        return (
            not merged.do_sample
            and merged.eos_token_id is not None
            and merged.repetition_penalty in (None, 1.0)
            and not any(getattr(merged, name, None) for name in processors)
        )

    def teacher_forced_state(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        image_pos: torch.Tensor,
        tokens: torch.Tensor,
        eos_token_id: int,
        rows: torch.Tensor | None = None,
    ) -> PassState:
        """The state a pass would leave had it written `tokens` (B, T) after `embeds`
        (B, P, D): one forward over the whole sequence into a new DynamicCache, recording at
        the caption tokens. Used after beam search (which reorders its cache) and to refine
        a given caption (a perturbed one in training data or benchmarks)."""
        P = embeds.shape[1]
        token_mask = caption_mask(tokens, eos_token_id)
        full = torch.cat([embeds, self.get_input_embeddings()(tokens)], dim=1)
        full_mask = torch.cat([mask, token_mask.to(mask.dtype)], dim=1)
        cache = DynamicCache(config=self.config.text_config)
        record = self.ser_connector is not None
        with _StateRecorder(self._recorded_modules() if record else [], start=P) as recorder:
            self.model.language_model(
                inputs_embeds=full, attention_mask=full_mask, past_key_values=cache,
                use_cache=True,
            )
        rows = torch.arange(embeds.shape[0], device=embeds.device) if rows is None else rows
        state = PassState(
            rows=rows, embeds=full, mask=full_mask, cache=cache, image_pos=image_pos,
            tokens=tokens, token_mask=token_mask,
            confidence=torch.ones(tokens.shape[0], device=tokens.device),
            cond=None, saliency=None,
        )
        if not record:
            return state
        return self._finish_state(state, recorder.outputs(), self._cache_keys(cache), P)

    def _run_pass(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        cache: Cache | None,
        image_pos: torch.Tensor,
        rows: torch.Tensor,
        generation: GenerationConfig,
        keep_state: bool,
        cache_room: int | None = None,
        draft: torch.Tensor | None = None,
        max_draft: int = 0,
    ) -> PassState:
        """Generate one caption per row continuing `embeds` (B, P, D) and, when
        `keep_state`, everything the next refinement pass needs. A new cache is static
        with `cache_room` positions after `embeds` (None: dynamic). With a `draft` (B, Td)
        caption and `max_draft` > 0, greedy decoding verifies up to that many draft tokens
        per LM call (draft_decoding.py) when nothing needs recording for a later pass."""
        P = embeds.shape[1]
        greedy = generation.num_beams == 1
        generation = copy.deepcopy(generation)
        # No auto-compile (generate turns it on for a static cache on CUDA): CUDA graphs
        # would overwrite the hook outputs that _StateRecorder keeps between steps.
        generation.disable_compile = True
        generation.return_dict_in_generate = True
        generation.output_scores = not greedy  # beams: sequences_scores for the confidence
        record = keep_state and self.ser_connector is not None
        confidence = _ConfidenceRecorder()
        draft_stats = None
        if greedy and cache is None:
            cache_len = None if cache_room is None else P + cache_room
            cache = new_cache(self.config.text_config, cache_len)
        draftable = draft is not None and max_draft > 0 and draft.shape[1] > 0
        if greedy and draftable and not record and self._plain_greedy(generation):
            tokens, probs, stats = draft_greedy(
                self, embeds, mask, cache, draft, draft_lengths(draft, generation.eos_token_id),
                max_new_tokens=generation.max_new_tokens,
                min_new_tokens=generation.min_new_tokens or 0,
                eos_token_id=generation.eos_token_id,
                pad_token_id=generation.pad_token_id,
                max_draft=max_draft,
            )
            draft_stats = dataclasses.asdict(stats)
            logits = None
        elif greedy:
            modules = self._recorded_modules() if record else []
            recorder = _StateRecorder(modules, start=P, offset=cached_length(cache))
            with recorder:
                out = self.generate(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    past_key_values=cache,
                    generation_config=generation,
                    logits_processor=[confidence],
                )
            tokens = out.sequences  # (B, T) new tokens only
            probs = torch.stack(confidence.probs, 1)  # (B, T)
            logits = torch.stack(out.logits, 1) if generation.output_logits else None
        else:
            out = self.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                generation_config=generation,
            )
            tokens = out.sequences
            probs = out.sequences_scores.float().exp()[:, None].expand(tokens.shape)
            logits = None
        eos = generation.eos_token_id
        token_mask = caption_mask(tokens, eos)
        confidence_mean = (probs * token_mask).sum(1) / token_mask.sum(1).clamp_min(1)
        if not greedy and record:
            # Beam search reorders its cache; rebuild the state with one teacher-forced pass.
            state = self.teacher_forced_state(embeds, mask, image_pos, tokens, eos, rows)
            state.confidence = confidence_mean
            return state
        embeds = torch.cat([embeds, self.get_input_embeddings()(tokens)], dim=1)
        mask = torch.cat([mask, token_mask.to(mask.dtype)], dim=1)
        state = PassState(
            rows=rows, embeds=embeds, mask=mask,
            # A verified draft leaves masked holes in the cache that `mask` does not describe.
            cache=cache if greedy and draft_stats is None else None,
            image_pos=image_pos, tokens=tokens, token_mask=token_mask,
            confidence=confidence_mean, cond=None, saliency=None, draft_stats=draft_stats,
            logits=logits,
        )
        if not record:
            return state
        # generate never feeds its last token back; one more step does, so the state that
        # has read the whole caption is recorded and the cache holds the whole sequence.
        with recorder:
            self.model.language_model(
                inputs_embeds=embeds[:, -1:], attention_mask=mask, past_key_values=cache,
                use_cache=True,
            )
        return self._finish_state(state, recorder.outputs(), self._cache_keys(cache), P)

    @torch.inference_mode()
    def caption_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: VisionFeatures,
        generation: GenerationConfig,
        keep_state: bool,
        cache_room: int | None = None,
    ) -> PassState:
        """The coarse (or only) caption: input_ids/attention_mask (B, S), left-padded, with
        image placeholders -> PassState with tokens (B, T). `cache_room`: positions after
        the prompt that this and later passes will write (see `cache_room`); None keeps a
        dynamic cache."""
        embeds, image_pos = self.embed_prompt(input_ids, features)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self._run_pass(
            embeds, attention_mask, None, image_pos, rows, generation, keep_state, cache_room
        )

    @torch.inference_mode()
    def given_caption_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: VisionFeatures,
        tokens: torch.Tensor,
        eos_token_id: int,
    ) -> PassState:
        """A first pass that "wrote" the given captions (B, T) (EOS-terminated blocks from
        `sequence.encode_captions`): what a refinement of a given caption starts from."""
        embeds, image_pos = self.embed_prompt(input_ids, features)
        state = self.teacher_forced_state(embeds, attention_mask, image_pos, tokens, eos_token_id)
        # A dynamic cache in which a refinement continues; the caption's own probability is
        # not known for a caption the model did not write.
        return state

    def cache_room(
        self, max_new_tokens: int, refine_passes: int, instruction_len: int, draft_slack: int = 0
    ) -> int:
        """Cache slots one caption pass plus `refine_passes` refinement passes append to the
        sequence: T, then K + I + T per refinement pass, plus `draft_slack` slots that a
        verified draft may spend on rejected tokens (more slack, longer drafts late on)."""
        per_refine = self.config.num_refine_tokens + instruction_len + max_new_tokens
        return max_new_tokens + refine_passes * per_refine + draft_slack

    def refinement_tokens(
        self, state: PassState, features: VisionFeatures, zero: bool = False
    ) -> torch.Tensor:
        """The SeR-Connector's K refinement tokens for the rows of `state`: (b, K, D).
        `zero` replaces them by zeros (a control: what refinement does without them)."""
        if self.ser_connector is None:
            raise CaptionerError("this checkpoint has no SeR-Connector (config.refine is false)")
        multi = features.multi_layer[state.rows]
        refine = self.ser_connector(multi, state.saliency, state.cond, state.token_mask)
        return torch.zeros_like(refine) if zero else refine

    @torch.inference_mode()
    def refine_pass(
        self,
        state: PassState,
        features: VisionFeatures,
        instruction_ids: torch.Tensor,
        generation: GenerationConfig,
        keep_state: bool,
        reuse_cache: bool = True,
        cache_room: int | None = None,
        max_draft: int = 0,
        zero_refinement: bool = False,
    ) -> PassState:
        """One refinement pass: the sequence so far + [K refinement tokens] + instruction
        (I,) ids -> PassState with the refined tokens (b, T). With `reuse_cache` the LM only
        prefills the new K + I positions; otherwise a new cache is made, static with
        `cache_room` positions after this pass's prompt (None: dynamic). `max_draft` > 0
        verifies the previous caption as a draft, up to that many tokens per LM call (the
        last pass only: see `_run_pass`). `zero_refinement`: a control, see
        `refinement_tokens`."""
        refine = self.refinement_tokens(state, features, zero=zero_refinement)  # (b, K, D)
        b = refine.shape[0]
        instruction = self.get_input_embeddings()(instruction_ids)[None].expand(b, -1, -1)
        embeds = torch.cat([state.embeds, refine.to(state.embeds.dtype), instruction], dim=1)
        new = torch.ones(b, refine.shape[1] + instruction.shape[1], dtype=state.mask.dtype,
                         device=state.mask.device)
        mask = torch.cat([state.mask, new], dim=1)
        cache = state.cache if reuse_cache else None
        return self._run_pass(
            embeds, mask, cache, state.image_pos, state.rows, generation, keep_state, cache_room,
            draft=state.tokens, max_draft=max_draft,
        )

    # -- training --------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """LLaVA's forward (what `generate` calls), or, given `caption_ids` and/or
        `coarse_ids`, a training forward (`training_forward`): the Trainer, and DDP around
        it, reach the training code through forward, so gradients synchronise."""
        if kwargs.get("caption_ids") is None and kwargs.get("coarse_ids") is None:
            return super().forward(*args, **kwargs)
        return self.training_forward(**kwargs)

    # generate() reads forward's signature (attention_mask, position_ids, logits_to_keep):
    # it must stay LLaVA's; the training inputs arrive through its **kwargs.
    forward.__signature__ = inspect.signature(LlavaForConditionalGeneration.forward)

    def _lm_hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced final hidden states (B, L, D) of the whole sequence, no cache."""
        return self.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, use_cache=False
        ).last_hidden_state

    def caption_forward(
        self, prompt_embeds: torch.Tensor, caption_ids: torch.Tensor, eos_token_id: int
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for captions (B, T) (EOS-terminated blocks)
        written after the prompt embeddings (B, P, D): the simple model's training forward
        (LLaVA-1.5's loss), the same sequence `caption_pass` writes into."""
        B, P = prompt_embeds.shape[:2]
        ones = torch.ones(B, P, dtype=torch.long, device=prompt_embeds.device)
        embeds = torch.cat([prompt_embeds, self.get_input_embeddings()(caption_ids)], dim=1)
        mask = torch.cat([ones, label_mask(caption_ids, eos_token_id)], dim=1)
        hidden = self._lm_hidden(embeds, mask)
        T = caption_ids.shape[1]
        return self.lm_head(hidden[:, P - 1 : P - 1 + T])  # position P-1+t predicts token t

    def refinement_forward(
        self,
        features: VisionFeatures,
        prompt_embeds: torch.Tensor,
        image_pos: torch.Tensor,
        coarse_ids: torch.Tensor,
        target_ids: torch.Tensor,
        instruction_ids: torch.Tensor,
        eos_token_id: int,
        zero_refinement: bool = False,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, Tt, V) of writing `target_ids` (B, Tt) after the coarse
        caption `coarse_ids` (B, T) (both EOS-terminated blocks) and the refinement tokens:
        the paper's localized-correction objective on the sequence `refine_pass` continues.

        Two forwards, no KV cache between them: the first reads [prompt][coarse] for the
        caption conditioning and the saliency map (no gradient: the connector learns from
        the LM's states as they are, as at inference); the second reads the whole sequence
        [prompt][coarse][K refinement][instruction][target] and gives the logits.
        """
        B, P = prompt_embeds.shape[:2]
        T, Tt = coarse_ids.shape[1], target_ids.shape[1]
        embed = self.get_input_embeddings()
        device = prompt_embeds.device
        prompt_mask = torch.ones(B, P, dtype=torch.long, device=device)
        coarse_mask = caption_mask(coarse_ids, eos_token_id)
        seq = torch.cat([prompt_embeds, embed(coarse_ids)], dim=1)
        seq_mask = torch.cat([prompt_mask, coarse_mask], dim=1)
        lm = self.model.language_model
        was_training = lm.training
        with torch.no_grad():
            lm.eval()  # as at inference: no dropout in what the connector reads
            keys = _StateRecorder(self._key_modules(), start=0)
            try:
                with _StateRecorder(self._recorded_modules(), start=P) as recorder, keys:
                    self._lm_hidden(seq.detach(), seq_mask)
            finally:
                lm.train(was_training)
            recorded = recorder.outputs()
            saliency = self.attention_saliency(
                recorded[:-1], self._recorded_keys(keys.outputs()), seq_mask, P, image_pos,
                coarse_mask,
            )
        refine = self.ser_connector(features.multi_layer, saliency, recorded[-1], coarse_mask)
        if zero_refinement:
            refine = torch.zeros_like(refine)
        K, instruction = refine.shape[1], embed(instruction_ids)[None].expand(B, -1, -1)
        I = instruction.shape[1]  # noqa: E741
        full = torch.cat([seq, refine.to(seq.dtype), instruction, embed(target_ids)], dim=1)
        full_mask = torch.cat([
            seq_mask, torch.ones(B, K + I, dtype=torch.long, device=device),
            label_mask(target_ids, eos_token_id),
        ], dim=1)  # fmt: skip
        hidden = self._lm_hidden(full, full_mask)
        start = P + T + K + I - 1  # the position predicting target token 0
        return self.lm_head(hidden[:, start : start + Tt])

    def training_forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
        coarse_ids: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        caption_weight: float = 1.0,
        caption_rows: torch.Tensor | None = None,
        return_logits: bool = False,
        **unused,
    ) -> MMSeRTrainingOutput:
        """One training step's loss for a batch of B images.

        pixel_values (B, 3, H, W); input_ids (B, S) the prompt with image placeholders;
        caption_ids (B, T) EOS-terminated ground-truth captions (the caption loss: stages
        align and caption, and the refine stage's guard against the coarse pass drifting);
        coarse_ids (B, Tc) / target_ids (B, Tt) / instruction_ids (I,) or (B, I): the
        refinement pairs (refine stage); caption_rows (B,) bool: the rows the caption loss
        is taken on (an image whose objects were erased by augmentation has a caption it no
        longer shows). EOS is `config.text_config.eos_token_id`.
        """
        eos = self.config.text_config.eos_token_id
        if eos is None:
            raise CaptionerError("config.text_config.eos_token_id is not set: no caption could end")
        features = self.encode_images(pixel_values)
        prompt_embeds, image_pos = self.embed_prompt(input_ids, features)
        out = MMSeRTrainingOutput()
        total = None
        if caption_ids is not None:
            logits = self.caption_forward(prompt_embeds, caption_ids, eos)
            out.caption_loss = _token_loss(logits, caption_ids, eos, caption_rows)
            out.caption_logits = logits if return_logits else None
            total = caption_weight * out.caption_loss
        if coarse_ids is not None:
            if self.ser_connector is None:
                raise CaptionerError("refinement pairs need a SeR-Connector (config.refine)")
            if target_ids is None or instruction_ids is None:
                raise CaptionerError("coarse_ids need target_ids and instruction_ids")
            if instruction_ids.dim() == 2:  # collated per row; every row holds the same ids
                instruction_ids = instruction_ids[0]
            logits = self.refinement_forward(
                features, prompt_embeds, image_pos, coarse_ids, target_ids, instruction_ids, eos
            )
            out.refine_loss = _token_loss(logits, target_ids, eos)
            out.refine_logits = logits if return_logits else None
            total = out.refine_loss if total is None else total + out.refine_loss
        out.loss = total
        return out


def count_parameters(model: MMSeRForConditionalGeneration) -> dict[str, int]:
    """Parameters per component (tied LM head counted once, inside the language model)."""
    count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())  # noqa: E731
    counts = {
        "vision_tower": count(model.model.vision_tower),
        "projector": count(model.model.multi_modal_projector),
        "language_model": count(model.model.language_model),
        "ser_connector": count(model.ser_connector),
    }
    total = sum(p.numel() for p in model.parameters())  # dedups tied weights
    untied = total - sum(counts.values())
    if untied:  # an untied LM head belongs to the language model
        counts["language_model"] += untied
    counts["total"] = total
    return counts


AutoConfig.register("mmser", MMSeRConfig, exist_ok=True)
AutoModelForImageTextToText.register(MMSeRConfig, MMSeRForConditionalGeneration, exist_ok=True)

__all__ = [
    "MMSeRForConditionalGeneration",
    "PassState",
    "SeRConnector",
    "VisionFeatures",
    "count_parameters",
]
