"""Decode-step linears through oneDNN with the weight reordered once (CPU, float32).

A greedy decode step multiplies a few rows (one per frame of the batch) by every weight
matrix of the language model. MKL's sgemm runs such skinny products at about half its
large-matrix rate on an AVX2 CPU; oneDNN with the weight prepacked into its own blocked
layout runs them faster (2-core AMD EPYC, 32 rows: OPT's LM head [768 x 50272] 61 -> 29 ms,
fc1 [768 x 3072] 2.1 -> 1.35 ms). With many rows (a prefill, the vision tower) plain
F.linear is as fast or faster, so those keep it, as does anything that needs a gradient.

Written by hand because torch packs weights like this only inside inductor's freezing pass
(`torch.compile`), which compiles once per batch shape and cache length.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Inputs with at most this many rows take the packed path (a decode step at batch 32 has
# 32; a verified 8-token draft 288). At 600 rows and more F.linear measured as fast.
MAX_PACKED_ROWS = 512


def packing_available() -> bool:
    """Whether this torch build has oneDNN and the packed-linear operators."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def packing_applies(setting: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    """`captioner.packed_linears` resolved: null means float32 on a CPU, where it measured
    faster; true asks for it wherever the operators exist (it only ever runs on CPU)."""
    if not packing_available():
        return False
    if setting is None:
        return device.type == "cpu" and dtype == torch.float32
    return setting


class PackedDecodeLinear(nn.Linear):
    """An nn.Linear (the same parameters, the same state-dict keys) whose forward takes the
    packed oneDNN path for few-row float32 CPU inputs without gradients, else F.linear.

    The packed copy is made at the first such call and again whenever the weight changed in
    place since (an optimizer step bumps its version), so it never lags the weight.
    """

    _packed: torch.Tensor | None
    _packed_version: int

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedDecodeLinear:
        """Wrap `linear`'s own Parameter objects (ties with other modules stay)."""
        if linear._forward_pre_hooks or linear._forward_hooks:
            raise ValueError("cannot repack a linear that has forward hooks: they would be lost")
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.weight = linear.weight
        packed.bias = linear.bias
        packed._packed, packed._packed_version = None, -1
        return packed

    def _packed_weight(self) -> torch.Tensor:
        version = self.weight._version
        if self._packed is None or self._packed_version != version:
            with torch.no_grad():
                # The hint is the row count oneDNN lays the weight out for.
                self._packed = torch.ops.mkldnn._reorder_linear_weight(
                    self.weight.detach(), 32
                )
            self._packed_version = version
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if (
            rows <= MAX_PACKED_ROWS
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.compiler.is_compiling()  # inductor packs (or not) by itself
        ):
            return torch.ops.mkldnn._linear_pointwise(
                x, self._packed_weight(), self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)

    def __getstate__(self) -> dict[str, Any]:
        # A oneDNN tensor does not pickle or deep-copy; the copy packs its own on first use.
        state = self.__dict__.copy()
        state["_packed"], state["_packed_version"] = None, -1
        return state


def pack_decode_linears(model: nn.Module, paths: Iterable[str]) -> int:
    """Replace every plain nn.Linear at or under each dotted `path` of `model` (e.g.
    "model.language_model", "lm_head") by a PackedDecodeLinear over the same parameters.
    Idempotent; returns how many were replaced."""
    replaced = 0
    for path in paths:
        target = model.get_submodule(path)
        if type(target) is nn.Linear:
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), name, PackedDecodeLinear.from_linear(target))
            replaced += 1
            continue
        for parent in list(target.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedDecodeLinear.from_linear(child))
                    replaced += 1
    return replaced


__all__ = [
    "MAX_PACKED_ROWS",
    "PackedDecodeLinear",
    "pack_decode_linears",
    "packing_applies",
    "packing_available",
]
