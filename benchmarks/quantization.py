"""Quantized weights on CPU: memory, decode speed and accuracy against fp32, all in one run.

    python benchmarks/quantization.py [--layers 24 --batch 16 --tokens 32 --threads 2]

One random checkpoint of the published Qwen2-0.5B shape (`--layers` to shorten it) is loaded as:
fp32, bf16, `--quantization int8` (weight-only, per output channel, `_weight_int8pack_mm`), and a
GPTQ 4-bit group-128 act-order copy of it (packed by qwen2_model.testing's writer) with the
dequant-at-load kernel and with torch's packed int4 CPU kernel. For each: bytes held by the weights,
greedy decode through the engine with one stream and with `--batch` streams (tokens/s, and the ratio
to fp32 measured in the same run), and accuracy against fp32 (the float model GPTQ was made from,
resp. the dequantized GPTQ model for the two GPTQ kernels): max |logit difference| on a 2 x 64
batch and greedy token agreement over the decoded tokens. The decoder linears are quantized; the
embedding / tied LM head stay in the model dtype (fp32 here).
Print the machine's state with the numbers: the box is shared, so compare ratios within a run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from qwen2_model.engine.engine import Engine, EngineConfig
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.loading import from_pretrained
from qwen2_model.quantization import weight_bytes
from qwen2_model.testing import write_quantized_checkpoint, write_random_checkpoint


def decode(path: Path, prompts: dict, tokens: int, **load) -> tuple[dict, float]:
    executor = LocalExecutor(path, kv_cache_memory=256 << 20, **load)
    engine = Engine(executor, EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048))
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.generate_all({"warm": [1, 2, 3]}, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    out = engine.generate_all(prompts, params)
    return {k: v[0] for k, v in out.items()}, time.perf_counter() - start


def agreement(a: dict, b: dict) -> float:
    """Greedy agreement: the share of decoded tokens before each sequence's first disagreement."""
    same = total = 0
    for k in a:
        total += len(a[k])
        for x, y in zip(a[k], b[k]):
            if x != y:
                break
            same += 1
    return same / max(total, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    flags = subprocess.run("grep -o 'avx[^ ]*\\|amx[^ ]*' /proc/cpuinfo | sort -u | tr '\\n' ' '", shell=True,
                           capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU flags: {flags}")
    print(f"load before: {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    shape = dict(preset="qwen2-0.5b", num_hidden_layers=args.layers, max_position_embeddings=4096)
    fp32_path = write_random_checkpoint(tmp / "fp32", dtype="float32", **shape)
    gptq_path = write_quantized_checkpoint(tmp / "gptq", method="gptq", bits=4, group_size=128, desc_act=True,
                                           reference_dir=tmp / "gptq-ref", dtype="float32", **shape)
    g = torch.Generator().manual_seed(0)
    one = {"s0": torch.randint(0, 150000, (16,), generator=g).tolist()}
    many = {f"s{i}": torch.randint(0, 150000, (16,), generator=g).tolist() for i in range(args.batch)}
    probe = torch.randint(0, 150000, (2, 64), generator=g)

    systems = [  # name, path, load kwargs, reference system for accuracy
        ("fp32", fp32_path, dict(dtype="float32"), None),
        ("bf16", fp32_path, dict(dtype="bfloat16"), "fp32"),
        ("int8 (fp32 act.)", fp32_path, dict(dtype="float32", quantization="int8"), "fp32"),
        ("int8 (bf16 act.)", fp32_path, dict(dtype="bfloat16", quantization="int8"), "fp32"),
        ("gptq-ref fp32", tmp / "gptq-ref", dict(dtype="float32"), None),
        ("gptq4 dequant", gptq_path, dict(dtype="float32", quant_kernel="dequant"), "gptq-ref fp32"),
        ("gptq4 packed", gptq_path, dict(dtype="float32", quant_kernel="packed"), "gptq-ref fp32"),
        ("gptq4 packed bf16", gptq_path, dict(dtype="bfloat16", quant_kernel="packed"), "gptq-ref fp32"),
    ]
    results, logits = {}, {}
    for name, path, load, ref in systems:
        model = from_pretrained(path, **load)
        with torch.inference_mode():
            logits[name] = model(probe).float()
        mem = weight_bytes(model)
        del model
        toks1, t1 = decode(path, one, args.tokens, **load)
        toksb, tb = decode(path, many, args.tokens, **load)
        results[name] = dict(mem=mem, one=args.tokens / t1, batch=args.batch * args.tokens / tb, toks={**toks1, **toksb})
        r = results[name]
        if ref:
            r["maxdiff"] = (logits[name] - logits[ref]).abs().max().item()
            r["agree"] = agreement(r["toks"], results[ref]["toks"])
        print(f"{name}: done", flush=True)
    base = results["fp32"]
    print(f"\n{args.layers} layers of Qwen2-0.5B's shape, decode {args.tokens} tokens after a 16-token prompt; "
          f"batched = {args.batch} streams")
    print("| system | weights MiB | 1 stream tok/s | x fp32 | batched tok/s | x fp32 | max abs logit diff | greedy agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        diff = f"{r['maxdiff']:.4f}" if "maxdiff" in r else "(reference)"
        agree = f"{100 * r['agree']:.1f}%" if "agree" in r else ""
        print(f"| {name} | {r['mem'] / 2**20:.0f} | {r['one']:.1f} | {r['one'] / base['one']:.2f} | "
              f"{r['batch']:.1f} | {r['batch'] / base['batch']:.2f} | {diff} | {agree} |")
    print(f"\nlogit scale: max |fp32 logit| = {logits['fp32'].abs().max().item():.3f}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
