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


def _realign(draft: list[int], expected: int, token: int) -> int:
    """Where the draft continues after the LM wrote `token` at draft position `expected`."""
    for offset in range(REALIGN_WINDOW + 1):
        at = expected + offset
        if at < len(draft) and draft[at] == token:
            return at + 1
    return expected + 1  # a substitution: skip the draft token it replaced


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
    first, first_p = choose(hidden, torch.zeros(b, dtype=torch.long, device=device))
    out: list[list[int]] = [[t] for t in first[:, 0].tolist()]
    out_p: list[list[float]] = [[p] for p in first_p[:, 0].tolist()]
    done = [t == eos_token_id or max_new_tokens <= 1 for t in first[:, 0].tolist()]
    drafts = [row[:n] for row, n in zip(draft.tolist(), draft_len.tolist(), strict=True)]
    pointer = [_realign(d, 0, o[0]) for d, o in zip(drafts, out, strict=True)]
    current = first[:, 0]
    k, idle = max_draft, 0

    while not all(done):
        if capacity >= 0:
            # Keep room for the longest unfinished row to end one token per call.
            free = capacity - int(cache.get_seq_length())
            left = max(max_new_tokens - len(o) for o, d in zip(out, done, strict=True) if not d)
            if free < left:  # a caller's sizing error: fail clearly, not inside the cache
                raise CaptionerError(
                    f"KV cache too small for the refined caption: {free} free slots, "
                    f"{left} tokens still to write"
                )
            k = max(0, min(k, free - left))
        idx = torch.tensor(pointer, device=device)[:, None] + torch.arange(k, device=device)
        usable = idx < draft_len[:, None]  # (b, k)
        block = draft.gather(1, idx.clamp(max=draft.shape[1] - 1)) if k else idx
        block = block.masked_fill(~usable, pad_token_id)
        live = torch.tensor([not d for d in done], device=device)
        ids = torch.cat([current[:, None], block], 1)  # (b, k + 1)
        step_mask = torch.cat([mask, live[:, None].expand(b, k + 1).to(mask.dtype)], 1)
        hidden = lm(
            inputs_embeds=embed(ids), attention_mask=step_mask, past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        emitted = torch.tensor([len(o) for o in out], device=device)
        chosen, chosen_p = choose(hidden, emitted)  # (b, k + 1)
        agree = (block == chosen[:, :k]) & usable
        kept = agree.long().cumprod(1).sum(1)  # (b,) leading draft tokens the LM agrees with
        stats.calls += 1

        kept_list, chosen_list, p_list = kept.tolist(), chosen.tolist(), chosen_p.tolist()
        proposed_now = accepted_now = 0
        valid = torch.zeros(b, k + 1, dtype=mask.dtype, device=device)
        for i in range(b):  # bookkeeping on Python ints; the LM call above is batched
            if done[i]:
                continue
            n = kept_list[i]
            proposed_now += min(k, max(0, len(drafts[i]) - pointer[i]))
            accepted_now += n
            valid[i, : n + 1] = 1  # the fed token and the kept draft tokens
            for t, p in zip(chosen_list[i][: n + 1], p_list[i][: n + 1], strict=True):
                out[i].append(t)
                out_p[i].append(p)
                if t == eos_token_id or len(out[i]) >= max_new_tokens:
                    done[i] = True
                    break
            pointer[i] = _realign(drafts[i], pointer[i] + n, chosen_list[i][n])
        mask = torch.cat([mask, valid], 1)
        current = chosen.gather(1, kept[:, None])[:, 0]
        stats.proposed += proposed_now
        stats.accepted += accepted_now
        idle = idle + 1 if k == 0 else 0
        k = _next_k(k, max_draft, accepted_now / proposed_now if proposed_now else 0.0, idle)

    length = max(len(o) for o in out)
    tokens = torch.full((b, length), pad_token_id, dtype=torch.long, device=device)
    probs = torch.zeros(b, length, device=device)
    for i in range(b):
        tokens[i, : len(out[i])] = torch.tensor(out[i], device=device)
        probs[i, : len(out_p[i])] = torch.tensor(out_p[i], device=device)
    return tokens, probs, stats


__all__ = ["DraftStats", "draft_greedy", "draft_lengths"]
