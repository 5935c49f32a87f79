"""GPTQ / AWQ checkpoints at tp=2 on CPU (gloo, real Ray actors as in test_tp.py): each rank reads
only its columns / rows of the packed tensors (on group boundaries); logits equal the dequantized
float model's and greedy tokens through the engine are identical. A split off the group boundaries
fails at start-up naming the numbers."""

from __future__ import annotations

import pytest
import ray
import torch

from deployments.workers import RayExecutor, StartupError
from qwen2_model.engine.engine import Engine, EngineConfig
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.loading import from_pretrained
from qwen2_model.testing import write_quantized_checkpoint

KV = 4 << 20
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, dtype="float32")
CASES = {
    "gptq4-g32-act": dict(method="gptq", bits=4, group_size=32, desc_act=True),
    "gptq8-g64": dict(method="gptq", bits=8, group_size=64),
    "awq-g32": dict(method="awq", bits=4, group_size=32, sym=False),
}
PROMPTS = {"a": [1, 2, 3, 4, 5, 6, 7], "b": list(range(100, 150))}
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never a shared cluster
    yield
    ray.shutdown()


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_tp2_matches_dequantized_model(tmp_path, case):
    path = write_quantized_checkpoint(tmp_path / "q", reference_dir=tmp_path / "ref", **CASES[case], **SHAPE)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ref = from_pretrained(tmp_path / "ref")(torch.tensor(ids))
    config = EngineConfig(max_num_batched_tokens=32)
    expected = Engine(LocalExecutor(tmp_path / "ref", dtype="float32", kv_cache_memory=KV), config).generate_all(
        PROMPTS, GREEDY)
    ex = RayExecutor(str(path), tp=2, kv_cache_memory=KV)
    try:
        torch.testing.assert_close(ex.forward_logits(ids), ref.float(), atol=5e-5, rtol=1e-4)
        assert Engine(ex, config).generate_all(PROMPTS, GREEDY) == expected
    finally:
        ex.shutdown()


def test_split_off_group_boundaries_fails_at_startup(tmp_path):
    # o_proj has 128 inputs: 64 per rank at tp=2, not a multiple of group 128
    path = write_quantized_checkpoint(tmp_path, method="gptq", bits=4, group_size=128, **SHAPE)
    with pytest.raises(StartupError, match="o_proj input size 128 over tensor_parallel_size 2 gives 64 per rank"):
        RayExecutor(str(path), tp=2, kv_cache_memory=KV)
