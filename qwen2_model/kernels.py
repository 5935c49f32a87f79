"""CPU kernel paths: the linear layers' matmul on oneDNN-prepacked weights, and fused elementwise work.

Linear layers (parallel.py) call `linear(x, weight, bias, packed)`; with `packed` None that is
`F.linear` (MKL sgemm on CPU, cuBLAS on GPU). `pack_weight` reorders a [out, in] fp32/bf16 weight
once into oneDNN's blocked layout, and the matmul then runs on oneDNN's JIT kernels
(`mkldnn::_linear_pointwise`, what torch.compile's inductor uses after freezing). Why: on the
2-core AMD EPYC boxes this project runs on, MKL's fp32 sgemm runs 2x-15x slower than oneDNN at
2-64 rows (measured in benchmarks/PROFILE.md: 9728x896 at 16 rows 52 vs 3.3 ms, one thread): MKL
does not use its AVX-512 kernels on AMD CPUs. The arithmetic stays the same dtype (fp32 products and
sums in fp32, bf16 with fp32 accumulation); only the order of the additions inside a dot product
differs, as it does between MKL's own kernels for different row counts.

`choose_linear_kernel` decides ("packed" on CPU for fp32/bf16 when oneDNN is built in, else
"plain"); `QWEN2_LINEAR_KERNEL=plain|packed` or the `linear_kernel` argument of the executors
overrides. `prepack_model` swaps every parallel linear (and the LM head) of a model onto packed
weights; the plain weight's storage is released unless another module shares it (a tied LM head
shares the embedding table, which lookups still need).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def oneDNN_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def choose_linear_kernel(requested: str | None, device: torch.device | str, dtype: torch.dtype) -> str:
    """'packed' (oneDNN prepacked) or 'plain' (F.linear)."""
    requested = (requested or os.environ.get("QWEN2_LINEAR_KERNEL") or "auto").lower()
    if requested not in ("auto", "plain", "packed"):
        raise ValueError(f"linear_kernel must be 'auto', 'plain' or 'packed', got {requested!r}")
    cpu_ok = torch.device(device).type == "cpu" and dtype in PACKABLE_DTYPES and oneDNN_available()
    if requested == "packed" and not cpu_ok:
        raise ValueError(f"linear_kernel='packed' needs a CPU model in {[str(d) for d in PACKABLE_DTYPES]} and a "
                         f"torch built with oneDNN (device {device}, dtype {dtype})")
    return "packed" if requested == "packed" or (requested == "auto" and cpu_ok) else "plain"


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] weight -> an opaque oneDNN tensor in the blocked layout its matmul kernels read."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None,
           out_features: int) -> torch.Tensor:
    """y = x W^T + b for x [..., in] -> [..., out_features], on the packed weight when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return x.new_empty(*lead, out_features)
    y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, bias, "none", [], "")  # [N, out]
    return y.view(*lead, out_features)


def prepack_model(model: torch.nn.Module) -> int:
    """Pack the weight of every module with a `prepack()` method (parallel.py's linears, the LM head).

    Returns how many were packed. Modules decide themselves whether they can (dtype, device, and
    e.g. quantized weights say no).
    """
    count = 0
    for module in model.modules():
        prepack = getattr(module, "prepack", None)
        if callable(prepack) and prepack():
            count += 1
    return count


# --- fused elementwise work -----------------------------------------------------------------------

def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual): the residual add and the norm in one pass over x.

    The sum is written into `x` in place (the caller's sublayer output, never read again), so the
    step allocates no residual tensor. Same math as Qwen2RMSNorm (float32 statistics).
    """
    if residual is not None:
        x = x.add_(residual)
    if x.dtype == torch.float32:
        var = x.pow(2).mean(-1, keepdim=True)  # [T, 1]
        return weight * (x * torch.rsqrt(var.add_(eps))), x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * h.to(x.dtype), x
