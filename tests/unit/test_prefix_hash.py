"""Prefix-cache keys are collision-resistant: prompts built to collide under Python's `hash` share no blocks.

The prefix cache used to key a full block with `hash((parent, tokens))`. Python hashes an int to
itself modulo 2**61 - 1 (and -1 to -2), so two different token blocks with equal hashes are easy to
write down, and the second request would have read the first one's K/V (vLLM's CVE-2025-25183).
`block_hash` is now SHA-256 over the parent key and the ids; these tests build such colliding
blocks, show that the old key really collides on them, and that the BlockManager keeps them apart.
"""

from __future__ import annotations

from qwen2_model.engine.block_manager import BlockManager, block_hash
from tests.helpers import cache_prompt

MERSENNE_61 = 2**61 - 1  # CPython: hash(n) == n % (2**61 - 1) for non-negative ints


def old_key(parent, tokens) -> int:
    """The key the prefix cache used before (kept here only to show the collision is real)."""
    return hash((parent, tuple(tokens)))


def colliding_pairs(block_size: int) -> list[tuple[list[int], list[int]]]:
    victim = list(range(100, 100 + block_size))
    return [
        # One id shifted by 2**61 - 1: same Python hash, different token.
        (victim, victim[:-1] + [victim[-1] + MERSENNE_61]),
        # Every id shifted.
        (victim, [t + MERSENNE_61 for t in victim]),
        # hash(-1) == hash(-2) in CPython.
        ([1] * (block_size - 1) + [-1], [1] * (block_size - 1) + [-2]),
    ]


def test_the_constructed_blocks_collide_under_pythons_hash_but_not_under_block_hash():
    for a, b in colliding_pairs(16):
        assert a != b
        assert old_key(None, a) == old_key(None, b)  # the old key: one cache entry for both
        assert block_hash(None, a) != block_hash(None, b)


def test_colliding_prompts_do_not_share_blocks():
    block_size = 16
    for victim, attacker in colliding_pairs(block_size):
        blocks = BlockManager(num_blocks=8, block_size=block_size)
        cache_prompt(blocks, victim + [7])  # the victim's full block is now cached
        got, _ = blocks.match_prefix(attacker + [7])
        assert got == [], "a prompt built to collide reused another prompt's KV block"
        got, _ = blocks.match_prefix(victim + [9])  # the real prefix still hits
        assert len(got) == 1
        blocks.release(got)


def test_second_block_collision_through_the_parent_key_is_refused_too():
    # Under the old key the second block's parent was an int: prompts whose first blocks collide
    # also collided on every later block with the same tokens. Now the chain carries the digest.
    bs = 4
    a, b = [5, 6, 7, 8], [5, 6, 7, 8 + MERSENNE_61]
    tail = [1, 2, 3, 4]
    assert old_key(old_key(None, a), tail) == old_key(old_key(None, b), tail)
    blocks = BlockManager(num_blocks=8, block_size=bs)
    cache_prompt(blocks, a + tail + [0])
    assert blocks.match_prefix(b + tail + [0])[0] == []


def test_keys_chain_the_whole_prefix_and_are_deterministic():
    tail = list(range(16))
    k1 = block_hash(block_hash(None, [1] * 16), tail)
    k2 = block_hash(block_hash(None, [2] * 16), tail)
    assert k1 != k2  # the same block after a different prefix is a different block
    assert block_hash(None, tail) == block_hash(None, tuple(tail))  # list or tuple, same key
    assert len(k1) == 32
    # A block of ids never collides with the same ids split differently across the parent.
    assert block_hash(None, [1, 2]) != block_hash(block_hash(None, [1]), [2])
