"""Quantized weights of the parallel linears: what a linear delegates `x W^T` to.

A `ColumnParallelLinear` / `RowParallelLinear` (qwen2_model/parallel.py) has `quant = None` and a
float `weight`, or a `QuantizedWeight` here that owns the weight instead (its `weight` is then None).
The linear calls `quant(x, bias)`; LoRA deltas and all-reduces stay in the linear.

- `PackedWeight` (GPTQ / AWQ checkpoints): parameters in the published layout (`qweight`, `qzeros`,
  `scales`, GPTQ's `g_idx`) sized for this rank's shard; `load` reads only this rank's columns
  (column-parallel: output channels, per stacked sub-matrix) or rows (row-parallel: input rows, on
  group boundaries). `finalize()`, once everything is loaded, turns them into one of the kernels:
  - `int4`: torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), weights kept packed at 4 bits
    (0.5 byte per weight + scales). act-order (`desc_act`) rows are permuted once at load so groups are
    contiguous, and the input is permuted the same way at each call.
  - `int8`: `_weight_int8pack_mm` for 8-bit per-channel weights with a symmetric zero (q - 128).
  - `dequant`: the float weight in the model dtype (any bits, group size, zero point; most memory).
  `kernel="auto"` picks `int4` / `int8` where they fit (CPU, bfloat16 compute, shapes the kernel
  accepts), else `dequant`: with float32 activations torch's packed CPU kernels measured several times
  slower than a float32 matmul here (benchmarks/README.md), so they are only chosen for bf16 or forced
  with `kernel="packed"`.
- `Int8Weight` (`--quantization int8`): a float weight quantized at load to int8, one scale per output
  channel (max |w| / 127), computed with `_weight_int8pack_mm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import packing
from .schemes import AWQScheme, GPTQScheme

KERNELS = ("auto", "dequant", "packed")
INT4_GROUPS = (256, 128, 64, 32)  # group sizes torch's CPU int4 kernel takes


@dataclass(frozen=True)
class OutputShard:
    """One stacked sub-matrix of a column-parallel linear (q, k, v / gate, up), or the whole output."""
    shard_id: str | None
    full: int  # output channels of the checkpoint tensor
    local: int  # channels this rank keeps
    start: int  # first kept channel in the checkpoint tensor
    offset: int  # where they go in this rank's stacked output


@dataclass(frozen=True)
class LinearLayout:
    """What a parallel linear keeps of a [out, in] weight. Column-parallel: all inputs, a slice of
    each output shard. Row-parallel: all outputs, input rows [in_start, in_start + in_local)."""
    in_full: int
    in_local: int
    in_start: int
    shards: tuple[OutputShard, ...]

    @property
    def out_local(self) -> int:
        return sum(s.local for s in self.shards)

    def shard(self, shard_id) -> OutputShard:
        for s in self.shards:
            if s.shard_id == shard_id:
                return s
        raise KeyError(shard_id)


def _read(tensor: Any, dim: int, start: int, stop: int) -> torch.Tensor:
    """[start, stop) along dim 0 or 1 of a tensor or lazy safetensors slice (only those bytes read)."""
    return tensor[start:stop] if dim == 0 else tensor[:, start:stop]


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


class QuantizedWeight(nn.Module):
    """Base class: `forward(x [..., in_local], bias) -> [..., out_local]`."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self) -> None:
        """Called once after all tensors are loaded."""


class PackedWeight(QuantizedWeight):
    """A GPTQ or AWQ weight (see the module docstring)."""

    def __init__(self, scheme: GPTQScheme | AWQScheme, layout: LinearLayout, dtype: torch.dtype,
                 kernel: str = "auto", name: str = ""):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"quantized kernel must be one of {KERNELS}, got {kernel!r}")
        self.scheme, self.layout, self.dtype, self.kernel_choice, self.name = scheme, layout, dtype, kernel, name
        self.gptq = isinstance(scheme, GPTQScheme)
        self.bits = scheme.bits
        self.pack = packing.pack_factor(scheme.bits)
        self.group = scheme.group_size if scheme.group_size != -1 else layout.in_full
        L = layout
        row_split = L.in_local != L.in_full
        for s in L.shards:
            if s.local % self.pack or s.offset % self.pack or s.start % self.pack:
                raise ValueError(f"{name}: {s.local} output channels per rank is not a multiple of {self.pack} "
                                 f"({scheme.name} {self.bits}-bit packs {self.pack} per int32)")
        if L.in_local % self.pack:
            raise ValueError(f"{name}: {L.in_local} input rows per rank is not a multiple of {self.pack}")
        if row_split and scheme.group_size != -1 and L.in_local % self.group:
            raise ValueError(f"{name}: {L.in_full} input rows over {L.in_full // L.in_local} ranks gives "
                             f"{L.in_local} per rank, which does not split on {scheme.name} group boundaries "
                             f"(group_size {scheme.group_size})")
        self.groups_full = -(-L.in_full // self.group)
        # Row-parallel act-order: local rows reference any group, so keep all groups' scales/zeros.
        self.all_groups = not row_split or scheme.group_size == -1 or (self.gptq and scheme.desc_act)
        self.g_start = 0 if self.all_groups else L.in_start // self.group
        G = self.groups_full if self.all_groups else L.in_local // self.group
        out = L.out_local
        meta = dict(device="meta")
        qweight_shape = (L.in_local // self.pack, out) if self.gptq else (L.in_local, out // self.pack)
        self.qweight = nn.Parameter(torch.empty(qweight_shape, dtype=torch.int32, **meta), requires_grad=False)
        self.qzeros = nn.Parameter(torch.empty(G, out // self.pack, dtype=torch.int32, **meta), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(G, out, dtype=torch.float32, **meta), requires_grad=False)
        self.g_idx = nn.Parameter(torch.empty(L.in_local, dtype=torch.int32, **meta), requires_grad=False) \
            if self.gptq else None
        self._g_idx_loaded: dict = {}
        self.kernel = None  # set by finalize

    # --- loading ------------------------------------------------------------------------------

    def params(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(required, optional) checkpoint parameter names; GPTQ's g_idx is optional without act-order."""
        if not self.gptq:
            return ("qweight", "qzeros", "scales"), ()
        if self.scheme.desc_act:
            return ("qweight", "qzeros", "scales", "g_idx"), ()
        return ("qweight", "qzeros", "scales"), ("g_idx",)

    def load(self, param: str, shard_id, tensor: Any) -> None:
        from ..parallel import ShapeMismatch

        L, s = self.layout, self.layout.shard(shard_id)
        p = self.pack
        if param == "g_idx":
            expected = (L.in_full,)
        elif param == "qweight":
            expected = (L.in_full // p, s.full) if self.gptq else (L.in_full, s.full // p)
        elif param == "qzeros":
            expected = (self.groups_full, s.full // p)
        else:
            expected = (self.groups_full, s.full)
        if _shape(tensor) != expected:
            raise ShapeMismatch(f"{param}: checkpoint shape {list(_shape(tensor))} does not match the "
                                f"{self.scheme.name} {self.bits}-bit layout {list(expected)} "
                                f"(group_size {self.scheme.group_size})")
        if param == "g_idx":
            local = _read(tensor, 0, L.in_start, L.in_start + L.in_local).to(torch.int32)
            first = next(iter(self._g_idx_loaded.values()), None)
            if first is not None and not torch.equal(first, local):
                raise ShapeMismatch(f"g_idx of {shard_id} differs from {next(iter(self._g_idx_loaded))}'s, but the "
                                    f"stacked projections share one input order")
            self._g_idx_loaded[shard_id] = local
            self.g_idx.data.copy_(local)
            return
        # columns: this rank's output channels of this sub-matrix (packed columns for qzeros / AWQ qweight)
        packed_cols = param == "qzeros" or (param == "qweight" and not self.gptq)
        div = p if packed_cols else 1
        cols = (s.start // div, (s.start + s.local) // div)
        dst_cols = slice(s.offset // div, (s.offset + s.local) // div)
        # rows: this rank's input rows (qweight) or groups (qzeros, scales)
        if param == "qweight":
            r0 = L.in_start // p if self.gptq else L.in_start
            rows = (r0, r0 + self.qweight.shape[0])
        else:
            rows = (self.g_start, self.g_start + self.scales.shape[0])
        target = getattr(self, param).data
        full_rows = rows == (0, expected[0])
        block = _read(tensor, 1, *cols) if full_rows else _read(_read(tensor, 0, *rows), 1, *cols)
        target[:, dst_cols].copy_(block)

    # --- kernels ------------------------------------------------------------------------------

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q [in_local, out_local], zeros [G, out_local] int32, scales [G, out_local] float32,
        g_idx [in_local] (indices into these G groups)."""
        if self.gptq:
            q, zeros = packing.gptq_unpack(self.qweight.data, self.qzeros.data, self.bits, self.scheme.zero_offset)
        else:
            q, zeros = packing.awq_unpack(self.qweight.data, self.qzeros.data, self.bits)
        if self.gptq and (self.scheme.desc_act or self._g_idx_loaded):
            g_idx = self.g_idx.data.long() - self.g_start
        else:
            g_idx = torch.arange(self.layout.in_local, device=q.device) // self.group
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= zeros.shape[0]:
            raise ValueError(f"{self.name}: g_idx refers to groups outside [0, {zeros.shape[0]}) of this rank")
        return q, zeros, self.scales.data, g_idx

    def finalize(self) -> None:
        q, zeros, scales, g_idx = self.unpacked()
        kernel = self.kernel_choice
        if kernel == "auto" and self.dtype != torch.bfloat16:
            kernel = "dequant"  # the packed CPU kernels are slow with float32 activations
        on_cpu = q.device.type == "cpu"
        if kernel in ("auto", "packed") and on_cpu and self.bits == 4:
            self.kernel = Int4Kernel.build(q, zeros, scales, g_idx, self.dtype)
        elif kernel in ("auto", "packed") and on_cpu and self.bits == 8 and zeros.shape[0] == 1 \
                and bool((zeros == 128).all()):
            w = (q.t() - 128).to(torch.int8).contiguous()  # [out, in], exact
            self.kernel = Int8Kernel(w, scales[0].to(self.dtype))
        if self.kernel is None:
            if kernel == "packed":
                raise ValueError(f"{self.name}: no packed CPU kernel for {self.scheme.name} {self.bits}-bit "
                                 f"group_size {self.scheme.group_size} here; use the dequant kernel")
            self.kernel = DequantKernel(packing.dequantize(q, zeros, scales, g_idx).to(self.dtype))
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(self, name, None)  # the packed checkpoint tensors are no longer needed
        self._g_idx_loaded = {}

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.kernel(x)
        return y + bias if bias is not None else y

    def extra_repr(self) -> str:
        kind = type(self.kernel).__name__ if self.kernel is not None else "not loaded"
        return f"{self.scheme.name} {self.bits}-bit group {self.scheme.group_size}, {kind}"


class DequantKernel:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out, in] model dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int4Kernel:
    """torch's CPU int4 matmul: weights packed [out, in/2] uint8, per-group (scale, zero) pairs."""

    def __init__(self, packed, scales_zeros, group: int, perm: torch.Tensor | None):
        self.packed, self.scales_zeros, self.group, self.perm = packed, scales_zeros, group, perm

    @classmethod
    def build(cls, q, zeros, scales, g_idx, dtype) -> "Int4Kernel | None":
        K, N = q.shape
        perm = None
        if bool((g_idx[1:] < g_idx[:-1]).any()):  # act-order: sort rows by group, permute x the same way
            perm = torch.argsort(g_idx, stable=True)
            q, g_idx = q[perm], g_idx[perm]
        counts = torch.bincount(g_idx, minlength=zeros.shape[0])
        group = int(counts.max())
        if not bool((counts == group).all()) or not torch.equal(g_idx, torch.arange(K, device=q.device) // group):
            return None  # unequal groups: not the kernel's layout
        # The kernel's group: the largest size it takes that divides ours (a group split in parts keeps
        # its scale and zero in each part, so this is exact).
        sub = next((g for g in INT4_GROUPS if group % g == 0), None)
        if sub is None or N % 16 or K % sub:
            return None
        rep = group // sub
        s = scales.float().repeat_interleave(rep, 0)  # [K / sub, N]
        z = zeros.float().repeat_interleave(rep, 0)
        # The kernel computes w = (q - 8) * scale + zero_float, so zero_float = (8 - z) * scale.
        scales_zeros = torch.stack([s, (8 - z) * s], dim=-1).to(dtype).contiguous()  # [K/sub, N, 2]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous().to(torch.int32), 1)
        return cls(packed, scales_zeros, sub, perm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group, self.scales_zeros)
        return y.reshape(*shape[:-1], y.shape[-1])

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * self.scales_zeros.element_size()


# Rows from which the int8 CPU kernel dequantizes per call instead of `_weight_int8pack_mm`, whose time
# grows with every row (a matrix-vector kernel per row): one Qwen2-0.5B gate_up weight [9728, 896],
# 2 threads, avx512_bf16, best of 15 (2026-11-30): fp32 activations, 1 row 3.5 ms packed vs 12.6 ms
# dequant, 8 rows 28.9 vs 16.7, 128 rows (a prefill) 465 vs 32; bf16, 8 rows 3.8-5.2 vs 6.9-12.0,
# 16 rows 6.4 vs 2.1, 128 rows 30-57 vs 14-16. The weight stays int8 in memory either way.
INT8_DEQUANT_ROWS = {torch.float32: 8, torch.bfloat16: 16}


class Int8Kernel:
    """y = x (w * s)^T with w int8 [out, in] and s [out]. On CPU, for few rows (decoding),
    `_weight_int8pack_mm`; for more rows (batches, prefill; see INT8_DEQUANT_ROWS) and off CPU, a
    float matmul on the int8 weight cast to the activations' dtype (integers up to 127 are exact in
    bf16 and fp32) followed by the per-channel scale: the same product."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        self.weight, self.scales = weight, scales

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [rows, in]
        if x.device.type == "cpu" and x2.shape[0] < INT8_DEQUANT_ROWS.get(x.dtype, 16):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales.to(x.dtype))
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()


class Int8Weight(QuantizedWeight):
    """`--quantization int8`: the linear's float weight, quantized per output channel at load."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.float()  # [out, in]
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.kernel = Int8Kernel(q.contiguous(), scales.to(weight.dtype))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.kernel(x)
        return y + bias if bias is not None else y

    def extra_repr(self) -> str:
        return "int8 per-channel"
