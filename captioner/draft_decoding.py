"""Greedy decoding that verifies a draft caption instead of writing every token anew.

MM-SeR's refinement is trained for localized correction (the paper perturbs a caption's
entities, attributes or relations and teaches the model to restore it), so a refined
caption mostly repeats the coarse one. Here the coarse caption is the draft: each LM call
feeds every row's last emitted token plus its next k draft tokens; the LM's own greedy
choices at those k + 1 positions keep the longest agreeing prefix of the draft and add one
token of their own. The result is plain greedy decoding's (up to float rounding between a
(k+1)-token and a 1-token forward); only the number of sequential LM calls changes.

Written here because transformers' assisted decoding (prompt lookup) decodes one row at a
time, and rows of a batch keep different numbers of draft tokens. Rejected draft positions
stay in the KV cache and are masked out; OPT derives positions from the attention mask, so
the tokens after a hole keep the right positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache

from captioner.errors import CaptionerError

# After a correction the draft is searched this many tokens ahead for the LM's token, so a
# deletion in the refined caption re-aligns the draft instead of rejecting the rest.
REALIGN_WINDOW = 4
# With no draft token kept, try a 1-token draft again after this many LM calls.
PROBE_EVERY = 8


@dataclass
class DraftStats:
    """How the draft fared: LM calls after the prefill, draft tokens fed, tokens kept."""

    calls: int = 0
    proposed: int = 0
    accepted: int = 0


def draft_lengths(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(b, T) captions -> (b,) draft lengths: up to and including the first EOS."""
    is_eos = tokens == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, tokens.shape[1])
    return first.long()


def _realign(draft: torch.Tensor, draft_len: torch.Tensor, expected: torch.Tensor,
             token: torch.Tensor) -> torch.Tensor:
    """Where each row's draft (b, Td) continues after the LM wrote `token` (b,) at draft
    position `expected` (b,): just after the first match within REALIGN_WINDOW, else after
    the draft token it replaced (a substitution)."""
    at = expected[:, None] + torch.arange(REALIGN_WINDOW + 1, device=draft.device)
    hit = (at < draft_len[:, None]) & (
        draft.gather(1, at.clamp(max=draft.shape[1] - 1)) == token[:, None]
    )
    first = hit.long().argmax(1)
    return torch.where(hit.any(1), expected + first + 1, expected + 1)


def _next_k(k: int, max_draft: int, kept_fraction: float, idle_calls: int) -> int:
    """Draft length for the next call, from the fraction of draft tokens just kept."""
    if k == 0:
        return 1 if idle_calls >= PROBE_EVERY else 0
    if kept_fraction >= 0.5:
        return min(k + 2, max_draft)
    if kept_fraction < 0.25:
        return k // 2
    return k


@torch.inference_mode()
def draft_greedy(
    model,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    cache: Cache,
    draft: torch.Tensor,
    draft_len: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    max_draft: int,
) -> tuple[torch.Tensor, torch.Tensor, DraftStats]:
    """Greedy captions continuing `embeds` (b, P, D) with `mask` (b, P), the KV cache
    holding the first `cache.get_seq_length()` positions; `draft` (b, Td) with `draft_len`
    (b,) usable tokens per row. `model` is an MMSeRForConditionalGeneration.

    Returns tokens (b, L) padded with `pad_token_id` after EOS (as `generate` pads), the
    probability of each chosen token (b, L), and DraftStats.
    """
    lm, head = model.model.language_model, model.lm_head
    embed = model.get_input_embeddings()
    device = embeds.device
    b = embeds.shape[0]
    cached = int(cache.get_seq_length())
    # A static cache has a fixed number of slots, and rejected draft tokens use slots too.
    capacity = cache.get_max_length()  # -1: dynamic, grows as needed
    stats = DraftStats()

    def choose(hidden: torch.Tensor, emitted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy token and its probability at every position of `hidden` (b, n, D);
        EOS is barred where fewer than min_new_tokens would precede it."""
        logits = head(hidden).float()
        n = logits.shape[1]
        early = emitted[:, None] + torch.arange(n, device=device)[None] < min_new_tokens
        logits[..., eos_token_id] = logits[..., eos_token_id].masked_fill(early, float("-inf"))
        probs = logits.softmax(-1)
        best, tokens = probs.max(-1)
        return tokens, best

    hidden = lm(
        inputs_embeds=embeds[:, cached:], attention_mask=mask, past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1:]
    written = embeds.shape[1]  # cache positions, counted here: reading the cache would sync
    first, first_p = choose(hidden, torch.zeros(b, dtype=torch.long, device=device))
    # Every row's state as tensors, so the bookkeeping below is batched like the LM call.
    # `out` has room past max_new_tokens for one call's rejected positions (written as pad).
    width = max_new_tokens + max_draft + 1
    out = torch.full((b, width), pad_token_id, dtype=torch.long, device=device)
    out_p = torch.zeros(b, width, device=device)
    out[:, 0], out_p[:, 0] = first[:, 0], first_p[:, 0]
    n_out = torch.ones(b, dtype=torch.long, device=device)
    done = (first[:, 0] == eos_token_id) | (max_new_tokens <= 1)
    pointer = _realign(draft, draft_len, torch.zeros_like(n_out), first[:, 0])
    current = first[:, 0]
    k, idle = max_draft, 0
    any_live, fewest_out = (not bool(done.all())), 1  # the host values each call needs
    positions = torch.arange(max_draft + 1, device=device)

    while any_live:
        if capacity >= 0:
            # Keep room for the longest unfinished row to end one token per call.
            free, left = capacity - written, max_new_tokens - fewest_out
            if free < left:  # a caller's sizing error: fail clearly, not inside the cache
                raise CaptionerError(
                    f"KV cache too small for the refined caption: {free} free slots, "
                    f"{left} tokens still to write"
                )
            k = max(0, min(k, free - left))
        j = positions[: k + 1][None]  # (1, k + 1)
        idx = pointer[:, None] + j[:, :k]
        usable = idx < draft_len[:, None]  # (b, k)
        block = draft.gather(1, idx.clamp(max=draft.shape[1] - 1)) if k else idx
        block = block.masked_fill(~usable, pad_token_id)
        live = ~done
        ids = torch.cat([current[:, None], block], 1)  # (b, k + 1)
        step_mask = torch.cat([mask, live[:, None].expand(b, k + 1).to(mask.dtype)], 1)
        hidden = lm(
            inputs_embeds=embed(ids), attention_mask=step_mask, past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        written += k + 1
        chosen, chosen_p = choose(hidden, n_out)  # (b, k + 1)
        agree = (block == chosen[:, :k]) & usable
        kept = agree.long().cumprod(1).sum(1)  # (b,) leading draft tokens the LM agrees with
        stats.calls += 1

        # Each live row appends the fed token's successor and the kept draft tokens, up to
        # its first EOS and max_new_tokens.
        fed = (j <= kept[:, None]) & live[:, None]  # (b, k + 1) positions the LM keeps
        is_eos = chosen == eos_token_id
        eos_at = torch.where((is_eos & fed).any(1), (is_eos & fed).long().argmax(1), k + 1)
        take = fed & (j <= eos_at[:, None]) & (n_out[:, None] + j < max_new_tokens)
        at = n_out[:, None] + j
        out.scatter_(1, at, torch.where(take, chosen, pad_token_id))
        out_p.scatter_(1, at, torch.where(take, chosen_p, 0.0))
        proposed = ((draft_len - pointer).clamp(0, k) * live).sum()
        accepted = (kept * live).sum()
        n_out = n_out + take.sum(1)
        done = done | (take & is_eos).any(1) | (n_out >= max_new_tokens)
        moved = _realign(draft, draft_len, pointer + kept, chosen.gather(1, kept[:, None])[:, 0])
        pointer = torch.where(live, moved, pointer)
        mask = torch.cat([mask, fed.to(mask.dtype)], 1)  # the fed token and the kept draft
        current = chosen.gather(1, kept[:, None])[:, 0]

        # The one host synchronisation per call: whether to stop, and the draft length.
        fewest = torch.where(done, max_new_tokens, n_out).min()
        live_now, proposed_now, accepted_now, fewest_out = torch.stack(
            [(~done).any().long(), proposed, accepted, fewest]
        ).tolist()
        any_live = bool(live_now)
        stats.proposed += proposed_now
        stats.accepted += accepted_now
        idle = idle + 1 if k == 0 else 0
        k = _next_k(k, max_draft, accepted_now / proposed_now if proposed_now else 0.0, idle)

    length = int(n_out.max())
    return out[:, :length], out_p[:, :length], stats


__all__ = ["DraftStats", "draft_greedy", "draft_lengths"]
