"""Helpers for the reader tests: tiny-reader settings, synthetic questions, free ports."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from pipeline.records import FrameCaption, Question, Transcript
from qa.settings import ReaderSettings

WORDS = (
    "the man woman picks up cuts onion with a knife on table walks to door opens fridge "
    "washes dish in sink pours water into cup reads book sits down"
).split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 all free now (managed replica i listens on port + i)."""
    for _ in range(100):
        base = free_port()
        if base + n - 1 > 65535:
            continue
        socks = []
        try:
            for port in range(base + 1, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError(f"no run of {n} free ports found")


def tiny_settings(model_dir: Path, **overrides: object) -> ReaderSettings:
    """Managed-mode settings serving the tiny model on vLLM CPU (docs/ARCHITECTURE.md's flags)."""
    values: dict[str, object] = {
        "model": str(model_dir),
        "served_name": "tiny-reader",
        "port": free_port(),
        "max_model_len": 2048,
        "extra_args": ["--enforce-eager"],
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "health_timeout_s": 300.0,
        "request_timeout_s": 60.0,
        "max_retries": 2,
        "retry_backoff_s": 0.2,
        "reserve_tokens": 64,
        "max_tokens": 16,
    }
    values.update(overrides)
    settings = ReaderSettings(**values)  # type: ignore[arg-type]
    settings.validate()
    return settings


def make_items(
    n: int, num_captions: int = 20, seed: int = 0, prefix: str = "q"
) -> list[tuple[Question, Transcript]]:
    """`n` distinct questions, each with its own transcript of `num_captions` 1-s captions."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        video_id = f"{prefix}-video-{i}"
        captions = [
            FrameCaption(float(t), " ".join(rng.choice(WORDS) for _ in range(10)))
            for t in range(num_captions)
        ]
        options = tuple(" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(5))
        question = Question(
            q_uid=f"{prefix}{i}",
            video_id=video_id,
            question="What is the main activity of the person in the video?",
            options=options,
            answer=i % 5,
        )
        items.append((question, Transcript(video_id, float(num_captions), captions)))
    return items
