"""MM-SeR: LLaVA-1.5 with OPT-125M, plus self-refinement through a SeR-Connector.

The pieces live beside it: captioner/mmser_passes.py (pass state, KV-cache helpers, hook
recorders), captioner/ser_connector.py, captioner/mmser_training_forward.py (the training
forwards, mixed in); this file holds the model (vision, saliency, inference passes).

The simple model is transformers' LLaVA with an OPT text model (the subclass only fixes
where OPT keeps its tied embeddings). Self-refinement is OUR RECONSTRUCTION of the paper
(Song et al., arXiv 2508.21451, no code released):

1. `encode_images`: the vision tower runs once per image, up to the deepest layer read
   (its last layer never does); layer -2 (without CLS) is projected into the LM
   (LLaVA-1.5), and the `connector_layers` patch features are kept.
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
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    Cache,
    DynamicCache,
    GenerationConfig,
    LlavaForConditionalGeneration,
)
from transformers import initialization as hf_init

from captioner.configuration_mmser import MMSeRConfig
from captioner.draft_decoding import draft_greedy, draft_lengths
from captioner.errors import CaptionerError
from captioner.mmser_passes import (
    KVArena,
    PassState,
    VisionFeatures,
    _ConfidenceRecorder,
    _StateRecorder,
    cached_length,
    new_cache,
    rewind_cache,
)
from captioner.mmser_training_forward import MMSeRTrainingForward
from captioner.saliency import attention_saliency
from captioner.sequence import caption_mask
from captioner.ser_connector import SeRBlock, SeRConnector
from captioner.vision_layers import vision_hidden_states

# --- the model ----------------------------------------------------------------------------


class MMSeRForConditionalGeneration(MMSeRTrainingForward, LlavaForConditionalGeneration):
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

    def encode_images(
        self, pixel_values: torch.Tensor, multi_layer: bool = True
    ) -> VisionFeatures:
        """pixel_values (B, 3, H, W) -> VisionFeatures; the vision tower runs once.
        `multi_layer` False skips the connector's features (a pass that will not refine)."""
        cfg = self.config
        connector = self.ser_connector is not None and multi_layer
        read = [cfg.vision_feature_layer, *(cfg.connector_layers if connector else [])]
        # Only the layers up to the deepest one read run (the last CLIP layer never does).
        hidden = vision_hidden_states(self.model.vision_tower, pixel_values, read)
        image_embeds = self.model.multi_modal_projector(hidden[cfg.vision_feature_layer][:, 1:])
        multi = None
        if connector:
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
        state.saliency = attention_saliency(
            [q[:, :T] for q in recorded[:-1]], keys, state.mask, start, state.image_pos,
            state.token_mask, self.config.text_config.num_attention_heads,
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
        arena: KVArena | None = None,
        arena_room: int | None = None,
        record_after: bool = False,
    ) -> PassState:
        """Generate one caption per row continuing `embeds` (B, P, D) and, when
        `keep_state`, everything the next refinement pass needs. A new cache is static
        with `cache_room` positions after `embeds` (None: dynamic); with `arena_room` it is
        a view of a new KVArena of that many positions after `embeds`, which later passes
        continue in place (`arena`: the one `cache` views). With a `draft` (B, Td)
        caption and `max_draft` > 0, greedy decoding verifies up to that many draft tokens
        per LM call (draft_decoding.py) when nothing needs recording for a later pass.
        `record_after`: take the state with one teacher-forced forward over the caption
        after decoding instead of hooks during it (always so when decoding is compiled)."""
        P = embeds.shape[1]
        greedy = generation.num_beams == 1
        generation = copy.deepcopy(generation)
        # Compiled decode steps only when the caller asks (a compile_config): generate
        # would otherwise turn compilation on by itself for a static cache on CUDA.
        asked = generation.compile_config is not None and not generation.disable_compile
        compiled = greedy and asked
        generation.disable_compile = not compiled
        generation.return_dict_in_generate = True
        generation.output_scores = not greedy  # beams: sequences_scores for the confidence
        record = keep_state and self.ser_connector is not None
        # CUDA graphs reuse the buffers that hooks would keep between steps.
        record_after = record and (record_after or compiled)
        if greedy and cache is None:
            cache, arena = self._new_pass_cache(embeds, cache_room, arena_room)
        draftable = draft is not None and max_draft > 0 and draft.shape[1] > 0
        recorder = _StateRecorder([], start=P)
        draft_stats, logits = None, None
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
            modules = self._recorded_modules() if record and not record_after else []
            recorder = _StateRecorder(modules, start=P, offset=cached_length(cache))
            confidence = _ConfidenceRecorder()
            with recorder:
                out = self.generate(
                    inputs_embeds=embeds, attention_mask=mask, past_key_values=cache,
                    generation_config=generation, logits_processor=[confidence],
                )
            tokens = out.sequences  # (B, T) new tokens only
            probs = torch.stack(confidence.probs, 1)  # (B, T)
            logits = torch.stack(out.logits, 1) if generation.output_logits else None
        else:
            out = self.generate(
                inputs_embeds=embeds, attention_mask=mask, generation_config=generation
            )
            tokens = out.sequences
            probs = out.sequences_scores.float().exp()[:, None].expand(tokens.shape)
        eos = generation.eos_token_id
        token_mask = caption_mask(tokens, eos)
        confidence_mean = (probs * token_mask).sum(1) / token_mask.sum(1).clamp_min(1)
        if not greedy and record:
            # Beam search reorders its cache; rebuild the state with one teacher-forced pass.
            state = self.teacher_forced_state(embeds, mask, image_pos, tokens, eos, rows)
            state.confidence = confidence_mean
            return state
        # A verified draft leaves masked holes in the cache that the state's mask does not
        # describe: no later pass continues it.
        continued = greedy and draft_stats is None
        state = PassState(
            rows=rows,
            embeds=torch.cat([embeds, self.get_input_embeddings()(tokens)], dim=1),
            mask=torch.cat([mask, token_mask.to(mask.dtype)], dim=1),
            cache=cache if continued else None, arena=arena if continued else None,
            image_pos=image_pos, tokens=tokens, token_mask=token_mask,
            confidence=confidence_mean, cond=None, saliency=None, draft_stats=draft_stats,
            logits=logits,
        )
        if not record:
            return state
        if record_after:
            # One teacher-forced forward over the caption, under the mask generate used
            # (every written token attended), rewriting the positions decoding wrote.
            rewind_cache(cache, P)
            recorder = _StateRecorder(self._recorded_modules(), start=P, offset=P)
            new_tokens, written_mask = state.embeds[:, P:], torch.cat(
                [mask, torch.ones_like(token_mask)], dim=1)
        else:
            # generate never feeds its last token back; one more step does, so the state
            # that has read the whole caption is recorded and the cache holds all of it.
            new_tokens, written_mask = state.embeds[:, -1:], state.mask
        with recorder:
            self.model.language_model(
                inputs_embeds=new_tokens, attention_mask=written_mask, past_key_values=cache,
                use_cache=True,
            )
        return self._finish_state(state, recorder.outputs(), self._cache_keys(cache), P)

    def _new_pass_cache(
        self, embeds: torch.Tensor, cache_room: int | None, arena_room: int | None
    ) -> tuple[Cache, KVArena | None]:
        """A greedy pass's new cache: a view of a new KVArena (`arena_room` positions after
        `embeds`, for this and later passes), a StaticCache, or (no room) a DynamicCache."""
        P = embeds.shape[1]
        if arena_room is not None and cache_room is not None:
            arena = KVArena(self.config.text_config, embeds.shape[0], P + arena_room,
                            embeds.dtype, embeds.device)
            return arena.cache(P + cache_room), arena
        cache_len = None if cache_room is None else P + cache_room
        return new_cache(self.config.text_config, cache_len), None

    @torch.inference_mode()
    def caption_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: VisionFeatures,
        generation: GenerationConfig,
        keep_state: bool,
        cache_room: int | None = None,
        arena_room: int | None = None,
        record_after: bool = False,
    ) -> PassState:
        """The coarse (or only) caption: input_ids/attention_mask (B, S), left-padded, with
        image placeholders -> PassState with tokens (B, T). `cache_room`: positions after
        the prompt this pass writes (None keeps a dynamic cache); `arena_room`: positions
        after the prompt that this and the later passes write (see `cache_room()`), kept in
        one KVArena that the refinement passes continue; `record_after`: see `_run_pass`."""
        embeds, image_pos = self.embed_prompt(input_ids, features)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self._run_pass(
            embeds, attention_mask, None, image_pos, rows, generation, keep_state, cache_room,
            arena_room=arena_room, record_after=record_after,
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
        multi = features.multi_layer
        # Rows only ever shrink to a sorted subset (PassState.select), so all of them left
        # means the features as they are: no (B, L, N, Dv) copy.
        if state.rows.numel() != multi.shape[0]:
            multi = multi[state.rows]
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
        record_after: bool = False,
    ) -> PassState:
        """One refinement pass: the sequence so far + [K refinement tokens] + instruction
        (I,) ids -> PassState with the refined tokens (b, T). With `reuse_cache` the LM only
        prefills the new K + I positions (in the first pass's KVArena, viewed to
        `cache_room` positions after this pass's prompt); otherwise a new cache is made,
        static with `cache_room` positions after this pass's prompt (None: dynamic). `max_draft` > 0
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
        cache, arena = (state.cache, state.arena) if reuse_cache else (None, None)
        if arena is not None and cache is not None and cache_room is not None:
            # The same positions, a view long enough for this pass.
            cache = arena.cache(embeds.shape[1] + cache_room, written=cached_length(cache))
        return self._run_pass(
            embeds, mask, cache, state.image_pos, state.rows, generation, keep_state, cache_room,
            draft=state.tokens, max_draft=max_draft, arena=arena, record_after=record_after,
        )

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


def register_auto_classes() -> None:
    """Let transformers' Auto classes load MM-SeR checkpoints (model_type "mmser"). The
    product builds the class directly; this is for users of AutoModelForImageTextToText,
    called by them, not as a side effect of importing the module."""
    AutoConfig.register("mmser", MMSeRConfig, exist_ok=True)
    AutoModelForImageTextToText.register(MMSeRConfig, MMSeRForConditionalGeneration, exist_ok=True)

__all__ = [
    "MMSeRForConditionalGeneration",
    "PassState",
    "SeRConnector",
    "VisionFeatures",
    "count_parameters",
    "register_auto_classes",
]
