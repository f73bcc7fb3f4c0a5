"""MM-SeR's training forwards: the caption loss and the refinement loss on one batch,
dispatched from `forward` so the Trainer and DDP reach them."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    LlavaForConditionalGeneration,
)
from transformers.utils import ModelOutput

from captioner.errors import CaptionerError
from captioner.mmser_passes import VisionFeatures, _StateRecorder
from captioner.saliency import attention_saliency
from captioner.sequence import caption_mask, label_mask

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


class MMSeRTrainingForward:
    """The training forwards of MMSeRForConditionalGeneration (mixed into it): the same
    sequence the inference passes write, teacher-forced, from captioner/sequence.py."""

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
            saliency = attention_saliency(
                recorded[:-1], self._recorded_keys(keys.outputs()), seq_mask, P, image_pos,
                coarse_mask, self.config.text_config.num_attention_heads,
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


