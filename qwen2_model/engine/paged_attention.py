"""Paged KV tensors and paged attention (worker side): the model's `attend` over the block cache.

`PagedKVCache` holds per-layer K/V tensors [num_blocks * block_size, Hkv, D] (slots) and
`PagedAttentionBatch` implements the model's `attend` over them for one engine step: it writes the
step's new K/V into their slots, then attends decodes as one batched SDPA call and each prefill
chunk as its own call. Indices and masks are built once per step and shared by all layers. Which
blocks a sequence holds is decided on the router side (block_manager.py); this module only reads
the block tables it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import causal_window_mask


class PagedKVCache:
    """Per-layer K and V slots: [num_blocks * block_size, Hkv_local, D]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass
class SeqSlice:
    """One sequence's part of a step: new tokens [start, start + count) of the flat batch."""
    start: int  # offset in the flat token batch
    count: int  # new tokens this step
    context_len: int  # tokens in the cache after this step (including the new ones)
    block_table: list[int]


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [N, Hkv, D] rows at `slots` (any shape) -> [*slots.shape, Hkv, D].

    index_select on the flattened indices is ~3x faster on CPU than advanced indexing `cache[slots]`.
    """
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


class PagedAttentionBatch:
    """`attend` for one engine step over a PagedKVCache."""

    def __init__(self, cache: PagedKVCache, seqs: list[SeqSlice], device):
        self.cache = cache
        bs = cache.block_size
        self.slot_mapping = torch.tensor(
            [seq.block_table[p // bs] * bs + p % bs
             for seq in seqs for p in range(seq.context_len - seq.count, seq.context_len)],
            dtype=torch.long, device=device)  # [T] where each new token's K/V goes
        self.decodes = [s for s in seqs if s.count == 1]
        self.prefills = [s for s in seqs if s.count > 1]
        self.device = device
        self._decode_meta = self._build_decode_meta() if self.decodes else None
        self._prefill_slots: dict[int, torch.Tensor] = {}  # built on first use: fresh chunks need none
        self._masks: dict[tuple, torch.Tensor] = {}

    def _slots(self, seq: SeqSlice) -> torch.Tensor:
        bs = self.cache.block_size
        table = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
        pos = torch.arange(seq.context_len, device=self.device)
        return table[pos // bs] * bs + pos % bs  # [L]

    def _build_decode_meta(self):
        max_len = max(s.context_len for s in self.decodes)
        slots = torch.zeros(len(self.decodes), max_len, dtype=torch.long, device=self.device)
        for i, s in enumerate(self.decodes):
            slots[i, :s.context_len] = self._slots(s)
        lengths = torch.tensor([s.context_len for s in self.decodes], device=self.device)
        rows = torch.tensor([s.start for s in self.decodes], device=self.device)
        return slots, lengths, rows  # [B, Lmax], [B], [B]

    def _decode_mask(self, window: int | None) -> torch.Tensor:
        key = ("decode", window)
        if key not in self._masks:
            slots, lengths, _ = self._decode_meta
            pos = torch.arange(slots.shape[1], device=self.device)[None]  # [1, Lmax]
            visible = pos < lengths[:, None]
            if window is not None:
                visible &= pos > (lengths[:, None] - 1) - window
            self._masks[key] = visible[:, None, None, :]  # [B, 1, 1, Lmax]
        return self._masks[key]

    def _prefill_mask(self, i: int, seq: SeqSlice, groups: int, window: int | None) -> torch.Tensor:
        key = ("prefill", i, window)
        if key not in self._masks:
            q_pos = torch.arange(seq.context_len - seq.count, seq.context_len, device=self.device)
            mask = causal_window_mask(q_pos, torch.arange(seq.context_len, device=self.device), window)  # [n, L]
            self._masks[key] = mask.repeat(groups, 1)[None, None]  # [1, 1, G*n, L]
        return self._masks[key]

    def attend(self, layer_idx, q, k, v, sliding_window, scale):
        # q: [T, Hq, D]; k, v: [T, Hkv, D]
        k_cache, v_cache = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        k_cache.index_copy_(0, self.slot_mapping, k)
        v_cache.index_copy_(0, self.slot_mapping, v)
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        groups = Hq // Hkv
        out = torch.empty_like(q)
        if self._decode_meta is not None:
            slots, _, rows = self._decode_meta
            B = slots.shape[0]
            # Query heads sharing a KV head go in the "sequence" dim, so KV is never expanded.
            qd = q[rows].view(B, Hkv, groups, D)  # [B, Hkv, G, D]
            kd = gather_slots(k_cache, slots).transpose(1, 2)  # [B, Hkv, Lmax, D]
            vd = gather_slots(v_cache, slots).transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=self._decode_mask(sliding_window), scale=scale)  # [B, Hkv, G, D]
            out[rows] = o.reshape(B, Hq, D)
        for i, seq in enumerate(self.prefills):
            n = seq.count
            if seq.context_len == n and (sliding_window is None or sliding_window >= n):
                # A prompt's first chunk sees only itself: plain causal attention over the new K/V,
                # no gather, no mask (SDPA's causal kernel, ~1.6x faster than the masked call on CPU).
                o = torch.nn.functional.scaled_dot_product_attention(
                    q[seq.start:seq.start + n].transpose(0, 1)[None], k[seq.start:seq.start + n].transpose(0, 1)[None],
                    v[seq.start:seq.start + n].transpose(0, 1)[None], is_causal=True, scale=scale,
                    enable_gqa=groups > 1)  # [1, Hq, n, D]
                out[seq.start:seq.start + n] = o[0].transpose(0, 1)
                continue
            if i not in self._prefill_slots:
                self._prefill_slots[i] = self._slots(seq)
            slots = self._prefill_slots[i]
            qp = q[seq.start:seq.start + n].view(n, Hkv, groups, D).permute(1, 2, 0, 3).reshape(1, Hkv, groups * n, D)
            kp = gather_slots(k_cache, slots).transpose(0, 1)[None]  # [1, Hkv, L, D]
            vp = gather_slots(v_cache, slots).transpose(0, 1)[None]
            o = torch.nn.functional.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=self._prefill_mask(i, seq, groups, sliding_window), scale=scale)
            out[seq.start:seq.start + n] = o.view(Hkv, groups, n, D).permute(2, 0, 1, 3).reshape(n, Hq, D)
        return out
