"""KV-cache block bookkeeping (router side): which block ids each sequence holds, and the prefix cache.

`BlockManager`: fixed-size blocks (16 tokens by default), a free list, per-sequence block tables,
reference counts. Full blocks are keyed by a hash of their tokens and of everything before them
(the parent block's hash), so a later request with the same prefix reuses them. The hash is SHA-256
(`block_hash`): a key collision would hand one request another's K/V, so the key must not be
forgeable (Python's `hash` maps ints to themselves and is not: vLLM's CVE-2025-25183). A cached
block whose last user left is not freed but parked in an LRU list and only evicted when a fresh
block is needed. Knows nothing of tensors: the K/V themselves live in paged_attention.py, on the
workers.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict


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

    def match_prefix(self, tokens: list[int], salt: bytes | None = None) -> tuple[list[int], list[bytes]]:
        """Longest run of cached full blocks for `tokens` -> (block ids, their hashes). Takes a reference.

        `salt` is the root of the hash chain: what else the K/V depend on (the LoRA adapter), so the
        same tokens under another adapter never share blocks.

        Not counted in the hit statistics: the caller calls `record_lookup` once it uses the match
        (a sequence that is not admitted gives its match back and looks again later).
        """
        blocks, hashes, parent = [], [], salt
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

    def register_full_blocks(self, table: list[int], hashes: list[bytes], tokens: list[int], num_computed: int,
                             salt: bytes | None = None) -> None:
        """Publish the blocks of `table` whose tokens are all computed; extends `hashes` in place."""
        if not self.enable_prefix_caching:
            return
        while len(hashes) < num_computed // self.block_size:
            i = len(hashes)
            h = block_hash(hashes[-1] if hashes else salt, tokens[i * self.block_size:(i + 1) * self.block_size])
            hashes.append(h)
            block = table[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h
