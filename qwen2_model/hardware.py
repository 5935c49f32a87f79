"""Which compute dtype the hardware runs fast, decided from the CPU's instruction-set flags.

Real Qwen2 checkpoints store bfloat16 weights. On a CPU without native bf16 arithmetic (AVX2-only
machines: no `avx512_bf16`, no `amx_bf16`) a bf16 matmul is emulated and measured 4.5x slower than
fp32 (issue 9: 896x9728 at 128 rows, 18 vs 82 GFLOP/s), so such weights are computed in fp32
there; where the CPU has native bf16 they stay bf16. fp16 has the same story with `avx512_fp16` /
`amx_fp16`, and without those it is computed in fp32 (never re-rounded to bf16, which would change
the numbers). fp32 checkpoints stay fp32. CUDA devices keep the checkpoint's dtype. An explicit
dtype (`--dtype`, the `dtype` model key) always wins: only "auto"/None is decided here.

`choose_dtype(stored, requested, device, flags)` is pure (tests pass a flags set); `cpu_flags()`
reads /proc/cpuinfo once (empty on non-Linux, which counts as "no native bf16").
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# torch's CPU allocator puts every allocation of 2 MiB or more on transparent huge pages (2 MiB-aligned,
# madvise(MADV_HUGEPAGE)) when this variable is set before the process's first allocation: c10 reads
# it once. The weights, their oneDNN-packed copies (kernels.py) and the KV cache then need 512x fewer
# TLB entries; a decode step streams all the weights. Measured on the 0.5b fp32 model, 2 cores, 32
# sequences: median decode step 246 vs 268 ms (5 ABBA blocks of fresh processes, 4 faster). It only
# works where the variable is in the environment the process starts with: the Router's and the
# tensor-parallel workers' runtime_env carry it (deployments/), a script sets it before importing torch.
HUGE_PAGES_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def with_huge_pages(env_vars: dict[str, str] | None) -> dict[str, str]:
    """`env_vars` plus HUGE_PAGES_ENV, where the caller has not set those variables itself."""
    return {**HUGE_PAGES_ENV, **(env_vars or {})}


# Flags that mean the CPU does the arithmetic of this dtype natively.
NATIVE_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The `flags` of the first processor in /proc/cpuinfo (empty set when unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isa_summary(flags: frozenset[str] | set[str]) -> str:
    """The flags that matter for the kernels, e.g. 'avx2 avx512f avx512_bf16' (for logs and benchmarks)."""
    keep = sorted(f for f in flags if f.startswith(("avx", "amx")))
    return " ".join(keep) or "none of avx*/amx*"


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype  # what the model computes in
    stored: torch.dtype  # what the checkpoint declares
    reason: str  # one line for the start-up log and /v1/models

    @property
    def name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))


def choose_dtype(stored: torch.dtype, requested: torch.dtype | None, device: str | torch.device = "cpu",
                 flags: frozenset[str] | set[str] | None = None) -> DtypeChoice:
    """The compute dtype for weights stored in `stored`. `requested` (an explicit dtype) wins when given."""
    if requested is not None:
        return DtypeChoice(requested, stored, "requested explicitly")
    if torch.device(device).type != "cpu":
        return DtypeChoice(stored, stored, f"the checkpoint's dtype on {torch.device(device).type}")
    if stored not in NATIVE_FLAGS:
        return DtypeChoice(stored, stored, "the checkpoint's dtype")
    flags = cpu_flags() if flags is None else flags
    have = [f for f in NATIVE_FLAGS[stored] if f in flags]
    name = DTYPE_NAMES[stored]
    if have:
        return DtypeChoice(stored, stored, f"checkpoint is {name} and the CPU has {'/'.join(have)}")
    return DtypeChoice(torch.float32, stored, f"checkpoint is {name} but the CPU lacks "
                       f"{' and '.join(NATIVE_FLAGS[stored])}: {name} matmuls would be emulated, fp32 is faster")
