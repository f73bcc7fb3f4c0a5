"""What the benchmarks measure with, in one place: the machine (CPU, versions, device, load;
every `make bench-*` names its machine), memory (peak RSS or torch allocation, weights) and
timing (interleaved round-robin turns with their medians, a training-step timer)."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import transformers
from transformers import TrainerCallback

from captioner.base import native_bf16_cpu


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_capability() -> str:
    """torch's name for the CPU's vector unit (AVX2, AVX512, ...): what CPU kernels run."""
    return str(torch.backends.cpu.get_cpu_capability())


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "capability": cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def ray_machine() -> dict[str, object]:
    """The machine as the decode and pipeline benchmarks report it: host, CPU, cores, load
    average at start, and the Python, decord and Ray versions."""
    import decord
    import ray

    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "decord": decord.__version__,
        "ray": ray.__version__,
    }


def machine_line() -> str:
    """One line naming the host and its CPU (a CPU-only benchmark's header)."""
    return f"{platform.node()}: {cpu_model()}, {os.cpu_count()} cores visible, no GPU"


# --- memory, load, dtype ------------------------------------------------------------------


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

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ever, not since reset


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (other jobs' load shows here)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def benchmark_dtype(requested: str, device: str) -> tuple[str, str]:
    """(dtype, why) for a timing benchmark: "auto" is bfloat16 on a GPU and on a CPU that does
    bf16 natively (AMX, AVX512-BF16), float32 elsewhere, where emulated bf16 matmuls are
    ~95x slower than float32 (docs/ARCHITECTURE.md) and would time the emulation."""
    if requested != "auto":
        return requested, "asked for"
    if device.startswith("cuda"):
        return "bfloat16", "GPU"
    if native_bf16_cpu():
        return "bfloat16", "CPU with native bf16"
    return "float32", f"CPU without native bf16 ({cpu_capability()})"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (tied weights counted once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- timing --------------------------------------------------------------------------------


@dataclass
class Turns:
    """Every turn one contender took: items done, start (s since timing began), wall and
    this process's CPU seconds, stage seconds, and the most memory a turn needed above
    what was held when it started."""

    items: list[int] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    activation_peak: int = 0  # bytes

    def take(self, run: Callable[[], tuple[float, dict[str, float]]], items: int,
             device: str, t0: float) -> None:
        """Run one turn (`run` returns its own seconds and stage seconds) and record it."""

        gc.collect()  # not inside the timed span: another contender's garbage is not ours
        reset_peak_memory(device)
        held = resident_memory(device)
        self.started.append(time.perf_counter() - t0)
        cpu = time.process_time()
        seconds, stages = run()
        self.cpu_s.append(time.process_time() - cpu)
        self.wall_s.append(seconds)
        self.items.append(items)
        self.stages.append(stages)
        self.activation_peak = max(self.activation_peak, peak_memory(device) - held)

    def median_stages(self) -> dict[str, float]:
        """Each stage's median seconds per item over the turns."""
        keys = sorted({k for s in self.stages for k in s})
        return {k: float(np.median([s.get(k, 0.0) / n
                                    for s, n in zip(self.stages, self.items, strict=True)]))
                for k in keys}


T = TypeVar("T")


def interleave(contenders: Sequence[T], steps: Sequence[Any], repeats: int,
               turn: Callable[[T, Any, float], None],
               last: Callable[[T], str]) -> list[dict[str, Any]]:
    """Round-robin timing: in each of `repeats` rounds, every step is taken by every
    contender back to back (`turn(contender, step, t0)`), so a burst of other jobs' load
    lands on all of them alike rather than on whichever ran during it. The first
    contender rotates from step to step, so none always runs right after the same one.
    Returns one record per round: its seconds and the 1-minute load average at its start;
    prints a line per round with `last(contender)` for each."""
    rounds, k, t0 = [], 0, time.perf_counter()
    for r in range(repeats):
        load, start = load_average(), time.perf_counter()
        for step in steps:
            first = k % len(contenders)
            for c in [*contenders[first:], *contenders[:first]]:
                turn(c, step, t0)
            k += 1
        seconds = time.perf_counter() - start
        rounds.append({"round": r + 1, "seconds": seconds, "load_1min": load and load[0]})
        done = ", ".join(last(c) for c in contenders)
        print(f"round {r + 1}/{repeats} ({seconds:.0f} s, load {load and load[0]}): "
              f"last step s: {done}", flush=True)
    return rounds


class StepTimer(TrainerCallback):
    """Seconds of every Trainer step after the first `warmup` (GPU work synchronised)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.times = warmup, device, []
        self.start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        self._sync()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.start)
