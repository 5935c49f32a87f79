"""LoRA cost: engine throughput with 0, 1 and 4 distinct adapters in the batch, in one run.

Same workload for every system (fixed seed): `--num-requests` random token-id prompts of
`--prompt-len` tokens, `--max-tokens` greedy output tokens each (`ignore_eos`), all submitted at t=0
to `Engine.generate_all` over one `LocalExecutor` (prefix caching off: nothing is shared). Systems:

- base: no adapter (the base path; the LoRA hooks are not even installed until an adapter loads);
- base+hooks: no adapter, after adapters were loaded (hooks present, no row uses them);
- 1 adapter: every request under the same adapter;
- 4 adapters: requests round-robin over four adapters (four segments per linear per step).

Adapters: random, PEFT layout (qwen2_model.testing.write_random_lora), rank `--rank` on all seven
linears (q/k/v/o/gate/up/down). The systems run interleaved `--repeats` times and the best run of
each is reported (the box is shared), as tokens/s and as a ratio to `base` from the same run; the
load average and CPU flags are printed with the numbers.

    python benchmarks/lora_throughput.py                       # qwen2-0.5b shape, 16 requests
    python benchmarks/lora_throughput.py --num-requests 8 --max-tokens 16 --repeats 1   # quick

This is a benchmark, not a test: nothing here is run by the test suite.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qwen2_model.engine.engine import Engine, EngineConfig  # noqa: E402
from qwen2_model.engine.executor import LocalExecutor  # noqa: E402
from qwen2_model.engine.sampling import SamplingParams  # noqa: E402
from qwen2_model.testing import write_random_checkpoint, write_random_lora  # noqa: E402

DEFAULT_CHECKPOINT = "/tmp/qwen2-serve-bench/qwen2-0.5b-fp32"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    return " ".join(sorted(set(re.findall(r"\b(avx\S*|amx\S*)", text))))


def run(executor, prompts, params, loras, adapters, args) -> tuple[float, int]:
    engine = Engine(executor, EngineConfig(max_num_seqs=args.num_requests, max_num_batched_tokens=args.batched_tokens,
                                           enable_prefix_caching=False, max_loras=4, max_lora_rank=args.rank))
    for name, path in adapters.items():
        engine.add_lora(name, path)
    start = time.perf_counter()
    out = engine.generate_all(prompts, params, loras=loras)
    seconds = time.perf_counter() - start
    tokens = sum(len(v[0]) for v in out.values())
    return seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="qwen2-0.5b-shaped fp32 checkpoint; written if absent")
    ap.add_argument("--layers", type=int, default=0,
                    help="write (once) and use a qwen2-0.5b-shaped checkpoint with this many layers and an 8192-token "
                         "vocabulary instead: the decoder's linears dominate, the worst case for LoRA's relative cost")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batched-tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = Path(args.checkpoint)
    overrides = {}
    if args.layers:
        ckpt = Path(f"/tmp/qwen2-serve-bench/qwen2-0.5b-{args.layers}l-v8k-fp32")
        overrides = dict(num_hidden_layers=args.layers, vocab_size=8192)
    if not (ckpt / "config.json").is_file():
        print(f"writing a random qwen2-0.5b-shaped float32 checkpoint to {ckpt} ...", flush=True)
        write_random_checkpoint(ckpt, preset="qwen2-0.5b", dtype="float32", **overrides)
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    adapters = {f"ad{i}": str(write_random_lora(tmp / f"ad{i}", ckpt, r=args.rank, lora_alpha=2 * args.rank, seed=i))
                for i in range(4)}
    executor = LocalExecutor(ckpt, dtype="float32", kv_cache_memory=512 << 20)
    rng = random.Random(args.seed)
    vocab = executor.config.vocab_size
    prompts = {f"r{i}": [rng.randrange(vocab) for _ in range(args.prompt_len)] for i in range(args.num_requests)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    systems = {
        "base": ({}, {}),
        "base+hooks": ({}, adapters),
        "1 adapter": ({rid: "ad0" for rid in prompts}, adapters),
        "4 adapters": ({rid: f"ad{i % 4}" for i, rid in enumerate(prompts)}, adapters),
    }
    # warm-up
    run(executor, {"w": prompts["r0"][:16]}, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), {}, {}, args)
    best: dict[str, float] = {}
    for rep in range(args.repeats):
        for name, (loras, ads) in systems.items():
            if name == "base":  # the LoRA hooks are detached: the exact base path
                if executor.runner.lora is not None:
                    executor.runner.lora.detach()
                    executor.runner.lora = None
            seconds, tokens = run(executor, prompts, params, loras, ads, args)
            tps = tokens / seconds
            best[name] = max(best.get(name, 0.0), tps)
            print(f"  round {rep + 1}: {name:<11} {tokens} tokens in {seconds:6.2f} s = {tps:7.1f} tok/s", flush=True)
    print(f"\nqwen2-0.5b shape, {executor.config.num_hidden_layers} layers, vocab {vocab} ({ckpt}), fp32, {args.threads} threads, {args.num_requests} requests x "
          f"({args.prompt_len} prompt + {args.max_tokens} output) tokens, rank {args.rank} on all 7 linears")
    print(f"load average {os.getloadavg()}, CPU flags: {cpu_flags()}")
    print(f"{'system':<12} {'tok/s (best)':>13} {'vs base':>8}")
    for name, tps in best.items():
        print(f"{name:<12} {tps:13.1f} {tps / best['base']:8.3f}")


if __name__ == "__main__":
    main()
