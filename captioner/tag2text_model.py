"""The Tag2Text model (Huang et al., "Tag2Text: Guiding Vision-Language Model via Image
Tagging", ICLR 2024), written for this project from transformers building blocks.

Architecture and defaults follow the reference implementation (recognize-anything,
Apache-2.0); the code is ours. Module names are chosen so that the official checkpoint's
keys load with few changes (see `tag2text_checkpoint.map_official_state_dict`):

    visual_encoder  Swin-B (transformers SwinModel) -> [mean token; patch tokens] (B, 1+L, Cv)
    tagging_head    2 cross-attention-only BERT layers; queries = one learned embedding per
                    tag (label_embed), keys/values = image tokens (Query2Label style)
    fc              one linear classifier per tag (GroupWiseLinear) -> tag logits (B, T)
    tag_encoder     BERT over the recognised tags' text, cross-attending to the image
    text_decoder    BERT LM (transformers BertLMHeadModel) cross-attending to tag_encoder

The lowest `tag_head_layers` layers of tag_encoder share their cross-attention and
feed-forward weights with tagging_head, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import BertConfig, BertLMHeadModel, SwinConfig, SwinModel
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
)


@dataclass
class Tag2TextArch:
    """Sizes of Tag2Text; the defaults are the official tag2text_swin_14m model.

    Swin-B at 384 px (config_swinB_384.json), BERT-base encoder/decoder (med_config.json,
    vocab 30522 + [DEC] + [ENC]), a 2-layer, 4-head tagging head (q2l_config.json).
    """

    image_size: int = 384
    patch_size: int = 4
    swin_embed_dim: int = 128
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    swin_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    swin_window: int = 12
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30524
    max_positions: int = 512
    tag_head_layers: int = 2
    tag_head_heads: int = 4
    num_tags: int = 3429

    @property
    def vision_width(self) -> int:
        """Channels of the last Swin stage (1024 for Swin-B)."""
        return self.swin_embed_dim * 2 ** (len(self.swin_depths) - 1)

    def validate(self) -> None:
        if len(self.swin_depths) != len(self.swin_heads):
            raise ValueError(
                f"swin_depths {self.swin_depths} and swin_heads {self.swin_heads} differ in length"
            )
        if self.tag_head_layers > self.num_layers:
            raise ValueError(
                f"tag_head_layers ({self.tag_head_layers}) shares weights with the tag encoder "
                f"and cannot exceed num_layers ({self.num_layers})"
            )

    def swin_config(self) -> SwinConfig:
        return SwinConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.swin_embed_dim,
            depths=list(self.swin_depths),
            num_heads=list(self.swin_heads),
            window_size=self.swin_window,
            mlp_ratio=4.0,
            qkv_bias=True,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            drop_path_rate=0.1,  # the reference's; a no-op at inference
            use_absolute_embeddings=False,
        )

    def bert_config(self, *, heads: int | None = None, decoder: bool = False) -> BertConfig:
        config = BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=heads or self.num_heads,
            intermediate_size=self.intermediate_size,
            hidden_act="gelu",
            max_position_embeddings=self.max_positions,
            layer_norm_eps=1e-12,
            pad_token_id=0,
            is_decoder=decoder,
            add_cross_attention=decoder,
        )
        # Our own layers use transformers' attention modules outside a PreTrainedModel,
        # which would otherwise leave the attention backend unset.
        config._attn_implementation = "sdpa"
        return config


def _cross_attention(config: BertConfig, kv_width: int) -> BertAttention:
    """A BERT cross-attention block whose keys/values come from `kv_width`-wide features
    (transformers' own assumes the encoder is as wide as the decoder)."""
    block = BertAttention(config, is_cross_attention=True)
    block.self.key = nn.Linear(kv_width, config.hidden_size)
    block.self.value = nn.Linear(kv_width, config.hidden_size)
    return block


class TagEncoderLayer(nn.Module):
    """Bidirectional self-attention over tag tokens, cross-attention to image tokens, FFN."""

    def __init__(self, config: BertConfig, kv_width: int) -> None:
        super().__init__()
        self.attention = BertAttention(config, is_causal=False)
        self.crossattention = _cross_attention(config, kv_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """hidden (B, N, D), mask (B, 1, 1, N) additive, image (B, L, Cv) -> (B, N, D)."""
        hidden = self.attention(hidden, attention_mask=mask)[0]
        hidden = self.crossattention(hidden, encoder_hidden_states=image)[0]
        return self.output(self.intermediate(hidden), hidden)


class TaggingHeadLayer(nn.Module):
    """Query2Label layer: tag queries cross-attend to image tokens (no self-attention), FFN."""

    def __init__(self, config: BertConfig, kv_width: int) -> None:
        super().__init__()
        self.crossattention = _cross_attention(config, kv_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """queries (B, T, D), image (B, L, Cv) -> (B, T, D)."""
        hidden = self.crossattention(queries, encoder_hidden_states=image)[0]
        return self.output(self.intermediate(hidden), hidden)


class _Layers(nn.Module):
    """Holds `layer` so that state-dict keys read `...encoder.layer.N...` like BERT's."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TagEncoder(nn.Module):
    """BERT over the tag string ("[ENC] dog | grass | ..."), fused with the image."""

    def __init__(self, config: BertConfig, kv_width: int) -> None:
        super().__init__()
        # transformers' BertEmbeddings also has token-type embeddings, which the reference
        # lacks: the checkpoint mapping fills that table with zeros so it adds nothing.
        self.embeddings = BertEmbeddings(config)
        self.encoder = _Layers(
            [TagEncoderLayer(config, kv_width) for _ in range(config.num_hidden_layers)]
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, attention_mask (B, N); image (B, L, Cv) -> (B, N, D)."""
        hidden = self.embeddings(input_ids=input_ids)
        # (B, N) 1/0 -> (B, 1, 1, N) additive: padded tag tokens are not attended to.
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(
            hidden.dtype
        ).min
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask, image)
        return hidden


class TaggingHead(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int, num_layers: int) -> None:
        super().__init__()
        self.encoder = _Layers([TaggingHeadLayer(config, kv_width) for _ in range(num_layers)])

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, image)
        return queries


class GroupWiseLinear(nn.Module):
    """One linear classifier per tag: logits[b, t] = W[t] . x[b, t] + b[t]."""

    def __init__(self, num_tags: int, dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(1, num_tags, dim))
        self.b = nn.Parameter(torch.empty(1, num_tags))
        nn.init.normal_(self.W, std=dim**-0.5)
        nn.init.zeros_(self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T)."""
        return torch.einsum("btd,td->bt", x, self.W[0]) + self.b


def _share_parameters(source: nn.Module, target: nn.Module) -> None:
    """Make every parameter of `target` the same tensor as `source`'s (same structure)."""
    for name, param in source.named_parameters():
        owner_path, _, attr = name.rpartition(".")
        owner = target.get_submodule(owner_path) if owner_path else target
        setattr(owner, attr, param)


class Tag2TextModel(nn.Module):
    """Tag2Text for inference: `tag_logits`, `encode_tags`, and the decoder's `generate`."""

    def __init__(self, arch: Tag2TextArch) -> None:
        super().__init__()
        arch.validate()
        self.arch = arch
        width = arch.vision_width
        # Registration order matters for tied parameters: load_state_dict copies module by
        # module, so the tagging head's copy of a shared weight is the one kept (as in the
        # reference, whose modules are registered in this order).
        self.visual_encoder = SwinModel(arch.swin_config(), add_pooling_layer=True)
        self.tag_encoder = TagEncoder(arch.bert_config(), width)
        self.text_decoder = BertLMHeadModel(arch.bert_config(decoder=True))
        self.tagging_head = TaggingHead(
            arch.bert_config(heads=arch.tag_head_heads), width, arch.tag_head_layers
        )
        self.label_embed = nn.Embedding(arch.num_tags, arch.hidden_size)
        self.fc = GroupWiseLinear(arch.num_tags, arch.hidden_size)
        for i, head_layer in enumerate(self.tagging_head.encoder.layer):
            enc_layer = self.tag_encoder.encoder.layer[i]
            for part in ("crossattention", "intermediate", "output"):
                _share_parameters(getattr(head_layer, part), getattr(enc_layer, part))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> image tokens (B, 1 + L, Cv), the first the mean token."""
        out = self.visual_encoder(pixel_values=pixel_values)
        tokens = out.last_hidden_state  # (B, L, Cv), after the final LayerNorm
        return torch.cat([out.pooler_output[:, None, :], tokens], dim=1)

    def tag_logits(self, image: torch.Tensor) -> torch.Tensor:
        """image tokens (B, 1 + L, Cv) -> tag logits (B, T)."""
        B = image.shape[0]
        queries = self.label_embed.weight[None].expand(B, -1, -1)  # (B, T, D)
        return self.fc(self.tagging_head(queries, image))

    def encode_tags(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Tag tokens (B, N) fused with image tokens (B, 1 + L, Cv) -> (B, N, D)."""
        return self.tag_encoder(input_ids, attention_mask, image)


def parameter_breakdown(model: Tag2TextModel) -> dict[str, int]:
    """Parameters per component; weights shared between components are counted once, with
    the tagging head (the reference's owner), so the parts add up to the total."""
    counted: set[int] = set()
    counts: dict[str, int] = {}
    for name in ("tagging_head", "visual_encoder", "text_decoder", "label_embed", "fc",
                 "tag_encoder"):
        total = 0
        for param in getattr(model, name).parameters():
            if id(param) not in counted:
                counted.add(id(param))
                total += param.numel()
        counts[name] = total
    counts["total"] = sum(counts.values())
    return counts
