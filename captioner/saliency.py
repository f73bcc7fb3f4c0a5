"""The saliency map MM-SeR's refinement looks at: the LM's own attention from the caption
tokens to the image tokens, recomputed from the recorded queries and the keys."""

from __future__ import annotations

import torch


def attention_saliency(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    mask: torch.Tensor,
    query_start: int,
    image_pos: torch.Tensor,
    token_mask: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """The LM's attention from the caption tokens to the image tokens.

    queries: per saliency layer (B, T, D), q_proj outputs at sequence positions
    query_start .. query_start + T - 1 (the caption tokens); keys: the same layers'
    keys (B, H, >=Pc, D/H) over positions 0..Pc-1, Pc = query_start + T (a KV cache's,
    or k_proj outputs reshaped); mask (B, >=Pc); image_pos (B, N); token_mask (B, T)
    -> saliency (B, N), averaged over layers, heads and real caption tokens,
    normalised to sum 1 (uniform where a row has no caption tokens).
    """
    H = num_heads
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
    # Each layer's attention rows summed over heads and real caption tokens, then read at
    # the image positions: reducing first keeps the work to one (B, Pc) sum per layer
    # instead of a (B, H, T, N) gather. Per-row scale is irrelevant: rows are normalised.
    weight = token_mask.float()  # (B, T)
    per_key = torch.zeros(B, Pc, device=mask.device)
    for q, k in zip(queries, keys, strict=True):
        k = k[:, :, :Pc].float()  # (B, H, Pc, D/H)
        q = q.float().view(B, T, H, D // H).transpose(1, 2) * scale  # (B, H, T, D/H)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(-1)  # (B, H, T, Pc)
        per_key += torch.einsum("bhtp,bt->bp", probs, weight)
    saliency = per_key.gather(1, image_pos)  # (B, N)
    total = saliency.sum(-1, keepdim=True)
    uniform = torch.full_like(saliency, 1.0 / N)
    return torch.where(total > 0, saliency / total.clamp_min(1e-12), uniform)
