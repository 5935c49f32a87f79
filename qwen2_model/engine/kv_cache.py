"""Paged KV cache: block allocation with a prefix cache (engine side) and paged attention (model side).

Engine side, `BlockManager`: fixed-size blocks (16 tokens by default), a free list, per-sequence
block tables, reference counts. Full blocks are keyed by a hash of their tokens and of everything
before them (the parent block's hash), so a later request with the same prefix reuses them. The
hash is SHA-256 (`block_hash`): a key collision would hand one request another's K/V, so the key
must not be forgeable (Python's `hash` maps ints to themselves and is not: vLLM's CVE-2025-25183). A
cached block whose last user left is not freed but parked in an LRU list and only evicted when a
fresh block is needed.

Model side, `PagedKVCache` holds per-layer K/V tensors [num_blocks * block_size, Hkv, D] (slots) and
`PagedAttentionBatch` implements the model's `attend` over them for one engine step: it writes the
step's new K/V into their slots, then attends decodes as one batched SDPA call and each prefill
chunk as its own call. Indices and masks are built once per step and shared by all layers.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..layers import causal_window_mask


class NoFreeBlocks(RuntimeError):
    pass


def block_hash(parent: bytes | None, tokens: tuple[int, ...] | list[int]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 over the parent block's key and the token ids.

    Collision-resistant, so no prompt can be built to share another prompt's cached blocks
    (Python's tuple hash is 64 bits, unkeyed for ints, and ints hash to themselves mod 2**61 - 1).
    Token ids are packed as int64 (the engine admits only ids inside the vocabulary). About 1 us
    per block on this CPU, once per block of 16 tokens (benchmarks/README.md, "Prefix-cache hash").
    """
    return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()


class BlockManager:
    """Owns block ids; knows nothing of tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives low ids first
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.hash_of: dict[int, bytes] = {}  # block id -> block hash (for blocks in `cached`)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, LRU first
        self.prefix_queries = 0  # blocks looked up
        self.prefix_hits = 0  # blocks found

    # --- counts ------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # --- allocation --------------------------------------------------------------------------

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)  # least recently used
            del self.cached[self.hash_of.pop(block)]
        else:
            raise NoFreeBlocks("no free KV blocks")
        self.ref_counts[block] = 1
        return block

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` so it holds `num_tokens` tokens; all-or-nothing."""
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > self.num_free:
            raise NoFreeBlocks(f"need {extra} blocks, {self.num_free} free")
        for _ in range(max(0, extra)):
            table.append(self._take())

    def release(self, table: list[int]) -> None:
        for block in table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        table.clear()

    # --- prefix cache ------------------------------------------------------------------------

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], list[bytes]]:
        """Longest run of cached full blocks for `tokens` -> (block ids, their hashes). Takes a reference.

        Not counted in the hit statistics: the caller calls `record_lookup` once it uses the match
        (a sequence that is not admitted gives its match back and looks again later).
        """
        blocks, hashes, parent = [], [], None
        if not self.enable_prefix_caching:
            return blocks, hashes
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            h = block_hash(parent, tokens[start:start + self.block_size])
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def record_lookup(self, num_tokens: int, num_hits: int) -> None:
        """Count one used prefix lookup: the full blocks looked up (up to the first miss) and found."""
        if self.enable_prefix_caching:
            self.prefix_queries += min(num_hits + 1, num_tokens // self.block_size)
            self.prefix_hits += num_hits

    def register_full_blocks(self, table: list[int], hashes: list[bytes], tokens: list[int], num_computed: int) -> None:
        """Publish the blocks of `table` whose tokens are all computed; extends `hashes` in place."""
        if not self.enable_prefix_caching:
            return
        while len(hashes) < num_computed // self.block_size:
            i = len(hashes)
            h = block_hash(hashes[-1] if hashes else None, tokens[i * self.block_size:(i + 1) * self.block_size])
            hashes.append(h)
            block = table[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h


# --- model side ---------------------------------------------------------------------------------

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
