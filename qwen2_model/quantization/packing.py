"""The published bit layouts of GPTQ and AWQ checkpoints: unpack (loading) and pack (test checkpoints).

GPTQ (AutoGPTQ / gptqmodel `checkpoint_format: gptq`, "v1"), for a linear W [out, in]:
- `qweight` int32 [in / (32/bits), out]: the integer weight q [in, out] packed along *in*; row r holds
  q[r*p + k] at bits k*bits (p = 32/bits values per int32, lowest bits first).
- `qzeros` int32 [groups, out / p]: zero points packed along *out* the same way, stored minus 1
  (AutoGPTQ's historical offset: a symmetric 4-bit zero of 8 is stored as 7, 0x77777777 per int32).
  `checkpoint_format: gptq_v2` (gptqmodel) stores them without the offset.
- `scales` [groups, out] (float16); `g_idx` int32 [in]: the group of each input row
  (i // group_size without act-order; a permutation of that with `desc_act`).
- W[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o].

AWQ (`version: gemm`, 4 bit): `qweight` int32 [in, out/8] packed along *out*; within an int32 the
eight values are stored in the order [0, 2, 4, 6, 1, 3, 5, 7] (value order_map[k] of the column group
sits at bits 4k). `qzeros` int32 [groups, out/8] the same way, no offset. `scales` [groups, out]. No
g_idx: group = i // group_size.

All functions work on plain tensors (int32 in, int32/float out) and are checked in
tests/unit/test_quantization.py against hand-worked values.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ stores value AWQ_ORDER[k] at nibble k
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble k holds value ... (its inverse)


def pack_factor(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    return 32 // bits


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along rows -> int32 [R * p, C] of values in [0, 2^bits)."""
    p = pack_factor(bits)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # [p]
    values = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [R, p, C]
    return values.reshape(packed.shape[0] * p, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along columns -> int32 [R, C * p]."""
    p = pack_factor(bits)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # [R, C, p]
    return values.reshape(packed.shape[0], packed.shape[1] * p)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [R * p, C] values in [0, 2^bits) -> int32 [R, C] (the inverse of unpack_rows)."""
    p = pack_factor(bits)
    v = values.to(torch.int64).reshape(values.shape[0] // p, p, values.shape[1])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)[None, :, None]
    packed = (v << shifts).sum(1)  # disjoint bits: sum == or; int64 so bit 31 does not overflow
    return _to_int32(packed)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    p = pack_factor(bits)
    v = values.to(torch.int64).reshape(values.shape[0], values.shape[1] // p, p)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)[None, None, :]
    return _to_int32((v << shifts).sum(-1))


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32 (two's complement)."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def awq_interleave(values: torch.Tensor) -> torch.Tensor:
    """[R, C] in natural column order -> the order AWQ packs (each group of 8 columns permuted)."""
    R, C = values.shape
    return values.reshape(R, C // 8, 8)[:, :, list(AWQ_ORDER)].reshape(R, C)


def awq_deinterleave(values: torch.Tensor) -> torch.Tensor:
    R, C = values.shape
    return values.reshape(R, C // 8, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(R, C)


# --- whole tensors: published layout <-> integer weight, zeros ------------------------------------

def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, zero_offset: int = 1):
    """-> q int32 [in, out], zeros int32 [groups, out] (offset added back)."""
    return unpack_rows(qweight, bits), unpack_cols(qzeros, bits) + zero_offset


def gptq_pack(q: torch.Tensor, zeros: torch.Tensor, bits: int, zero_offset: int = 1):
    """q [in, out], zeros [groups, out] -> qweight, qzeros as AutoGPTQ writes them."""
    return pack_rows(q, bits), pack_cols(zeros - zero_offset, bits)


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int = 4):
    """-> q int32 [in, out], zeros int32 [groups, out] in natural column order."""
    return awq_deinterleave(unpack_cols(qweight, bits)), awq_deinterleave(unpack_cols(qzeros, bits))


def awq_pack(q: torch.Tensor, zeros: torch.Tensor, bits: int = 4):
    return pack_cols(awq_interleave(q), bits), pack_cols(awq_interleave(zeros), bits)


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """q [in, out], zeros/scales [groups, out], g_idx [in] -> W [out, in] float32."""
    g = g_idx.long()
    return ((q - zeros[g]).float() * scales[g].float()).t().contiguous()
