"""Settings of the reader stage (the `reader:` section of config.yaml).

`mode: managed` starts `replicas` vLLM OpenAI-compatible servers (`qa.server.ManagedServer`)
on 127.0.0.1, ports `port`, `port + 1`, ...; `mode: external` talks to `url`, one or a list of
OpenAI-compatible servers. Several servers form one replica pool (qa.replicas).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

HOST = "127.0.0.1"  # a managed server only ever listens locally


@dataclass
class LLoViSettings:
    """How the llovi_* templates run (LLoVi's documented settings by default)."""

    # llovi_sum_q's summary: LLoVi's README runs `--num_words_in_sum 500 --temperature 1.0`.
    summary_words: int = 500
    summary_temperature: float = 1.0
    # Output limit of the summary: 500 English words are ~650-700 tokens; 1024 holds them.
    summary_max_tokens: int = 1024
    # false: the last reply's first character is the answer, as LLoVi reads it; true: the
    # last turn is asked as the constrained A-E choice (with option probabilities).
    constrained_choice: bool = False


@dataclass
class ReaderSettings:
    # managed: the product starts a vLLM server itself; external: use `url`.
    mode: Literal["managed", "external"] = "managed"
    # Hub id or local directory of the reader LLM (managed mode: what vLLM loads).
    model: str = "Qwen/Qwen2.5-14B-Instruct"
    # The model name the server exposes and requests use (null: `model`).
    served_name: str | None = None
    # External mode: the server's base URL, e.g. http://host:8000/v1, or a list of them
    # (replicas: each request goes to the one with the fewest in flight; qa.replicas).
    url: str | list[str] | None = None
    # Bearer token; managed mode also passes it to the server's --api-key.
    api_key: str | None = None
    # Managed mode: the port on 127.0.0.1 (replica i listens on port + i).
    port: int = 8000
    # Managed mode: how many servers to start, each a whole copy of the model (on a GPU
    # box, give each its own GPUs, e.g. through `env`; docs/CLUSTER.md).
    replicas: int = 1
    # Managed mode: extra environment per replica, one mapping each (or none), on top of
    # `env`: e.g. [{CUDA_VISIBLE_DEVICES: "0"}, {CUDA_VISIBLE_DEVICES: "1"}] gives each its
    # own GPU (vLLM takes gpu_memory_utilization of every GPU it sees); on CPU,
    # VLLM_CPU_OMP_THREADS_BIND per replica (vLLM's auto binding puts every server's engine
    # on the same core: seen here with 2 replicas on 2 cores).
    replica_env: list[dict[str, str]] = field(default_factory=list)
    # A replica taken out (dead, 5xx with a failing health check) is re-checked on its
    # health endpoint this often, and put back when it answers 200.
    replica_recheck_s: float = 5.0
    # Managed mode: vLLM engine arguments.
    tensor_parallel_size: int = 1
    # null: the model's own maximum. Also the context budget of the prompt (see below).
    max_model_len: int | None = 16384
    dtype: str = "auto"
    # Prompt tokens the engine schedules per step (null: vLLM's default, 2048 on CPU). A
    # 3-minute transcript is ~3k tokens: a budget below that splits every prompt over
    # several steps and batches nothing; 16384 lets several questions share a step.
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    # Any further vLLM server flags, passed through as-is (e.g. ["--enforce-eager"]).
    extra_args: list[str] = field(default_factory=list)
    # Extra environment for the server process (e.g. VLLM_CPU_KVCACHE_SPACE: "1").
    env: dict[str, str] = field(default_factory=dict)
    # Managed mode: give up when /health is not 200 after this long (loading 14B takes minutes).
    health_timeout_s: float = 900.0
    # Client: one request's limit, retries on connection errors / 5xx / timeouts, backoff base.
    request_timeout_s: float = 300.0
    max_retries: int = 3
    retry_backoff_s: float = 1.0
    # Requests in flight.
    concurrency: int = 8
    # Prompt template in qa/prompts.py: standard | summarize_then_answer | cot.
    template: str = "standard"
    # null: the template's own system line.
    system_prompt: str | None = None
    # summarize_then_answer: the length of the question-conditioned summary.
    summary_words: int = 150
    # Free-text stages (summary, chain of thought): sampling and length.
    temperature: float = 0.0
    max_tokens: int = 512
    # Constrain letter answers with vLLM structured outputs (choice A-E) + logprobs; false
    # for servers without structured outputs: the reply is then parsed as free text.
    structured_choice: bool = True
    # Context budget: tokens kept free beside the template text and the reply. Over budget,
    # consecutive captions whose word-set similarity (Jaccard) reaches `dedup_threshold`
    # merge into one line before the transcript is subsampled (qa.transcript).
    reserve_tokens: int = 1024
    dedup_threshold: float = 0.9
    # Caption digest for our templates (LLoVi's never): consecutive captions identical after
    # normalisation, or word-set similarity >= digest_similarity, become one "a-b: ..." line.
    digest: bool = True
    digest_similarity: float = 1.0
    # Option-order debiasing: ask N cyclic shifts of the options and average each option's
    # probability over them (needs the constrained choice); 1: off.
    permutations: int = 1
    # The llovi_* templates' own settings.
    llovi: LLoViSettings = field(default_factory=LLoViSettings)

    def validate(self) -> None:
        """Raise ValueError naming the key when a value is out of range."""
        self._validate_urls()
        for name in ("port", "tensor_parallel_size", "concurrency", "summary_words",
                     "replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"reader.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 256:
            raise ValueError(f"reader.max_model_len must be >= 256, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                "reader.gpu_memory_utilization must be in (0, 1], "
                f"got {self.gpu_memory_utilization}"
            )
        for name in ("dedup_threshold", "digest_similarity"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"reader.{name} must be in (0, 1], got {getattr(self, name)}")
        if not 1 <= self.permutations <= 5:
            raise ValueError(f"reader.permutations must be 1-5, got {self.permutations}")
        if self.llovi.summary_words < 1 or self.llovi.summary_max_tokens < 16:
            raise ValueError("reader.llovi.summary_words must be >= 1 and "
                             "reader.llovi.summary_max_tokens >= 16")
        for name in ("health_timeout_s", "request_timeout_s", "replica_recheck_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"reader.{name} must be > 0, got {getattr(self, name)}")
        from qa.prompts import TEMPLATES  # light; imported here to keep settings a leaf

        if self.template not in TEMPLATES:
            raise ValueError(
                f"reader.template {self.template!r} is unknown; "
                f"known: {', '.join(sorted(TEMPLATES))}"
            )
        if self.permutations > 1 and not self.asks_choice_last(TEMPLATES[self.template]):
            raise ValueError(
                f"reader.permutations {self.permutations} averages option probabilities, "
                f"which only the constrained choice gives: template {self.template!r} with "
                f"structured_choice {self.structured_choice} does not end in one"
                + (" (set reader.llovi.constrained_choice: true)"
                   if self.template.startswith("llovi_") else "")
            )
        if self.max_retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("reader.max_retries and reader.retry_backoff_s must be >= 0")

    def _validate_urls(self) -> None:
        urls = [self.url] if isinstance(self.url, str) else list(self.url or [])
        if self.mode == "external":
            if not urls or not all(u.strip() for u in urls):
                raise ValueError("reader.url is required when reader.mode is 'external': "
                                 "a base URL or a list of them")
            bases = self.base_urls
            repeated = sorted({u for u in bases if bases.count(u) > 1})
            if repeated:
                raise ValueError(f"reader.url lists {', '.join(repeated)} more than once")
            if self.replicas != 1:
                raise ValueError(
                    f"reader.replicas {self.replicas} starts managed servers; in external "
                    "mode list the replicas' URLs in reader.url (and set reader.replicas: 1)")
        if self.replica_env and len(self.replica_env) != self.replicas:
            raise ValueError(f"reader.replica_env has {len(self.replica_env)} entries for "
                             f"reader.replicas {self.replicas}: give one per replica, or none")
        if self.port + self.replicas - 1 > 65535:
            raise ValueError(f"reader.port {self.port} + reader.replicas {self.replicas} "
                             "runs past port 65535")

    def asks_choice_last(self, template: object) -> bool:
        """Whether `template`'s last stage is asked as the constrained A-E choice."""
        if not self.structured_choice:
            return False
        last = template.stages[-1]  # type: ignore[attr-defined]
        if template.family == "llovi":  # type: ignore[attr-defined]
            return self.llovi.constrained_choice
        return last.answer == "choice"

    @property
    def model_name(self) -> str:
        """The name requests send as `model`."""
        return self.served_name or self.model

    @property
    def base_urls(self) -> list[str]:
        """The OpenAI base URLs (`.../v1`) of every replica, in order."""
        if self.mode == "external":
            urls = [self.url] if isinstance(self.url, str) else list(self.url or [])
            return [u if u.endswith("/v1") else u + "/v1" for u in (u.rstrip("/") for u in urls)]
        return [f"http://{HOST}:{self.port + i}/v1" for i in range(self.replicas)]

    @property
    def base_url(self) -> str:
        """The first replica's OpenAI base URL (the only one with one replica)."""
        return self.base_urls[0]


@dataclass
class JudgeSettings:
    """The caption judge (the config's `eval_captions.judge`); it uses `reader:`'s server."""

    enabled: bool = False  # a judge needs a real instruction model in reader.model
    max_tokens: int = 200  # reply limit: a score and one sentence fit well within it
    temperature: float = 0.0  # greedy: the same reply for the same captions
    reason_max_chars: int = 300  # the schema bounds the reason, so a reply ends in time

    def validate(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"judge.max_tokens must be >= 16, got {self.max_tokens}")
        if self.reason_max_chars < 1:
            raise ValueError(f"judge.reason_max_chars must be >= 1, got {self.reason_max_chars}")
