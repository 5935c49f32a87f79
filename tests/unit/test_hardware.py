"""The compute dtype chosen for the hardware: a CPU-flags fixture decides, an explicit dtype wins."""

import logging

import pytest
import torch

from qwen2_model import from_pretrained, hardware
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.hardware import choose_dtype, cpu_flags, isa_summary
from qwen2_model.testing import write_random_checkpoint

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})  # the AMD EPYC kind
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16"}  # e.g. Zen 4, Cooper Lake
AMX = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16"}  # Sapphire Rapids
FP16 = AVX512_BF16 | {"avx512_fp16"}


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU has the given flags: `flags(AVX2_ONLY)`."""
    def use(value):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: value)
    return use


@pytest.mark.parametrize("stored,cpu,expected", [
    (torch.bfloat16, AVX2_ONLY, torch.float32),  # emulated bf16 is slower than fp32
    (torch.bfloat16, AVX512_BF16, torch.bfloat16),
    (torch.bfloat16, AMX, torch.bfloat16),
    (torch.float16, AVX512_BF16, torch.float32),  # fp16 is never re-rounded to bf16
    (torch.float16, FP16, torch.float16),
    (torch.float32, AVX2_ONLY, torch.float32),
    (torch.float32, AMX, torch.float32),
])
def test_cpu_dtype_from_flags(stored, cpu, expected):
    choice = choose_dtype(stored, None, "cpu", cpu)
    assert choice.dtype == expected and choice.stored == stored
    if expected != stored:
        assert "lacks" in choice.reason


def test_explicit_dtype_wins_and_cuda_keeps_the_checkpoint_dtype():
    assert choose_dtype(torch.bfloat16, torch.bfloat16, "cpu", AVX2_ONLY).dtype == torch.bfloat16
    assert choose_dtype(torch.bfloat16, torch.float32, "cpu", AMX).dtype == torch.float32
    assert choose_dtype(torch.bfloat16, None, "cuda", AVX2_ONLY).dtype == torch.bfloat16


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\nbugs\t\t: x\n\nprocessor\t: 1\n")
    got = cpu_flags.__wrapped__(str(info))
    assert {"avx2", "avx512_bf16", "amx_tile"} <= got and "bugs" not in got
    assert cpu_flags.__wrapped__(str(tmp_path / "missing")) == frozenset()
    assert isa_summary(got) == "amx_tile avx2 avx512_bf16"


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("bf16"), dtype="bfloat16", seed=2)


@pytest.mark.parametrize("cpu,expected", [(AVX2_ONLY, torch.float32), (AVX512_BF16, torch.bfloat16)])
def test_auto_load_computes_in_the_chosen_dtype_and_logs_it(bf16_checkpoint, flags, caplog, cpu, expected):
    flags(cpu)
    with caplog.at_level(logging.INFO, logger="qwen2_model.loading"):
        model = from_pretrained(bf16_checkpoint, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model.dtype_choice.dtype == expected and model.dtype_choice.stored == torch.bfloat16
    assert f"compute dtype {model.dtype_choice.name}" in caplog.text
    # without "auto" the library keeps the checkpoint's dtype (transformers' behaviour), whatever the CPU
    assert from_pretrained(bf16_checkpoint).model.dtype == torch.bfloat16


def test_executor_defaults_to_the_hardware_choice_and_explicit_dtype_wins(bf16_checkpoint, flags):
    flags(AVX2_ONLY)
    ex = LocalExecutor(bf16_checkpoint, kv_cache_memory=1 << 20)
    assert ex.model.model.dtype == torch.float32 and ex.dtype_choice.name == "float32"
    assert ex.runner.cache.keys[0].dtype == torch.float32  # the KV cache follows the compute dtype
    ex = LocalExecutor(bf16_checkpoint, dtype="bfloat16", kv_cache_memory=1 << 20)
    assert ex.model.model.dtype == torch.bfloat16 and ex.dtype_choice.reason == "requested explicitly"
