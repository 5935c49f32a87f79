"""Tensor parallelism on CUDA with nccl: tp=1 always, tp=2 where two GPUs exist.

Same checks as tests/e2e/test_tp.py on the gloo path: logits against the single-process model on
the same GPU, and greedy generation through the engine token for token identical.
"""

from __future__ import annotations

import pytest
import ray
import torch

from deployments.workers import RayExecutor, StartupError
from qwen2_model.engine.engine import Engine
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.loading import from_pretrained
from qwen2_model.testing import write_random_checkpoint

pytestmark = pytest.mark.gpu

KV = 16 << 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = {"a": [1, 2, 3, 4, 5, 6, 7], "b": [40, 41, 42], "c": list(range(100, 150))}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ray.init(num_cpus=max(4, torch.cuda.device_count() + 1), num_gpus=torch.cuda.device_count(),
             include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", params=["tiny", "qwen2-0.5b"])
def ckpt(request, tmp_path_factory):
    extra = dict(num_hidden_layers=2, vocab_size=8192) if request.param == "qwen2-0.5b" else {}
    return write_random_checkpoint(tmp_path_factory.mktemp(request.param), preset=request.param, **extra)


def check_against_local(path, tp):
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ex = RayExecutor(path, tp=tp, device="cuda", kv_cache_memory=KV)
        try:
            infos = ex.worker_info()
            assert [i["backend"] for i in infos] == ["nccl"] * tp
            assert all(i["device"].startswith("cuda") for i in infos)
            ids = torch.randint(0, ex.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                ref = from_pretrained(path, device="cuda")(ids.cuda()).float().cpu()
            torch.testing.assert_close(ex.forward_logits(ids.tolist()), ref, atol=2e-4, rtol=1e-3)
            expected = Engine(LocalExecutor(path, device="cuda", kv_cache_memory=KV)).generate_all(PROMPTS, GREEDY)
            assert Engine(ex).generate_all(PROMPTS, GREEDY) == expected
        finally:
            ex.shutdown()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32


def test_nccl_tp1(ckpt):
    check_against_local(ckpt, 1)


def test_nccl_tp2(ckpt):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"tp=2 needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    check_against_local(ckpt, 2)


def test_more_ranks_than_gpus_fails_naming_the_numbers(tmp_path):
    n = torch.cuda.device_count()
    tp = next((t for t in (2, 4, 8) if t > n), None)
    if tp is None:
        pytest.skip("this machine has 8 or more GPUs")
    path = write_random_checkpoint(tmp_path, preset="tiny", num_attention_heads=8, num_key_value_heads=8)
    with pytest.raises(StartupError, match=f"needs {tp} GPUs \\(one per rank\\) but the Ray cluster has {n} GPU"):
        RayExecutor(path, tp=tp, device="cuda", kv_cache_memory=KV)
