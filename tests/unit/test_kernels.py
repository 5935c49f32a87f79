"""The engine's kernel paths against the plain ones: oneDNN-packed linears, fused norm/residual, RoPE
table, SiLU x up in place, and the vectorized paged-attention indices."""

import random

import pytest
import torch
import torch.nn.functional as F

from qwen2_model import from_pretrained, kernels
from qwen2_model.engine.engine import Engine, EngineConfig
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.paged_attention import PagedAttentionBatch, PagedKVCache, SeqSlice, gather_blocks
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.layers import Qwen2RMSNorm, RotaryEmbedding, apply_rotary, apply_rotary_qk
from qwen2_model.parallel import ColumnParallelLinear, ParallelContext, RowParallelLinear
from qwen2_model.testing import write_random_checkpoint

needs_onednn = pytest.mark.skipif(not kernels.oneDNN_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 2, 7, 64])
def test_packed_linear_equals_f_linear(dtype, tol, rows):
    g = torch.Generator().manual_seed(rows)
    w = (0.05 * torch.randn(96, 80, generator=g)).to(dtype)
    b = (0.1 * torch.randn(96, generator=g)).to(dtype)
    x = torch.randn(rows, 80, generator=g).to(dtype)
    packed = kernels.pack_weight(w)
    for bias in (b, None):
        got = kernels.linear(x, w, bias, packed, 96)
        assert got.shape == (rows, 96) and got.dtype == dtype
        torch.testing.assert_close(got.float(), F.linear(x, w, bias).float(), atol=tol, rtol=tol)
    x3 = torch.randn(2, 3, 80, generator=g).to(dtype)  # leading dims are kept
    torch.testing.assert_close(kernels.linear(x3, w, b, packed, 96).float(), F.linear(x3, w, b).float(), atol=tol, rtol=tol)


@needs_onednn
def test_prepacked_parallel_linears_release_the_plain_weight_and_compute_the_same():
    col = ColumnParallelLinear(32, {"q": 24, "k": 8}, bias=True, ctx=ParallelContext())
    row = RowParallelLinear(32, 16, ctx=ParallelContext())
    for layer in (col, row):
        layer.to_empty(device="cpu")
        torch.nn.init.normal_(layer.weight, std=0.1)
        if getattr(layer, "bias", None) is not None:
            torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 32)
    expected = col(x), row(x)
    assert col.prepack() and row.prepack()
    for layer in (col, row):  # no second copy of the weights; shape, dtype, device still answer
        assert layer.weight.untyped_storage().nbytes() == 4 and layer.weight.shape == (layer.packed.size(0), 32)
    assert not col.prepack()  # once
    torch.testing.assert_close(col(x), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row(x), expected[1], atol=1e-5, rtol=1e-5)


def test_linear_kernel_choice(monkeypatch):
    assert kernels.choose_linear_kernel("plain", "cpu", torch.float32) == "plain"
    assert kernels.choose_linear_kernel("auto", "cpu", torch.float16) == "plain"  # oneDNN fp16 is not packed here
    assert kernels.choose_linear_kernel("auto", "cuda", torch.float32) == "plain"
    with pytest.raises(ValueError, match="linear_kernel"):
        kernels.choose_linear_kernel("fast", "cpu", torch.float32)
    with pytest.raises(ValueError, match="packed"):
        kernels.choose_linear_kernel("packed", "cuda", torch.float32)
    if kernels.oneDNN_available():
        assert kernels.choose_linear_kernel("auto", "cpu", torch.float32) == "packed"
        monkeypatch.setenv("QWEN2_LINEAR_KERNEL", "plain")
        assert kernels.choose_linear_kernel(None, "cpu", torch.float32) == "plain"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # sliding window on the second layer, tied embeddings: both kinds of LM head and attention paths
    return write_random_checkpoint(tmp_path_factory.mktemp("k"), num_hidden_layers=2, use_sliding_window=True,
                                   sliding_window=24, max_window_layers=1, seed=5)


@needs_onednn
def test_engine_greedy_tokens_and_logprobs_same_on_packed_and_plain_kernels(checkpoint):
    rng = random.Random(1)
    prompts = {f"r{i}": [rng.randrange(500) for _ in range(rng.randrange(3, 70))] for i in range(12)}
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = {}
    for kernel in ("plain", "packed"):
        ex = LocalExecutor(checkpoint, kv_cache_memory=2 << 20, linear_kernel=kernel)
        assert ex.runner.linear_kernel == kernel
        # chunked prefill (32-token budget) so later chunks read their context from the cache
        outs[kernel] = Engine(ex, EngineConfig(max_num_batched_tokens=32)).generate_all(prompts, params)
    for rid in prompts:
        assert outs["packed"][rid][0] == outs["plain"][rid][0], rid


def test_fused_add_rms_norm_is_bit_identical_to_add_then_norm():
    for dtype in (torch.float32, torch.bfloat16):
        norm = Qwen2RMSNorm(64, eps=1e-6, dtype=dtype)
        norm.weight.data = (1 + 0.1 * torch.randn(64)).to(dtype)
        x, r = torch.randn(9, 64).to(dtype), torch.randn(9, 64).to(dtype)
        expected_sum = r + x
        expected = norm(expected_sum)
        got, got_sum = kernels.add_rms_norm(x.clone(), r, norm.weight, norm.variance_epsilon)
        assert torch.equal(got_sum, expected_sum) and torch.equal(got, expected)
        got, same = kernels.add_rms_norm(x, None, norm.weight, norm.variance_epsilon)
        assert torch.equal(got, norm(x)) and same is x


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "linear", "factor": 2.0}])
def test_rope_table_and_joint_qk_rotation_are_bit_identical(rope):
    from qwen2_model.config import Qwen2Config
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                      num_hidden_layers=1, vocab_size=10, max_position_embeddings=4096, rope_scaling=rope)
    emb = RotaryEmbedding(cfg)
    positions = torch.tensor([0, 5, 3000, 17, 1023, 1024, 1025])  # past the first table size: it grows
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = emb(positions, dtype)
        ref = emb._compute(positions, emb.inv_freq, dtype)  # the direct computation
        assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])
        q, k = torch.randn(7, 4, 16).to(dtype), torch.randn(7, 2, 16).to(dtype)
        rq, rk = apply_rotary(q, k, cos, sin)
        joint = apply_rotary_qk(torch.cat([q, k], 1), cos, sin)
        assert torch.equal(joint[:, :4], rq) and torch.equal(joint[:, 4:], rk)


def test_vectorized_slot_mapping_and_block_gather_match_the_per_token_definition():
    bs = 4
    cache = PagedKVCache(1, num_blocks=12, block_size=bs, num_kv_heads=2, head_dim=3, dtype=torch.float32, device="cpu")
    cache.keys[0].copy_(torch.arange(cache.keys[0].numel(), dtype=torch.float32).view_as(cache.keys[0]))
    # a prefill chunk after a cached prefix, a decode, a fresh prompt, another decode
    seqs = [SeqSlice(0, 5, 11, [7, 2, 9]), SeqSlice(5, 1, 6, [4, 11]), SeqSlice(6, 3, 3, [0]), SeqSlice(9, 1, 1, [5])]
    batch = PagedAttentionBatch(cache, seqs, "cpu")
    expected = [s.block_table[p // bs] * bs + p % bs for s in seqs for p in range(s.context_len - s.count, s.context_len)]
    assert batch.slot_mapping.tolist() == expected
    tables, lengths, rows = batch._decode_meta
    assert lengths.tolist() == [6, 1] and rows.tolist() == [5, 9]
    got = gather_blocks(cache.keys[0], tables, bs)  # [2, nb * bs, Hkv, D]
    for i, s in enumerate(batch.decodes):
        slots = [s.block_table[p // bs] * bs + p % bs for p in range(s.context_len)]
        assert torch.equal(got[i, :s.context_len], cache.keys[0][slots])


def test_model_forward_still_matches_the_engine_path_on_packed_weights(checkpoint):
    """The pooled/transformers-style forward goes through the same packed linears after prepacking."""
    plain = from_pretrained(checkpoint)
    ids = torch.randint(0, 500, (2, 11))
    expected = plain(ids)
    if kernels.oneDNN_available():
        assert kernels.prepack_model(plain) > 0
    torch.testing.assert_close(plain(ids), expected, atol=1e-4, rtol=1e-4)
