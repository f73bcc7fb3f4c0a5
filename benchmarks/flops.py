"""Floating-point operations a captioner executes per frame, counted by torch.

Wall-clock on a shared machine drifts; the operations a batch executes do not. Counting them
for the simple model and for MM-SeR on the same frames gives the refinement's cost as a
machine-independent ratio: on hardware where captioning is compute-bound (this CPU), the
time ratio cannot fall below it.

torch's FlopCounterMode counts matmuls, convolutions and the CUDA attention kernels; the CPU
flash-attention kernel that SDPA picks here has no formula, so one is registered below (the
same count torch uses for the CUDA kernels). Attention over a static KV cache is counted at
its full length, masked slots included, because that is what the kernel computes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_flop_count,
)

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
# The decode steps' linears on prepacked weights (captioner/packed_linear.py).
_PACKED_LINEAR = torch.ops.mkldnn._linear_pointwise


def _register_cpu_formulas() -> None:
    if _CPU_SDPA not in flop_registry:

        @register_flop_formula(_CPU_SDPA)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if _PACKED_LINEAR not in flop_registry:  # the default overload (x, weight, bias, ...)

        @register_flop_formula(_PACKED_LINEAR)
        def _packed_linear_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs):
            rows = math.prod(input_shape[:-1])  # weight (out, in), as nn.Linear keeps it
            return 2 * rows * weight_shape[0] * weight_shape[1]


def caption_flops(captioner, frames: np.ndarray) -> dict[str, float]:
    """Run `captioner.caption_batch(frames)` once under torch's FLOP counter.

    Returns `total` and `per_frame` FLOPs, and the shares of the SeR-Connector
    (`connector`, 0 for the simple model), the LM head (`lm_head`) and attention kernels
    (`attention`). `captioner` is an MMSeRCaptioner.
    """
    _register_cpu_formulas()
    model = captioner.model
    # FlopCounterMode tracks modules with autograd hooks, which fail on parameters that
    # require grad inside inference_mode; inference never needs their gradients.
    grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            captioner.caption_batch(frames)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grad[name])
    by_module = counter.get_flop_counts()

    def module_flops(suffix: str) -> int:
        return sum(sum(ops.values()) for name, ops in by_module.items() if name.endswith(suffix))

    total = counter.get_total_flops()
    return {
        "total": total,
        "per_frame": total / len(frames),
        "connector": module_flops(".ser_connector"),
        "lm_head": module_flops(".lm_head"),
        "attention": sum(
            n for op, n in by_module["Global"].items() if "scaled_dot_product" in str(op)
        ),
    }


__all__ = ["caption_flops"]
