"""Settings of the reader stage (the `reader:` section of config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReaderSettings:
    # managed: the product starts a vLLM server itself; external: use `url`.
    mode: str = "managed"
    model: str = "Qwen/Qwen2.5-14B-Instruct"
    served_name: str | None = None
    url: str | None = None
    api_key: str | None = None
    port: int = 8000
    template: str = "standard"
    concurrency: int = 8
