"""The four captioners at any size (`Preset`: real, or a tiny one for tests), as random-weights
checkpoints written in the real formats, for the timing benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Real vocabulary sizes: the LM heads cost by them.
LLAVA_VOCAB, LLAVA_IMAGE_TOKEN = 32064, 32000
OPT_VOCAB = 50272  # 50265 BPE ids + 7 unused rows; <pad> and <image> take two of them
BERT_VOCAB = 30522  # + [DEC] + [ENC] = Tag2Text's 30524
TAG2TEXT_TAGS = 3429



# --- sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """How far the real architectures are shrunk."""

    name: str  # real, reduced or tiny
    depth_div: int = 1  # every transformer stack keeps round(layers / depth_div), >= 1

    def layers(self, n: int) -> int:
        return max(1, round(n / self.depth_div))

    @property
    def tiny(self) -> bool:
        return self.name == "tiny"


def clip_config(p: Preset) -> Any:
    """CLIP ViT-L/14-336 (the vision tower of LLaVA-1.5, the simple model and MM-SeR)."""
    from transformers import CLIPVisionConfig

    from captioner.configuration_mmser import clip_vit_l14_336_config

    if p.tiny:
        return CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=32, hidden_act="quick_gelu",
        )
    config = clip_vit_l14_336_config()
    config.num_hidden_layers = p.layers(24)
    return config


def mmser_config(p: Preset, refine: bool, image_token: int) -> Any:
    """MM-SeR (refine) or the simple model: CLIP + projector + OPT-125M (+ SeR-Connector)."""
    from transformers import OPTConfig

    from captioner.configuration_mmser import MMSeRConfig, opt_125m_config

    vision = clip_config(p)
    if p.tiny:
        text = OPTConfig(
            vocab_size=OPT_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ffn_dim=64, max_position_embeddings=512, word_embed_proj_dim=32,
            pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True,
        )
        connector = {"connector_hidden_size": 32, "connector_num_layers": 1,
                     "connector_num_heads": 2, "num_refine_tokens": 4}
    else:
        text = opt_125m_config()
        text.num_hidden_layers = p.layers(12)
        connector = {"connector_num_layers": p.layers(4)}  # 768 wide, 12 heads, 64 tokens
    n_vision, n_text = vision.num_hidden_layers, text.num_hidden_layers
    # The real model fuses CLIP layers 6, 12, 18, 23 of 24: the same fractions of the depth.
    fused = sorted({min(n_vision - 1, max(1, round(i * n_vision / 24))) for i in (6, 12, 18, 23)})
    saliency = min(n_text, p.layers(4))  # the real model reads the last 4 of 12 OPT layers
    return MMSeRConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        refine=refine,
        connector_layers=fused,
        saliency_layers=list(range(n_text - saliency, n_text)),
        **connector,
    )


def llava_config(p: Preset) -> Any:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + MLP projector + Vicuna-7B."""
    from transformers import LlamaConfig, LlavaConfig

    from captioner.llava15 import real_config

    if p.tiny:
        text = LlamaConfig(
            vocab_size=LLAVA_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0, tie_word_embeddings=False,
        )
        return LlavaConfig(
            vision_config=clip_config(p), text_config=text,
            image_token_index=LLAVA_IMAGE_TOKEN, projector_hidden_act="gelu",
            vision_feature_layer=-2, vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    config = real_config()
    config.vision_config.num_hidden_layers = p.layers(24)
    config.text_config.num_hidden_layers = p.layers(32)
    return config


def tag2text_architecture(p: Preset) -> dict[str, Any]:
    """`captioner.tag2text.architecture` overrides (Swin-B 384 + BERT-base by default)."""
    if p.tiny:
        return {"image_size": 32, "swin_embed_dim": 8, "swin_depths": [2, 2],
                "swin_heads": [1, 2], "swin_window": 4, "hidden_size": 16, "num_layers": 2,
                "num_heads": 2, "intermediate_size": 32, "max_positions": 128,
                "tag_head_layers": 1, "tag_head_heads": 1}
    if p.depth_div == 1:
        return {}
    num_layers = p.layers(12)
    return {"swin_depths": [p.layers(d) for d in (2, 2, 18, 2)], "num_layers": num_layers,
            "tag_head_layers": min(num_layers, p.layers(2))}


def size_summary(p: Preset) -> dict[str, Any]:
    """What each captioner's stacks look like under preset `p` (for the JSON and report)."""
    from captioner.tag2text_model import Tag2TextArch

    v = clip_config(p)
    m = mmser_config(p, True, 0)
    ll = llava_config(p).text_config
    t = Tag2TextArch(**{"num_tags": TAG2TEXT_TAGS, **tag2text_architecture(p)})
    clip = {"layers": v.num_hidden_layers, "width": v.hidden_size, "image_size": v.image_size,
            "image_tokens": (v.image_size // v.patch_size) ** 2}
    return {
        "preset": p.name,
        "depth_div": p.depth_div,
        "clip": clip,
        "opt": {"layers": m.text_config.num_hidden_layers, "width": m.text_config.hidden_size},
        "ser_connector": {"layers": m.connector_num_layers, "width": m.connector_hidden_size,
                          "refine_tokens": m.num_refine_tokens,
                          "clip_layers_fused": m.connector_layers,
                          "saliency_layers": m.saliency_layers},
        "llama": {"layers": ll.num_hidden_layers, "width": ll.hidden_size,
                  "vocab": ll.vocab_size},
        "tag2text": {"swin_depths": t.swin_depths, "swin_width": t.swin_embed_dim,
                     "image_size": t.image_size, "bert_layers": t.num_layers,
                     "bert_width": t.hidden_size, "tag_head_layers": t.tag_head_layers,
                     "tags": t.num_tags},
    }


PRESETS = {"real": Preset("real"), "tiny": Preset("tiny")}


# --- random-weights checkpoints in the real formats ----------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build models directly in `dtype` (a 7B model built in float32 first needs 28 GB)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def word_tokenizer(vocab_size: int, specials: Sequence[str], added: Sequence[str] = ()) -> Any:
    """A word-level fast tokenizer with exactly `vocab_size` base ids (the real models'),
    `specials` first, then `added` special tokens after them (ids vocab_size, +1, ...).

    Real vocabularies are not reachable here; what a prompt costs is its token count,
    which a whitespace tokenizer gets within a few tokens of the real one (next to the 576
    image tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=specials[0])
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
    return tokenizer


def clip_processor(p: Preset) -> Any:
    from transformers import CLIPImageProcessor

    size = clip_config(p).image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size,
                                                                      "width": size})


def write_mmser(
    out: Path, p: Preset, refine: bool, dtype: torch.dtype, device: str = "cpu"
) -> Path:
    """A random-weights MM-SeR (refine) or simple-model checkpoint directory."""
    from captioner.modeling_mmser import MMSeRForConditionalGeneration

    # <pad>=1 and </s>=2 (bos and eos) as in OPT; <image> takes OPT's unused row 50265.
    tokenizer = word_tokenizer(50265, ["<unk>", "<pad>", "</s>"], ["<image>"])
    tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token = "<pad>", "</s>", "</s>"
    image = tokenizer.convert_tokens_to_ids("<image>")
    # Random init on the target device: seconds on a GPU, where the CPU would take minutes.
    with default_dtype(dtype), torch.device(device):
        model = MMSeRForConditionalGeneration(mmser_config(p, refine, image))
    model.save_pretrained(out)
    clip_processor(p).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def llava_parts(p: Preset, dtype: torch.dtype, device: str = "cpu") -> tuple[Any, Any]:
    """(random-weights LlavaForConditionalGeneration, LlavaProcessor), llava-hf layout."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    config = llava_config(p)
    tokenizer = word_tokenizer(LLAVA_IMAGE_TOKEN, ["<unk>", "<s>", "</s>"], ["<image>"])
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<s>", "</s>", "<unk>"
    vision = config.vision_config
    processor = LlavaProcessor(
        image_processor=clip_processor(p), tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    config._attn_implementation = "sdpa"
    with default_dtype(dtype), torch.device(device):
        model = LlavaForConditionalGeneration(config)
    return model, processor


def write_llava(out: Path, p: Preset, dtype: torch.dtype, device: str = "cpu") -> Path:
    model, processor = llava_parts(p, dtype, device)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_tag2text(
    out: Path, p: Preset, dtype: torch.dtype, device: str = "cpu"
) -> dict[str, Any]:
    """A Tag2Text `.pth` ({"model": state dict}), a 3429-line tag list and a BERT
    vocabulary; returns the `captioner.tag2text` settings that load them.

    The state dict keeps this project's module names, which `load_into` passes through
    unchanged (the official names would only add a renaming step at load time)."""
    from captioner.baseline_settings import Tag2TextSettings
    from captioner.tag2text import make_arch
    from captioner.tag2text_model import Tag2TextModel

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "|", "a", "picture", "of"]
    vocab += [f"w{i}" for i in range(len(vocab), BERT_VOCAB)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tag_list = out / "tags.txt"
    tag_list.write_text("\n".join(f"tag{i}" for i in range(TAG2TEXT_TAGS)) + "\n")
    architecture = tag2text_architecture(p)
    arch = make_arch(Tag2TextSettings(architecture=architecture), TAG2TEXT_TAGS)
    with default_dtype(dtype), torch.device(device):
        model = Tag2TextModel(arch)
    checkpoint = out / "tag2text_random.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    return {"checkpoint": str(checkpoint), "tag_list": str(tag_list), "tokenizer": str(out),
            "architecture": architecture}


