"""Our GPTQ / AWQ packers (qwen2_model/quantization/packing.py) against the real tools' own packers.

    P=~/.cache/qwen2-serve-peers/quanttools; mkdir -p $P && cd $P
    pip download --no-deps --only-binary=:all: auto-gptq==0.7.1 autoawq==0.2.7.post3 -d .
    unzip -q -o auto_gptq-*.whl -d gptq && unzip -q -o autoawq-*.whl -d awq
    cd - && python benchmarks/quant_layout_crosscheck.py $P

AutoGPTQ's `QuantLinear.pack` (qlinear_cuda.py, the g_idx-aware packer AutoGPTQ writes checkpoints
with) and AutoAWQ's `WQLinear_GEMM.from_linear` are pure torch/numpy; they are loaded from the wheels
without their CUDA extensions or package __init__s (which pull in accelerate and every model), so
they run on this CPU box. Neither tool can *quantize* a model here (CUDA kernels, transformers 4
APIs), which is why the tests pack with our own writer: this script shows that writer's layout is
byte-for-byte theirs. Prints one line per case; fails with an AssertionError otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

from qwen2_model.quantization import packing


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gptq(root: Path) -> None:
    ag = load("qlinear_cuda", root / "gptq/auto_gptq/nn_modules/qlinear/qlinear_cuda.py")
    for bits, group, act in [(4, 32, False), (4, 32, True), (8, 64, True), (4, 128, False)]:
        IN, OUT = 256, 64
        g_idx = torch.arange(IN) // group
        if act:
            g_idx = g_idx[torch.randperm(IN)]
        G, maxq = IN // group, 2 ** bits - 1
        scales = (torch.rand(G, OUT) * 0.01 + 0.001).half()
        zeros = torch.randint(1, maxq, (G, OUT))
        q = torch.randint(0, maxq + 1, (IN, OUT))
        linear = torch.nn.Linear(IN, OUT, bias=False)
        linear.weight.data = packing.dequantize(q, zeros, scales, g_idx)
        ql = ag.QuantLinear(bits, group, IN, OUT, bias=False)
        # AutoGPTQ takes scales/zeros as [out, groups] and edits zeros in place: pass copies
        ql.pack(linear, scales.float().t().clone(), zeros.t().clone(), g_idx=g_idx.int())
        qweight, qzeros = packing.gptq_pack(q, zeros, bits)
        assert torch.equal(ql.qweight, qweight), f"GPTQ qweight differs: {bits}-bit group {group} act {act}"
        assert torch.equal(ql.qzeros, qzeros), f"GPTQ qzeros differs: {bits}-bit group {group} act {act}"
        print(f"AutoGPTQ 0.7.1 pack == ours: {bits}-bit, group {group}, act-order {act}")


def awq(root: Path) -> None:
    sys.path.insert(0, str(root / "awq"))
    for name in ("awq", "awq.utils"):  # bare packages: their __init__ imports every model (accelerate, ...)
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / "awq" / name.replace(".", "/"))]
        sys.modules[name] = pkg
    utils = types.ModuleType("awq.utils.utils")
    utils.get_best_device = lambda: "cpu"
    sys.modules["awq.utils.utils"] = utils
    gemm = load("awq_gemm", root / "awq/awq/modules/linear/gemm.py")
    for group in (32, 128):
        IN, OUT = 256, 64
        scales = (torch.rand(IN // group, OUT) * 0.01 + 0.001).half()
        zeros = torch.randint(0, 16, (IN // group, OUT))
        q = torch.randint(0, 16, (IN, OUT))
        linear = torch.nn.Linear(IN, OUT, bias=False)
        linear.weight.data = packing.dequantize(q, zeros, scales, torch.arange(IN) // group).half()
        wq = gemm.WQLinear_GEMM.from_linear(linear, 4, group, init_only=False, scales=scales.clone(), zeros=zeros.clone())
        qweight, qzeros = packing.awq_pack(q, zeros)
        assert torch.equal(wq.qweight, qweight), f"AWQ qweight differs: group {group}"
        assert torch.equal(wq.qzeros, qzeros), f"AWQ qzeros differs: group {group}"
        print(f"AutoAWQ 0.2.7 WQLinear_GEMM.from_linear == ours: 4-bit, group {group}")


if __name__ == "__main__":
    torch.manual_seed(0)
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/qwen2-serve-peers/quanttools").expanduser()
    gptq(root)
    awq(root)
