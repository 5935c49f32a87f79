"""CUDA paths: the flash-attn backend against SDPA, and the engine on a GPU against the CPU engine.

Skipped without CUDA (tests/conftest.py); the flash-attn tests also need the `gpu` extra.
"""

import pytest
import torch

from qwen2_model import from_pretrained
from qwen2_model.engine.engine import Engine
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.layers import flash_attn_available
from qwen2_model.testing import write_random_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("cuda"), num_hidden_layers=2, use_sliding_window=True,
                                   sliding_window=8, max_window_layers=1, dtype="bfloat16")


@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn not installed")
def test_flash_attention_matches_sdpa_on_cuda(checkpoint):
    ids = torch.randint(0, 500, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    flash = from_pretrained(checkpoint, device="cuda", attn_backend="flash")
    sdpa = from_pretrained(checkpoint, device="cuda", attn_backend="sdpa")
    assert flash.model.attn_backend == "flash" and sdpa.model.attn_backend == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(flash(ids).float(), sdpa(ids).float(), atol=3e-2, rtol=0)


def test_auto_backend_is_flash_when_installed(checkpoint):
    model = from_pretrained(checkpoint, device="cuda")
    assert model.model.attn_backend == ("flash" if flash_attn_available() else "sdpa")


def test_engine_on_cuda_matches_cpu_engine(checkpoint):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = {f"r{i}": list(range(10 + i, 30 + 3 * i)) for i in range(8)}
    gpu = Engine(LocalExecutor(checkpoint, dtype="float32", device="cuda")).generate_all(prompts, params)
    cpu = Engine(LocalExecutor(checkpoint, dtype="float32", device="cpu")).generate_all(prompts, params)
    assert gpu == cpu


def test_kv_cache_sized_from_free_gpu_memory(checkpoint):
    small = LocalExecutor(checkpoint, device="cuda", gpu_memory_fraction=0.05)
    large = LocalExecutor(checkpoint, device="cuda", gpu_memory_fraction=0.10)
    assert small.num_kv_blocks > 0
    assert 1.8 < large.num_kv_blocks / small.num_kv_blocks < 2.2
