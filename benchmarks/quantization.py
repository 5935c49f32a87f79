"""Quantized weights on CPU: memory, decode speed and accuracy against fp32, all in one run.

    python benchmarks/quantization.py                  # small preset: a few minutes on 2 cores
    python benchmarks/quantization.py --preset full    # the whole Qwen2-0.5B shape (24 layers, 151936 vocab)
    python benchmarks/quantization.py --gptq           # also GPTQ 4-bit (dequant and packed int4 kernels)

One random checkpoint of the published Qwen2-0.5B shape is loaded as: fp32, bf16, `--quantization
int8` (weight-only, per output channel, `_weight_int8pack_mm`) with fp32 and with bf16 activations,
and with `--gptq` a GPTQ 4-bit group-128 act-order copy of it (packed by qwen2_model.testing's writer)
with the dequant-at-load kernel and with torch's packed int4 CPU kernel. Presets: `small` keeps the
layer shapes but has 4 layers and a 32768-token vocabulary (the LM head, which is never quantized,
then weighs against the decoder linears about as in the full model: 29M vs 60M parameters, full
136M vs 360M); `full` is the published shape. `--layers` / `--vocab` override either.

For each system: bytes held by the weights; greedy generation through the engine (no prefix cache)
with one stream and with `--batch` streams: decode tokens/s (the steps after every stream has its first token,
so prefill is out), tokens/s including the prompts' prefill, and the
batched prefill + first-token time, each with its ratio to fp32. All systems stay loaded and are
timed round-robin for `--repeats` rounds, each keeping its best round, so a load change on the
shared box hits all alike. Accuracy against fp32 (the float model GPTQ was made from,
resp. the dequantized GPTQ model for the two GPTQ kernels): max |logit difference| on a 2 x 64
batch and greedy token agreement over the decoded tokens. The decoder linears are quantized; the
embedding / tied LM head stay in the model dtype (fp32 here).
Print the machine's state with the numbers: the box is shared, so compare ratios within a run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
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

PRESETS = {"small": {"layers": 4, "vocab": 32768}, "full": {"layers": 24, "vocab": 151936}}


def make_engine(path: Path, **load) -> Engine:
    executor = LocalExecutor(path, kv_cache_memory=256 << 20, **load)
    # no prefix cache: every round re-runs the same prompts and must pay their prefill again
    engine = Engine(executor, EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048, enable_prefix_caching=False))
    engine.generate_all({"warm": [1, 2, 3]}, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    return engine


def timed(engine: Engine, prompts: dict, tokens: int) -> tuple[dict, float, float]:
    """Greedy tokens, the time until every stream has its first token (prefill), and the time of the
    decode steps after it (tokens - 1 per stream)."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    toks: dict[str, list[int]] = {rid: [] for rid in prompts}
    start = time.perf_counter()
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            toks[out.request_id].extend(out.new_token_ids)
        if first is None and all(toks.values()):
            first = time.perf_counter()
    return toks, first - start, time.perf_counter() - first


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
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds over all systems; each keeps its best")
    p.add_argument("--gptq", action="store_true", help="also GPTQ 4-bit with the dequant and packed kernels")
    args = p.parse_args()
    preset = dict(PRESETS[args.preset])
    args.layers = args.layers or preset["layers"]
    args.vocab = args.vocab or preset["vocab"]
    print("command: python benchmarks/quantization.py " + " ".join(sys.argv[1:]))
    torch.set_num_threads(args.threads)
    flags = subprocess.run("grep -o 'avx[^ ]*\\|amx[^ ]*' /proc/cpuinfo | sort -u | tr '\\n' ' '", shell=True,
                           capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU flags: {flags}")
    print(f"load before: {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    shape = dict(preset="qwen2-0.5b", num_hidden_layers=args.layers, vocab_size=args.vocab,
                 max_position_embeddings=4096)
    fp32_path = write_random_checkpoint(tmp / "fp32", dtype="float32", **shape)
    if args.gptq:
        gptq_path = write_quantized_checkpoint(tmp / "gptq", method="gptq", bits=4, group_size=128, desc_act=True,
                                               reference_dir=tmp / "gptq-ref", dtype="float32", **shape)
    g = torch.Generator().manual_seed(0)
    high = min(args.vocab, 150000)
    one = {"s0": torch.randint(0, high, (16,), generator=g).tolist()}
    many = {f"s{i}": torch.randint(0, high, (16,), generator=g).tolist() for i in range(args.batch)}
    probe = torch.randint(0, high, (2, 64), generator=g)

    systems = [  # name, path, load kwargs, reference system for accuracy
        ("fp32", fp32_path, dict(dtype="float32"), None),
        ("bf16", fp32_path, dict(dtype="bfloat16"), "fp32"),
        ("int8 (fp32 act.)", fp32_path, dict(dtype="float32", quantization="int8"), "fp32"),
        ("int8 (bf16 act.)", fp32_path, dict(dtype="bfloat16", quantization="int8"), "fp32"),
    ]
    if args.gptq:
        systems += [
            ("gptq-ref fp32", tmp / "gptq-ref", dict(dtype="float32"), None),
            ("gptq4 dequant", gptq_path, dict(dtype="float32", quant_kernel="dequant"), "gptq-ref fp32"),
            ("gptq4 packed", gptq_path, dict(dtype="float32", quant_kernel="packed"), "gptq-ref fp32"),
            ("gptq4 packed bf16", gptq_path, dict(dtype="bfloat16", quant_kernel="packed"), "gptq-ref fp32"),
        ]
    results, logits, engines = {}, {}, {}
    began = time.perf_counter()
    for name, path, load, ref in systems:
        model = from_pretrained(path, **load)
        with torch.inference_mode():
            logits[name] = model(probe).float()
        results[name] = dict(mem=weight_bytes(model), toks={}, t={})
        del model
        engines[name] = make_engine(path, **load)
    # Round-robin, best of --repeats: each system's time is its quietest round, and a load change on
    # the shared box hits every system alike.
    for rnd in range(args.repeats):
        for name, *_ in systems:
            r = results[name]
            for kind, prompts in (("one", one), ("batch", many)):
                toks, first, decode = timed(engines[name], prompts, args.tokens)
                r["toks"].update(toks)
                for key, value in ((kind + "_first", first), (kind + "_decode", decode), (kind, first + decode)):
                    r["t"][key] = min(r["t"].get(key, float("inf")), value)
        print(f"round {rnd + 1}/{args.repeats} done ({time.perf_counter() - began:.0f} s so far, "
              f"load {os.getloadavg()[0]:.1f})", flush=True)
    for name, _, _, ref in systems:
        r, t, steps = results[name], results[name]["t"], args.tokens - 1
        r.update(one=steps / t["one_decode"], batch=args.batch * steps / t["batch_decode"],
                 e2e=args.batch * args.tokens / t["batch"], first=t["batch_first"])
        if ref:
            r["maxdiff"] = (logits[name] - logits[ref]).abs().max().item()
            r["agree"] = agreement(r["toks"], results[ref]["toks"])
    base = results["fp32"]
    print(f"\n{args.layers} layers of Qwen2-0.5B's shape, vocabulary {args.vocab}; {args.tokens} greedy tokens after a "
          f"16-token prompt; batched = {args.batch} streams; best of {args.repeats} rounds")
    print("| system | weights MiB | decode tok/s, 1 stream | x fp32 | decode tok/s, batched | x fp32 | "
          "batched incl. prefill tok/s | x fp32 | batched prefill + 1st token s | max abs logit diff | greedy agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        diff = f"{r['maxdiff']:.4f}" if "maxdiff" in r else "(reference)"
        agree = f"{100 * r['agree']:.1f}%" if "agree" in r else ""
        print(f"| {name} | {r['mem'] / 2**20:.0f} | {r['one']:.1f} | {r['one'] / base['one']:.2f} | "
              f"{r['batch']:.1f} | {r['batch'] / base['batch']:.2f} | {r['e2e']:.1f} | {r['e2e'] / base['e2e']:.2f} | "
              f"{r['first']:.2f} | {diff} | {agree} |")
    print(f"\nlogit scale: max |fp32 logit| = {logits['fp32'].abs().max().item():.3f}")
    print(f"load after: {os.getloadavg()}; wall {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
