"""MM-SeR: LLaVA-1.5 with OPT-125M, plus self-refinement through a SeR-Connector.

Reads top to bottom: pass state, hook recorders, the SeR-Connector, the model.

The simple model is transformers' LLaVA with an OPT text model (the subclass only fixes
where OPT keeps its tied embeddings). Self-refinement is OUR RECONSTRUCTION of the paper
(Song et al., arXiv 2508.21451, no code released):

1. `encode_images`: the vision tower runs once per image; layer -2 (without CLS) is
   projected into the LM (LLaVA-1.5), and the `connector_layers` patch features are kept.
2. `caption_pass`: the LM writes the coarse caption. Forward hooks keep, for every
   generated token, the query of the saliency layers and the final hidden state of the
   position that produced it. The saliency map is the LM's own attention from those
   queries to the image tokens, recomputed from the KV cache (exact for OPT, whose
   positions are absolute), averaged over layers, heads and caption tokens.
3. `refine_pass`: the SeR-Connector turns (multi-layer features, saliency, coarse-caption
   hidden states) into K refinement tokens; the LM continues the SAME sequence
   [image][prompt][coarse caption][K refinement tokens][refine instruction] from the KV
   cache of the first pass, so the extra cost is a prefill of K + I + 1 tokens and the
   refined caption's decode. Iterating appends further passes to the same sequence.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace

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

from captioner.configuration_mmser import MMSeRConfig
from captioner.draft_decoding import draft_greedy, draft_lengths
from pipeline.errors import CaptionerError

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


class _TailRecorder:
    """Forward hooks that keep module outputs at the positions producing caption tokens.

    The first call (a prefill) is cut by `first_slice`; later calls (one decode step each)
    are kept whole. `outputs()` concatenates along the sequence axis: (B, T, D) per module.
    """

    def __init__(self, modules: Sequence[nn.Module], first_slice: slice) -> None:
        self.modules = list(modules)
        self.first_slice = first_slice
        self.kept: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self.handles: list = []

    def __enter__(self) -> _TailRecorder:
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, i: int):
        def hook(module, args, output):
            kept = self.kept[i]
            kept.append(output[:, self.first_slice] if not kept else output)

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
        """x (B, Q, C), ctx (B, S, C), mask (B, 1, 1, S) bool or additive -> (B, Q, C)."""
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

    def forward(
        self,
        q: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        vision: torch.Tensor,
        vision_bias: torch.Tensor,
    ) -> torch.Tensor:
        """q (B, K, C); text (B, T, C) with mask (B, 1, 1, T); vision (B, N, C) with
        additive bias (B, 1, 1, N) -> (B, K, C)."""
        h = self.norm_self(q)
        q = q + self.self_attn(h, h)
        q = q + self.text_attn(self.norm_text(q), text, text_mask)
        q = q + self.vision_attn(self.norm_vision(q), vision, vision_bias)
        return q + self.mlp(self.norm_mlp(q))


class SeRConnector(nn.Module):
    """Our reconstruction of the SeR-Connector: caption-guided, saliency-weighted
    cross-attention over multi-layer CLIP features, writing K refinement tokens.

    Patches are fused across layers per patch (LayerNorm + Linear over the concatenated
    layers). Saliency enters as an additive log(N * s) bias on the vision cross-attention
    logits, so a uniform map changes nothing and salient patches are up-weighted.
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
        bias = torch.log(saliency.float().clamp_min(1e-6) * N).to(dtype)[:, None, None, :]
        text = self.text_in(caption.to(dtype))  # (B, T, C)
        # A row with an empty caption attends to all positions rather than to none (NaN).
        seen = caption_mask.bool() | (caption_mask.sum(1, keepdim=True) == 0)
        text_mask = seen[:, None, None, :]  # (B, 1, 1, T)
        q = self.queries.unsqueeze(0).expand(B, -1, -1)  # (B, K, C)
        for block in self.blocks:
            q = block(q, text, text_mask, vision, bias)
        return self.out(q)


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

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SeRConnector):
            hf_init.normal_(module.queries, mean=0.0, std=0.02)

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
        cache: DynamicCache,
        mask: torch.Tensor,
        query_start: int,
        image_pos: torch.Tensor,
        token_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The LM's attention from caption-producing positions to the image tokens.

        queries: per saliency layer (B, T, D), q_proj outputs at positions
        query_start .. query_start + T - 1; cache: keys of those layers over positions
        0..Pc-1; mask (B, >=Pc); image_pos (B, N); token_mask (B, T) -> saliency (B, N),
        averaged over layers, heads and real caption tokens, normalised to sum 1.
        """
        text = self.config.text_config
        H = text.num_attention_heads
        B, T, D = queries[0].shape
        N = image_pos.shape[1]
        scale = (D // H) ** -0.5
        Pc = cached_length(cache)
        key_pos = torch.arange(Pc, device=mask.device)
        query_pos = query_start + torch.arange(T, device=mask.device)
        allowed = mask[:, None, None, :Pc].bool() & (key_pos[None, :] <= query_pos[:, None])
        gather_idx = image_pos[:, None, None, :].expand(B, H, T, N)
        saliency = torch.zeros(B, T, N, device=mask.device)
        for layer, q in zip(self.config.saliency_layers, queries, strict=True):
            keys = cache.layers[layer].keys[:, :, :Pc].float()  # (B, H, Pc, D/H)
            q = q.float().view(B, T, H, D // H).transpose(1, 2) * scale  # (B, H, T, D/H)
            scores = (q @ keys.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
            probs = scores.softmax(-1)  # (B, H, T, Pc)
            saliency += probs.gather(-1, gather_idx).mean(1)  # (B, T, N)
        weight = token_mask.float()[..., None]  # (B, T, 1)
        saliency = (saliency * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # (B, N)
        total = saliency.sum(-1, keepdim=True)
        uniform = torch.full_like(saliency, 1.0 / N)
        return torch.where(total > 0, saliency / total.clamp_min(1e-12), uniform)

    # -- passes ----------------------------------------------------------------------------

    def _recorded_modules(self) -> list[nn.Module]:
        decoder = self.model.language_model.decoder
        qs = [decoder.layers[i].self_attn.q_proj for i in self.config.saliency_layers]
        return [*qs, decoder.final_layer_norm]

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

    def _caption_mask(self, tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
        """(B, T) -> 1 on tokens before the first EOS (padding follows EOS)."""
        return ((tokens == eos_token_id).cumsum(1) == 0).long()

    def _run_pass(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        cache: DynamicCache | None,
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
        # would overwrite the hook outputs that _TailRecorder keeps between steps.
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
        elif greedy:
            recorder = _TailRecorder(self._recorded_modules() if record else [], slice(-1, None))
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
        else:
            # Beam search reorders its cache; rebuild the state with one teacher-forced pass.
            out = self.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                generation_config=generation,
            )
            tokens = out.sequences
            probs = out.sequences_scores.float().exp()[:, None].expand(tokens.shape)
        token_mask = self._caption_mask(tokens, generation.eos_token_id)
        T = tokens.shape[1]
        confidence_mean = (probs * token_mask).sum(1) / token_mask.sum(1).clamp_min(1)
        embeds = torch.cat([embeds, self.get_input_embeddings()(tokens)], dim=1)
        mask = torch.cat([mask, token_mask.to(mask.dtype)], dim=1)
        state = PassState(
            rows=rows, embeds=embeds, mask=mask,
            # A verified draft leaves masked holes in the cache that `mask` does not describe.
            cache=cache if greedy and draft_stats is None else None,
            image_pos=image_pos, tokens=tokens, token_mask=token_mask,
            confidence=confidence_mean, cond=None, saliency=None, draft_stats=draft_stats,
        )
        if not record:
            return state
        if greedy:
            recorded = recorder.outputs()
        else:
            cache = DynamicCache(config=self.config.text_config)
            with _TailRecorder(self._recorded_modules(), slice(P - 1, P - 1 + T)) as recorder:
                self.model.language_model(
                    inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, use_cache=True
                )
            recorded = recorder.outputs()
        state.cond = recorded[-1][:, :T]
        state.saliency = self.attention_saliency(
            [q[:, :T] for q in recorded[:-1]], cache, mask, P - 1, image_pos, token_mask
        )
        return state

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

    def cache_room(
        self, max_new_tokens: int, refine_passes: int, instruction_len: int, draft_slack: int = 0
    ) -> int:
        """Cache slots one caption pass plus `refine_passes` refinement passes append to the
        sequence: T, then K + I + T per refinement pass, plus `draft_slack` slots that a
        verified draft may spend on rejected tokens (more slack, longer drafts late on)."""
        per_refine = self.config.num_refine_tokens + instruction_len + max_new_tokens
        return max_new_tokens + refine_passes * per_refine + draft_slack

    def refinement_tokens(self, state: PassState, features: VisionFeatures) -> torch.Tensor:
        """The SeR-Connector's K refinement tokens for the rows of `state`: (b, K, D)."""
        if self.ser_connector is None:
            raise CaptionerError("this checkpoint has no SeR-Connector (config.refine is false)")
        multi = features.multi_layer[state.rows]
        return self.ser_connector(multi, state.saliency, state.cond, state.token_mask)

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
    ) -> PassState:
        """One refinement pass: the sequence so far + [K refinement tokens] + instruction
        (I,) ids -> PassState with the refined tokens (b, T). With `reuse_cache` the LM only
        prefills the new K + I + 1 positions; otherwise a new cache is made, static with
        `cache_room` positions after this pass's prompt (None: dynamic). `max_draft` > 0
        verifies the previous caption as a draft, up to that many tokens per LM call (the
        last pass only: see `_run_pass`)."""
        refine = self.refinement_tokens(state, features)  # (b, K, D)
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

    def refinement_loss(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        coarse_ids: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
        instruction_ids: torch.Tensor,
        eos_token_id: int,
    ) -> torch.Tensor:
        """Teacher-forced loss of writing `target_ids` (B, Tt) after a (perturbed) coarse
        caption `coarse_ids` (B, T) (EOS-terminated or padded after EOS), for the prompt
        `input_ids` (B, S): the paper's localized-correction training objective."""
        features = self.encode_images(pixel_values)
        embeds, image_pos = self.embed_prompt(input_ids, features)
        B, P = input_ids.shape
        T = coarse_ids.shape[1]
        mask = torch.ones(B, P, dtype=torch.long, device=input_ids.device)
        token_mask = self._caption_mask(coarse_ids, eos_token_id)
        embed = self.get_input_embeddings()
        seq = torch.cat([embeds, embed(coarse_ids)], 1)
        seq_mask = torch.cat([mask, token_mask], 1)
        cache = DynamicCache(config=self.config.text_config)
        with _TailRecorder(self._recorded_modules(), slice(P - 1, P - 1 + T)) as recorder:
            self.model.language_model(
                inputs_embeds=seq, attention_mask=seq_mask, past_key_values=cache, use_cache=True
            )
        recorded = recorder.outputs()
        with torch.no_grad():
            saliency = self.attention_saliency(
                [q[:, :T].detach() for q in recorded[:-1]], cache, seq_mask, P - 1, image_pos,
                token_mask,
            )
        refine = self.ser_connector(features.multi_layer, saliency, recorded[-1][:, :T], token_mask)
        instruction = embed(instruction_ids)[None].expand(B, -1, -1)
        tail = torch.cat([refine.to(seq.dtype), instruction, embed(target_ids)], 1)
        tail_mask = torch.cat(
            [seq_mask, torch.ones(B, tail.shape[1] - target_ids.shape[1], dtype=seq_mask.dtype,
                                  device=seq_mask.device), target_mask.to(seq_mask.dtype)], 1
        )
        hidden = self.model.language_model(
            inputs_embeds=tail, attention_mask=tail_mask, past_key_values=cache, use_cache=True
        ).last_hidden_state  # (B, K + I + Tt, D)
        start = tail.shape[1] - target_ids.shape[1] - 1  # the position predicting target 0
        logits = self.lm_head(hidden[:, start:-1])  # (B, Tt, V)
        labels = target_ids.masked_fill(target_mask == 0, -100)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


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
