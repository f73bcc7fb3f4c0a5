"""The SeR-Connector: (multi-layer image features, saliency, coarse-caption states) -> K
refinement tokens for the LM (our reconstruction; see captioner/modeling_mmser.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captioner.configuration_mmser import MMSeRConfig

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


