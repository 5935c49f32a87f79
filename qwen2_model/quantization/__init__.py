"""Quantized Qwen2 checkpoints (GPTQ, AWQ) and weight-only int8 at load.

- `schemes.py`: which scheme a model uses (`resolve_scheme`) and the tensor-parallel split checks.
- `packing.py`: the published GPTQ / AWQ bit layouts (unpack to load, pack to write test checkpoints).
- `linear.py`: the quantized weights a parallel linear delegates its matmul to, and their CPU kernels.

The loader calls `install(model, scheme)` on the meta-device model before reading tensors (GPTQ/AWQ
linears then read `qweight`/`qzeros`/`scales`/`g_idx` instead of `weight`) and `finalize(model)` after
(packed tensors become the kernel's format; `int8` quantizes the loaded float weights).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import KERNELS, Int8Weight, PackedWeight, QuantizedWeight
from .schemes import (QUANTIZATIONS, AWQScheme, GPTQScheme, Int8Scheme, Scheme, check_quantized_tp_split,
                      resolve_scheme)

__all__ = ["KERNELS", "QUANTIZATIONS", "AWQScheme", "GPTQScheme", "Int8Scheme", "QuantizedWeight", "Scheme",
           "check_quantized_tp_split", "finalize", "install", "resolve_scheme", "weight_bytes"]

# Our fused modules and the checkpoint modules stacked into them.
STACKED_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _parallel_linears(model: nn.Module):
    from ..parallel import ColumnParallelLinear, RowParallelLinear
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            yield name, module


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Is this linear in modules_to_not_convert? Stacked projections must agree."""
    if not skip:
        return False
    parent, leaf = name.rsplit(".", 1)
    hf_names = [f"{parent}.{n}" for n in STACKED_NAMES.get(leaf, (leaf,))]
    flags = [any(s in n for s in skip) for n in hf_names]
    if any(flags) and not all(flags):
        raise ValueError(f"modules_to_not_convert leaves some of {hf_names} in float but not all; they are "
                         f"one fused matmul here")
    return all(flags)


def install(model: nn.Module, scheme: Scheme | None, dtype: torch.dtype, kernel: str = "auto") -> None:
    """Before loading: GPTQ/AWQ linears get a PackedWeight in place of their float weight."""
    if not isinstance(scheme, (GPTQScheme, AWQScheme)):
        return
    for name, linear in _parallel_linears(model):
        if _skipped(name, scheme.skip):
            continue
        linear.quant = PackedWeight(scheme, linear.layout(), dtype, kernel=kernel, name=name)
        linear.weight = None


def finalize(model: nn.Module, scheme: Scheme | None) -> None:
    """After loading: packed weights -> kernels; with int8, float weights -> int8 per channel."""
    for _, linear in _parallel_linears(model):
        if linear.quant is not None:
            linear.quant.finalize()
        elif isinstance(scheme, Int8Scheme):
            linear.quant = Int8Weight(linear.weight.data)
            linear.weight = None


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights, quantized kernels included (for memory figures)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for _, linear in _parallel_linears(model):
        if linear.quant is not None and getattr(linear.quant, "kernel", None) is not None:
            total += linear.quant.kernel.nbytes()
    return total
