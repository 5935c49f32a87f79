"""Cost of the prefix cache's SHA-256 block keys: per block, and per engine step on a real workload.

    python benchmarks/prefix_hash.py [--requests 64 --prompt 512 --output 64]

`block_manager.block_hash` keys every full KV block (16 tokens) with SHA-256 over the parent key and the
ids, instead of Python's `hash` (forgeable: tests/unit/test_prefix_hash.py). This prints the time
per block of both keys, then runs the engine (tiny random model, greedy) on one workload twice,
once with each key, counting the time spent inside the key function per engine step and the step
time itself, so the hash's share of a step is a measured ratio, not a guess.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import timeit

from qwen2_model.engine import block_manager
from qwen2_model.engine.engine import Engine, EngineConfig
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.testing import write_random_checkpoint


def python_hash_key(parent, tokens):
    """The old, forgeable key (for comparison only)."""
    return hash((parent, tuple(tokens)))


def per_block_us(fn, n: int = 100_000) -> float:
    tokens = list(range(1000, 1016))
    parent = fn(None, tokens)
    return timeit.timeit(lambda: fn(parent, tokens), number=n) / n * 1e6


def run_engine(checkpoint, key_fn, args) -> dict:
    calls = {"n": 0, "s": 0.0}

    def timed(parent, tokens):
        t = time.perf_counter()
        try:
            return key_fn(parent, tokens)
        finally:
            calls["n"] += 1
            calls["s"] += time.perf_counter() - t

    block_manager.block_hash = timed  # the BlockManager looks the function up at call time
    engine = Engine(LocalExecutor(checkpoint, kv_cache_memory=64 << 20), EngineConfig(max_model_len=2048))
    rng = random.Random(0)
    shared = [rng.randrange(400) for _ in range(args.prompt // 2)]  # half of each prompt is a shared prefix
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.output)
    for i in range(args.requests):
        engine.add_request(f"r{i}", shared + [rng.randrange(400) for _ in range(args.prompt - len(shared))], params)
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    total = time.perf_counter() - start
    return {"steps": steps, "step_ms": total / steps * 1e3, "hash_calls": calls["n"],
            "hash_us_per_step": calls["s"] / steps * 1e6, "share": calls["s"] / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=64)
    args = parser.parse_args()
    sha = block_manager.block_hash
    print(f"per block of 16 ids: sha256 {per_block_us(sha):.2f} us, python hash {per_block_us(python_hash_key):.2f} us")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_random_checkpoint(tmp, preset="tiny", seed=0)
        for name, fn in (("python hash", python_hash_key), ("sha256", sha)):
            r = run_engine(checkpoint, fn, args)
            print(f"{name:12s}: {r['steps']} steps, {r['step_ms']:.2f} ms/step, {r['hash_calls']} keys, "
                  f"{r['hash_us_per_step']:.1f} us/step hashing ({r['share'] * 100:.3f}% of step time)")
    block_manager.block_hash = sha


if __name__ == "__main__":
    main()
