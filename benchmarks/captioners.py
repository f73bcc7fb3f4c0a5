"""All four captioners timed on the same frames: the paper's Time column, reproduced.

    python -m benchmarks.captioners                      # CPU quick check, depth / 4
    python -m benchmarks.captioners --device cuda        # GPU, real sizes, bf16, SDPA
    BENCH_OUT=/tmp/bench python -m benchmarks.captioners --device cuda --frames 256
    make bench-captioners ARGS="--device cuda"

Weights are random (the hub is not needed): what a captioner costs is set by its
architecture, its caption length and our implementation, not by its weights. Every
caption is exactly `--new-tokens` long (min_new_tokens == max_new_tokens, so random
weights cannot stop early), every captioner sees the same frames, the same dtype and the
same batch size (LLaVA-1.5-7B's is capped on GPU for memory). Tag2Text decodes with its
settings' beams (3, the reference's) unless `--tag2text-beams` says otherwise.

Each captioner is built through its module's real `build()`: a random-weights checkpoint
in the real format is written to a temporary folder first (llava-hf directory, MM-SeR
directory, Tag2Text `.pth`), so the timed code is exactly the product's. LLaVA-1.5-7B at
real size is built in memory instead (14 GB written and read back would eat the 5-minute
GPU budget) and wrapped in `Llava15Captioner` the way `build()` does (`--direct`).

Presets: `real` (the published sizes, the cuda default), `reduced` (every transformer
stack's layer count divided by `--depth-div`, 4 by default; widths, image sizes, token
counts and vocabularies stay real, so the relative cost structure is kept up to the
embeddings and heads; the cpu default), `tiny` (everything shrunk, for the smoke test).

Timing is built for a shared machine: all captioners are built first (once) and warmed up
on one batch each; then `--repeats` rounds (3) go over the frames step by step (a step is
`--batch-size` frames), every captioner captioning the same step back to back, the first
one rotating. Other jobs' load thus falls on all captioners alike, and each captioner's
frames/s comes from its median turn (its fastest is kept too); ratios to the simple model
come from medians of the same rounds. On the CPU torch runs 1 thread by default
(`--threads`): with 2 threads on a busy 2-core box every parallel region waits for the
thread another job descheduled, and turns of the same model varied 6-23x (1.2-1.3x with
one thread, load average ~3). The JSON records the load average at start, before and after
timing, every turn's seconds and, on the CPU, this process's CPU seconds per turn (a
cross-check ratio that other jobs' load hardly moves).

Writes captioners.json, captioners.csv and captioners.png to `--out`, else $BENCH_OUT,
else benchmarks/results; prints the table last. No caption of a random model means
anything: speed only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.captioner import machine, timed
from captioner.base import Captioner, build_captioner, parameter_counts
from captioner.settings import CaptionerSettings
from pipeline.errors import CaptionerError

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = ("llava15", "tag2text", "simple", "mmser")
EGOSCHEMA_FRAMES_PER_VIDEO = 180  # 3-minute clips at 1 fps
EGOSCHEMA_SUBSET_VIDEOS = 500
# The paper's VideoQA table (EgoSchema 500 subset), seconds of captioning.
PAPER_SECONDS = {"llava15": 29 * 60 + 20, "tag2text": 7 * 60 + 14, "simple": 4 * 60 + 53,
                 "mmser": 5 * 60 + 10}
# The goal on one H100: the paper's time / 2.5, and MM-SeR / simple <= 1.05.
GOAL_SPEEDUP = 2.5
GOAL_MMSER_RATIO = 1.05
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


# --- one captioner -------------------------------------------------------------------------


@dataclass
class Options:
    """One benchmark run (see `parse_args` for the defaults per device)."""

    device: str = "cpu"
    dtype: str = "bfloat16"
    preset: Preset = field(default_factory=lambda: Preset("reduced", 4))
    captioners: tuple[str, ...] = NAMES
    frames: int = 8
    frame_size: tuple[int, int] = (480, 640)  # (H, W), EgoSchema-like
    batch_size: int = 8
    llava_batch_size: int = 8  # LLaVA-7B's KV cache limits its batch on one GPU
    new_tokens: int = 60
    tag2text_beams: int | None = None  # None: the settings' 3 (the reference's)
    direct: tuple[str, ...] = ()  # built in memory, not through a checkpoint and build()
    warmup_frames: int = 2
    repeats: int = 3  # interleaved rounds over all frames; frames/s from the median turn
    # torch intra-op threads (None: torch's default). On a shared CPU box 1: with 2 threads
    # every parallel region waits for whichever thread another job has descheduled.
    threads: int | None = None
    seed: int = 0


def settings_for(opts: Options) -> CaptionerSettings:
    settings = CaptionerSettings(device=opts.device, dtype=opts.dtype,
                                 batch_size=opts.batch_size)
    settings.generation.max_new_tokens = opts.new_tokens
    settings.generation.min_new_tokens = opts.new_tokens  # random weights cannot stop early
    settings.mmser.refine_steps = 1  # the paper's setting
    # A random model's refinement repeats its coarse caption, so a verified draft would
    # make MM-SeR look nearly free; time every refined token instead (bench-captioner has
    # the drafted figures and what they cost at a given agreement).
    settings.mmser.draft_tokens = 0
    if opts.tag2text_beams is not None:
        settings.tag2text.num_beams = opts.tag2text_beams
    return settings


def make_captioner(name: str, opts: Options, tmp: Path) -> tuple[Captioner, str]:
    """Captioner `name` with random weights, and how it was built."""
    dtype = getattr(torch, opts.dtype)
    settings = settings_for(opts)
    if name == "llava15" and name in opts.direct:
        from captioner.llava15 import Llava15Captioner

        model, processor = llava_parts(opts.preset, dtype, opts.device)
        model.to(opts.device)  # a no-op unless some buffer was made on the CPU
        g = settings.generation
        captioner = Llava15Captioner(
            model.eval(), processor, settings.llava15, prompt=g.prompt,
            max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens,
            num_beams=g.num_beams, device=opts.device, dtype=opts.dtype,
            fingerprint="random-weights",
        )
        return captioner, "in memory, wrapped in Llava15Captioner as build() does"
    if name in opts.direct:
        raise CaptionerError(f"--direct supports llava15 only, not {name!r}")
    folder, p = tmp / name, opts.preset
    kwargs: dict[str, Any] = {"device": opts.device, "dtype": opts.dtype}
    if name in ("simple", "mmser"):
        refine = name == "mmser"
        kwargs["checkpoint"] = str(write_mmser(folder, p, refine, dtype, opts.device))
    elif name == "llava15":
        kwargs["checkpoint"] = str(write_llava(folder, p, dtype, opts.device))
    elif name == "tag2text":
        files = write_tag2text(folder, p, dtype, opts.device)
        settings.tag2text.architecture = files.pop("architecture")
        kwargs.update(files)
    else:
        raise CaptionerError(f"unknown captioner {name!r}; known: {', '.join(NAMES)}")
    gc.collect()  # the checkpoint's model is gone before build() loads it back
    return build_captioner(settings, name, **kwargs), "checkpoint on disk -> module build()"


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # Linux: 5 resets the process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def _proc_status_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def resident_memory(device: str) -> int:
    """Bytes held now: allocated by torch on a GPU, the process's RSS on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    return _proc_status_bytes("VmRSS:") or 0


def peak_memory(device: str) -> int:
    """Peak bytes since the last `reset_peak_memory`, counted as `resident_memory` is."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    peak = _proc_status_bytes("VmHWM:")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ever, not since reset


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (tied weights counted once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def beams(captioner: Captioner) -> int:
    """Beams the captioner decodes with (MM-SeR keeps them in its GenerationConfig)."""
    if hasattr(captioner, "num_beams"):
        return captioner.num_beams
    return captioner.generation.num_beams


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (other jobs' load shows here)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


# --- interleaved timing --------------------------------------------------------------------


@dataclass
class Contender:
    """One built captioner and every turn it took (one turn: the same step of frames that
    every other captioner also captions in that round)."""

    name: str
    captioner: Captioner
    how: str
    build_s: float
    batch: int  # its batch size: a step of `batch_size` frames is 1+ of its batches
    weights: int  # bytes
    frames: list[int] = field(default_factory=list)  # per turn
    started: list[float] = field(default_factory=list)  # per turn: s since timing began
    wall_s: list[float] = field(default_factory=list)  # per turn
    cpu_s: list[float] = field(default_factory=list)  # per turn: this process's CPU time
    stages: list[dict[str, float]] = field(default_factory=list)  # per turn
    activation_peak: int = 0  # bytes above what was held when a turn started, max over turns


def build_contender(name: str, opts: Options, tmp: Path) -> Contender:
    """Build captioner `name` through `make_captioner`, once, for every round."""
    gc.collect()
    start = time.perf_counter()
    captioner, how = make_captioner(name, opts, tmp)
    build_s = time.perf_counter() - start
    gc.collect()  # the checkpoint-writing model is freed before the next build
    batch = min(opts.batch_size, opts.llava_batch_size) if name == "llava15" else opts.batch_size
    return Contender(name, captioner, how, build_s, batch, weight_bytes(captioner.model))


def take_turn(c: Contender, frames: np.ndarray, device: str, t0: float) -> None:
    """Caption `frames` (N, H, W, 3) with `c` in its batches; record wall and CPU seconds,
    stage seconds and the memory it needed above what was already held."""
    gc.collect()  # not inside the timed span: another captioner's garbage is not ours
    reset_peak_memory(device)
    held = resident_memory(device)
    c.started.append(time.perf_counter() - t0)
    cpu = time.process_time()
    seconds, stages, _ = timed(c.captioner, frames, c.batch)
    c.cpu_s.append(time.process_time() - cpu)
    c.wall_s.append(seconds)
    c.frames.append(len(frames))
    c.stages.append(stages)
    c.activation_peak = max(c.activation_peak, peak_memory(device) - held)


def interleave(contenders: list[Contender], frames: np.ndarray, opts: Options) -> list[dict]:
    """Round-robin timing: in each of `opts.repeats` rounds, every step of `batch_size`
    frames is captioned by every captioner back to back, so a burst of other jobs' load
    lands on all of them alike rather than on whichever ran during it. The starting
    captioner rotates from step to step, so none always runs right after the same one.
    Returns one record per round: its seconds and the 1-minute load average at its start."""
    step = min(opts.batch_size, len(frames))
    rounds, turn, t0 = [], 0, time.perf_counter()
    for r in range(opts.repeats):
        load, start = load_average(), time.perf_counter()
        for i in range(0, len(frames), step):
            k = turn % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                take_turn(c, frames[i : i + step], opts.device, t0)
            turn += 1
        seconds = time.perf_counter() - start
        rounds.append({"round": r + 1, "seconds": seconds, "load_1min": load and load[0]})
        done = ", ".join(f"{c.name} {c.wall_s[-1]:.2f}" for c in contenders)
        print(f"round {r + 1}/{opts.repeats} ({seconds:.0f} s, load {load and load[0]}): "
              f"last step s: {done}", flush=True)
    return rounds


def median_stages(stages: list[dict[str, float]], frames: list[int]) -> dict[str, float]:
    """Each stage's median seconds per frame over the turns."""
    keys = sorted({k for s in stages for k in s})
    return {k: float(np.median([s.get(k, 0.0) / n for s, n in zip(stages, frames, strict=True)]))
            for k in keys}


def result_row(c: Contender, opts: Options) -> dict[str, Any]:
    """One captioner's row: frames/s from its median seconds per frame over all turns."""
    per_frame = np.array(c.wall_s) / np.array(c.frames)
    median, best = float(np.median(per_frame)), float(per_frame.min())
    fps = 1 / median
    step = max(c.frames)
    row = {
        "captioner": c.name,
        "frames": step,  # one step; every turn of every round captions a step
        "turns": len(c.wall_s),
        "batch_size": c.batch,
        "num_beams": beams(c.captioner),
        "step_s": c.wall_s,  # wall seconds per turn, in order
        "turn_started_s": c.started,  # seconds after timing began
        "median_step_s": median * step,
        "min_step_s": best * step,
        "spread": float(per_frame.max() / best),  # slowest turn / fastest: the noise seen
        "frames_per_s": fps,
        "frames_per_s_best": 1 / best,
        "s_per_video": EGOSCHEMA_FRAMES_PER_VIDEO / fps,
        "egoschema500_s": EGOSCHEMA_SUBSET_VIDEOS * EGOSCHEMA_FRAMES_PER_VIDEO / fps,
        "params_benchmarked": sum(p.numel() for p in c.captioner.model.parameters()),
        "params_real": parameter_counts(settings_for(opts), c.name)["total"],
        "weights_bytes": c.weights,
        "activation_peak_bytes": c.activation_peak,
        "peak_memory_bytes": c.weights + c.activation_peak,
        "build_s": c.build_s,
        "build_path": c.how,
        "stages_s_per_frame": median_stages(c.stages, c.frames),
        "paper_s": PAPER_SECONDS[c.name],
    }
    if not opts.device.startswith("cuda"):  # on a GPU the CPU mostly waits: not a cost
        cpu_per_frame = np.array(c.cpu_s) / np.array(c.frames)
        row["cpu_step_s"] = c.cpu_s
        row["median_cpu_step_s"] = float(np.median(cpu_per_frame)) * step
    return row


def ratios(rows: dict[str, dict[str, Any]], key: str) -> dict[str, float | None]:
    """Each captioner's `key` (seconds per step, same step for all) / the simple model's."""
    simple = rows.get("simple")
    return {n: r[key] / simple[key] if simple and key in r else None for n, r in rows.items()}


MEMORY_KIND = {
    "cuda": "weights + peak torch.cuda allocation above what was held at each turn's start",
    "cpu": "weights + peak RSS growth in a turn (VmHWM - VmRSS; memory reused from freed "
           "blocks is not seen)",
}


# --- the run -------------------------------------------------------------------------------


def run(opts: Options, out_dir: Path) -> dict[str, Any]:
    """Build every captioner in `opts.captioners` once, warm each up on one batch, then time
    them interleaved on the same frames for `opts.repeats` rounds; write JSON, CSV, PNG."""
    unknown = [n for n in opts.captioners if n not in NAMES]
    if unknown:
        raise CaptionerError(f"unknown captioners {unknown}; known: {', '.join(NAMES)}")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if opts.repeats < 1:
        raise CaptionerError(f"--repeats must be >= 1, got {opts.repeats}")
    sizes = size_summary(opts.preset)  # before the long part: a broken import fails fast
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    frames = rng.integers(0, 256, (opts.frames, *opts.frame_size, 3), dtype=np.uint8)
    load = {"at_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="bench-captioners-") as tmp:
        contenders = []
        for name in opts.captioners:
            contenders.append(build_contender(name, opts, Path(tmp)))
            print(f"{name}: built in {contenders[-1].build_s:.1f} s", flush=True)
    for c in contenders:
        # Warm-up (allocator, kernels, lazy init), not timed; never more than one batch.
        c.captioner.caption_batch(frames[: max(1, min(opts.warmup_frames, c.batch, len(frames)))])
    load["before_timing"] = load_average()
    rounds = interleave(contenders, frames, opts)
    load["after_timing"] = load_average()
    rows = {c.name: result_row(c, opts) for c in contenders}
    del contenders
    gc.collect()

    paper_ratios = {n: PAPER_SECONDS[n] / PAPER_SECONDS["simple"] for n in NAMES}
    medians = ratios(rows, "median_step_s")
    for name, row in rows.items():
        row["ratio_to_simple"] = medians[name]
        row["paper_ratio_to_simple"] = paper_ratios[name]
        row["goal_s"] = PAPER_SECONDS[name] / GOAL_SPEEDUP
    real_gpu = opts.device.startswith("cuda") and opts.preset.name == "real"
    goals = None
    if real_gpu:
        goals = {n: r["egoschema500_s"] <= r["goal_s"] for n, r in rows.items()}
        if medians.get("mmser") is not None:
            goals["mmser_over_simple"] = medians["mmser"] <= GOAL_MMSER_RATIO
    result = {
        "machine": {**machine(torch.device(opts.device)),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "options": {**asdict(opts), "preset": opts.preset.name},
        "sizes": sizes,
        "captioners": rows,
        # Medians of the same interleaved rounds: the headline figures.
        "ratios_to_simple": medians,
        # Cross-checks: the fastest turns' ratio, and (CPU) this process's CPU time's ratio.
        "ratios_to_simple_min": ratios(rows, "min_step_s"),
        "ratios_to_simple_cpu_time": ratios(rows, "median_cpu_step_s")
        if not opts.device.startswith("cuda") else None,
        "paper_ratios_to_simple": paper_ratios,
        "paper_seconds": PAPER_SECONDS,
        "goals_met": goals,  # only for real sizes on a GPU: the goals
        "load_average": load,  # 1, 5, 15 minutes
        "rounds": rounds,
        "timing": "interleaved round-robin; per captioner the median over all turns",
        "peak_memory_kind": MEMORY_KIND["cuda" if opts.device.startswith("cuda") else "cpu"],
        "note": "random weights, speed only; fixed caption length; "
                + ("real sizes" if opts.preset.name == "real" else
                   f"preset {opts.preset.name}: absolute times are not the product's"),
    }
    write_outputs(result, out_dir)
    return result


CSV_COLUMNS = ("captioner", "frames", "turns", "batch_size", "num_beams", "median_step_s",
               "min_step_s", "spread", "frames_per_s", "frames_per_s_best", "s_per_video",
               "egoschema500_s", "params_benchmarked", "params_real", "peak_memory_bytes",
               "ratio_to_simple", "paper_ratio_to_simple", "paper_s", "goal_s", "build_path")


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "captioners.json").write_text(json.dumps(result, indent=2, default=str))
    with open(out_dir / "captioners.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["captioners"].values())
    try:
        plot(result, out_dir / "captioners.png")
    except ImportError as exc:  # a bare CUDA image may lack matplotlib: keep the numbers
        print(f"no captioners.png: {exc} (pip install matplotlib)", flush=True)


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels: projected EgoSchema-500 minutes, and time ratios to the simple model
    next to the paper's."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rows = result["captioners"]
    names = list(rows)
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(x - 0.2, [rows[n]["egoschema500_s"] / 60 for n in names], 0.4, label="measured")
    left.bar(x + 0.2, [rows[n]["paper_s"] / 60 for n in names], 0.4, label="paper")
    left.set_yscale("log")
    left.set_ylabel("minutes, EgoSchema 500 at 1 fps (projected)")
    ratios = result["ratios_to_simple"]
    right.bar(x - 0.2, [ratios[n] or 0 for n in names], 0.4, label="measured")
    right.bar(x + 0.2, [rows[n]["paper_ratio_to_simple"] for n in names], 0.4, label="paper")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_ylabel("time / simple model's")
    for axis in (left, right):
        axis.set_xticks(x, names)
        axis.legend()
    m = result["machine"]
    fig.suptitle(f"{m.get('gpu') or m['cpu']} | {result['options']['dtype']} | "
                 f"preset {result['options']['preset']} | {result['note'].split(';')[0]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    """The results as a plain-text table, machine, sizes and timing method first."""
    m, o, s = result["machine"], result["options"], result["sizes"]
    rows, load = result["captioners"], result["load_average"]
    turns = {r["turns"] for r in rows.values()}
    cpu_ratios = result["ratios_to_simple_cpu_time"]
    lines = [
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), GPU "
        f"{m.get('gpu') or 'none'}, device {m['device']}, torch {m['torch']}, "
        f"transformers {m['transformers']}",
        f"{o['dtype']}, preset {o['preset']} (depth / {s['depth_div']}), {o['frames']} frames "
        f"{o['frame_size'][0]}x{o['frame_size'][1]}, {o['new_tokens']} new tokens "
        f"(min = max), batch {o['batch_size']} "
        f"(llava15 {min(o['batch_size'], o['llava_batch_size'])})",
        f"layers: CLIP {s['clip']['layers']}, OPT {s['opt']['layers']}, SeR-Connector "
        f"{s['ser_connector']['layers']}, Llama {s['llama']['layers']}, Swin "
        f"{s['tag2text']['swin_depths']}, BERT {s['tag2text']['bert_layers']}, tag head "
        f"{s['tag2text']['tag_head_layers']}",
        f"timing: {o['repeats']} interleaved rounds, {'/'.join(map(str, sorted(turns)))} turns "
        f"per captioner, median turn; load average (1/5/15 min) {fmt_load(load['at_start'])} "
        f"at start, {fmt_load(load['before_timing'])} before timing, "
        f"{fmt_load(load['after_timing'])} after",
        "",
        f"{'captioner':<9} {'params':>8} {'real':>7} {'beams':>5} {'med s':>7} {'min s':>7} "
        f"{'spread':>6} {'frames/s':>9} {'s/video':>8} {'ES-500':>9} {'peak GB':>8} "
        f"{'ratio':>6} {'r min':>6}" + (f" {'r cpu':>6}" if cpu_ratios else "")
        + f" {'paper':>6} {'paper t':>8}" + (f" {'goal':>8}" if result["goals_met"] else ""),
    ]
    for name, r in rows.items():
        line = (
            f"{name:<9} {r['params_benchmarked'] / 1e6:>7.1f}M {r['params_real'] / 1e9:>6.2f}B "
            f"{r['num_beams']:>5} {r['median_step_s']:>7.2f} {r['min_step_s']:>7.2f} "
            f"{r['spread']:>6.2f} {r['frames_per_s']:>9.3f} {r['s_per_video']:>8.1f} "
            f"{minutes(r['egoschema500_s']):>9} {r['peak_memory_bytes'] / 2**30:>8.2f} "
            f"{fmt_ratio(r['ratio_to_simple']):>6} "
            f"{fmt_ratio(result['ratios_to_simple_min'][name]):>6}"
        )
        if cpu_ratios:
            line += f" {fmt_ratio(cpu_ratios[name]):>6}"
        line += f" {r['paper_ratio_to_simple']:>6.3f} {minutes(r['paper_s']):>8}"
        if result["goals_met"]:
            ok = result["goals_met"][name]
            line += f" {minutes(r['goal_s']):>7}{'+' if ok else '-'}"
        lines.append(line)
    lines.append("med s / min s: median / fastest wall seconds of one turn (the same frames "
                 "for all); spread: slowest turn / fastest; frames/s from the median")
    lines.append("ES-500: projected captioning time for EgoSchema's 500-video subset at 1 fps "
                 "(90000 frames); ratio: median time / the simple model's (r min: fastest "
                 "turns'" + ("; r cpu: this process's CPU seconds'" if cpu_ratios else "")
                 + "); paper: 29m20s, 7m14s, 4m53s, 5m10s")
    if result["goals_met"]:
        lines.append(f"goal (paper / {GOAL_SPEEDUP}; + met, - missed); MM-SeR / simple <= "
                     f"{GOAL_MMSER_RATIO}: {result['goals_met'].get('mmser_over_simple')}")
    return "\n".join(lines)


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}"


def fmt_load(load: list[float] | None) -> str:
    return "?" if load is None else "/".join(f"{x:.2f}" for x in load)


def minutes(seconds: float) -> str:
    """29m20s; 6h08m from an hour up."""
    whole = round(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, Path]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--preset", choices=["real", "reduced", "tiny"], default=None,
                        help="default: reduced on cpu, real on cuda")
    parser.add_argument("--depth-div", type=int, default=4,
                        help="reduced preset: layers of every stack divided by this")
    parser.add_argument("--captioners", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--frames", type=int, default=None, help="default: 8 cpu, 512 cuda")
    parser.add_argument("--frame-size", type=int, nargs=2, default=[480, 640],
                        metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 cpu, 128 cuda")
    parser.add_argument("--llava-batch-size", type=int, default=None,
                        help="cap on LLaVA-1.5's batch (default: 8 cpu, 64 cuda)")
    parser.add_argument("--new-tokens", type=int, default=60, help="fixed caption length")
    parser.add_argument("--tag2text-beams", type=int, default=None,
                        help="default: Tag2Text's settings (3 beams, the reference's)")
    parser.add_argument("--direct", nargs="*", default=None, choices=["llava15"],
                        help="build in memory, not via a checkpoint (default: llava15 at "
                             "real size on cuda)")
    parser.add_argument("--warmup-frames", type=int, default=None,
                        help="frames captioned before timing (default: 2 cpu, 16 cuda)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds over all frames; frames/s from the median turn")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on cpu, which keeps other jobs' load "
                             "from stalling every parallel region; torch's default on cuda)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the files (default: $BENCH_OUT or benchmarks/results)")
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda")
    name = args.preset or ("real" if cuda else "reduced")
    preset = Preset("reduced", args.depth_div) if name == "reduced" else PRESETS[name]
    direct = args.direct
    if direct is None:
        direct = ["llava15"] if cuda and name == "real" else []
    opts = Options(
        device=args.device,
        dtype=args.dtype,
        preset=preset,
        captioners=tuple(args.captioners),
        frames=args.frames or (512 if cuda else 8),
        frame_size=tuple(args.frame_size),
        batch_size=args.batch_size or (128 if cuda else 8),
        llava_batch_size=args.llava_batch_size or (64 if cuda else 8),
        new_tokens=args.new_tokens,
        tag2text_beams=args.tag2text_beams,
        direct=tuple(direct),
        warmup_frames=args.warmup_frames or (16 if cuda else 2),
        repeats=args.repeats,
        threads=args.threads if args.threads is not None else (None if cuda else 1),
    )
    out = args.out or Path(os.environ.get("BENCH_OUT") or RESULTS)
    return opts, out


def main(argv: Sequence[str] | None = None) -> None:
    opts, out = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would bury the table
    if opts.device.startswith("cuda"):
        # TF32 for any float32 matmul left; bf16 work is unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
    result = run(opts, out)
    print(f"\nwrote {out / 'captioners.json'}, captioners.csv, captioners.png\n")
    print(table(result))


if __name__ == "__main__":
    main()
