"""Compatibility shim: the KV cache was split into block_manager.py (router-side block bookkeeping and
the prefix cache) and paged_attention.py (worker-side K/V tensors and paged attention). Import from
those; this module only re-exports their names for code written before the split."""

from .block_manager import BlockManager, NoFreeBlocks, block_hash  # noqa: F401
from .paged_attention import PagedAttentionBatch, PagedKVCache, SeqSlice, gather_blocks  # noqa: F401
