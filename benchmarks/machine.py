"""What the benchmarks report about the machine: the CPU, versions, device, memory and load,
in one place (every `make bench-*` names its machine)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch
import transformers

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
