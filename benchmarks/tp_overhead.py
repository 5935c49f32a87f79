"""What the Ray hop costs per engine step, and what a rank holds in memory at tp=1 vs tp=2.

1. Per-step overhead: the same decode step (a batch of sequences, one new token each, greedy
   sampling) through LocalExecutor (in this process), RayExecutor(tp=1) and RayExecutor(tp=2) on
   the tiny preset, where the model costs next to nothing and the hop dominates. Prints ms/step,
   and the round trip of a no-op call to every rank (the hop alone; tp=2 adds gloo collectives).
2. Memory: RayExecutor(tp=1) and (tp=2) on a ~240 MB fp32 checkpoint with the Qwen2-0.5B layout
   (14 heads, 2 KV heads, hidden 896, intermediate 4864; 2 layers, 32k vocabulary). Prints per rank:
   parameter bytes, resident memory before and after loading, and peak resident memory.

    .venv/bin/python benchmarks/tp_overhead.py [--steps 300] [--batch 8]

Runs on CPU with gloo (a GPU machine uses nccl with the same code). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import ray
import torch

from deployments.workers import RayExecutor
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.model_runner import SeqStep, StepInput
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.testing import write_random_checkpoint

MB = 1 << 20


def decode_step(batch: int, prompt_len: int, block_size: int, params: SamplingParams) -> tuple[StepInput, StepInput]:
    """A prefill of `batch` sequences, then the decode step that follows it (one token each)."""
    blocks_per_seq = -(-(prompt_len + 1) // block_size)
    prefill, decode = [], []
    for i in range(batch):
        table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        prefill.append(SeqStep(i, list(range(10, 10 + prompt_len)), 0, table, True, params))
        decode.append(SeqStep(i, [42], prompt_len, table, True, params, num_output_tokens=1))
    return StepInput(prefill), StepInput(decode)


def time_steps(executor, prefill: StepInput, decode: StepInput, steps: int) -> list[float]:
    executor.execute(prefill)
    for _ in range(10):  # warm-up
        executor.execute(decode)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = executor.execute(decode)
        times.append((time.perf_counter() - start) * 1e3)
    assert len(out.sampled) == len(decode.seqs)
    return times


def time_pings(executor: RayExecutor, steps: int) -> list[float]:
    """A no-op call to every rank and the same failure-aware wait: the hop without the model."""
    group = executor.group
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        group.gather([a.ping.remote() for a in group.actors])
        times.append((time.perf_counter() - start) * 1e3)
    return times


def overhead(args) -> None:
    path = write_random_checkpoint(tempfile.mkdtemp(prefix="tp-bench-tiny-"), preset="tiny")
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    prefill, decode = decode_step(args.batch, 16, 16, params)
    print(f"per-step time, tiny preset, decode batch {args.batch}, {args.steps} steps, torch threads 1 per rank")
    print(f"{'executor':<22}{'mean ms':>10}{'p50 ms':>10}{'p90 ms':>10}{'hop ms (p50)':>14}")
    local_p50 = None
    for name, make in [("LocalExecutor", lambda: LocalExecutor(path, kv_cache_memory=16 * MB)),
                       ("RayExecutor tp=1", lambda: RayExecutor(path, tp=1, kv_cache_memory=16 * MB)),
                       ("RayExecutor tp=2", lambda: RayExecutor(path, tp=2, kv_cache_memory=16 * MB))]:
        ex = make()
        try:
            times = time_steps(ex, prefill, decode, args.steps)
            pings = time_pings(ex, args.steps) if isinstance(ex, RayExecutor) else None
        finally:
            ex.shutdown()
        p50 = statistics.median(times)
        p90 = sorted(times)[int(0.9 * len(times))]
        local_p50 = p50 if local_p50 is None else local_p50
        print(f"{name:<22}{statistics.fmean(times):>10.3f}{p50:>10.3f}{p90:>10.3f}{p50 - local_p50:>14.3f}")
        if pings:
            print(f"{'  ping all ranks':<22}{statistics.fmean(pings):>10.3f}{statistics.median(pings):>10.3f}"
                  f"{sorted(pings)[int(0.9 * len(pings))]:>10.3f}")


def memory(args) -> None:
    path = write_random_checkpoint(tempfile.mkdtemp(prefix="tp-bench-05b-"), preset="qwen2-0.5b",
                                   num_hidden_layers=2, vocab_size=32768, dtype="float32")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"\nmemory per rank, Qwen2-0.5B layout, 2 layers, 32k vocab, fp32: checkpoint {size / MB:.0f} MB")
    print(f"{'tp':<4}{'rank':<6}{'params MB':>11}{'RSS before MB':>15}{'RSS after MB':>14}{'growth MB':>11}"
          f"{'peak RSS MB':>13}")
    for tp in (1, 2):
        ex = RayExecutor(path, tp=tp, kv_cache_memory=1 * MB)
        try:
            for info in ex.worker_info():
                growth = info["rss_bytes"] - info["rss_before_load_bytes"]
                print(f"{tp:<4}{info['rank']:<6}{info['param_bytes'] / MB:>11.1f}"
                      f"{info['rss_before_load_bytes'] / MB:>15.1f}{info['rss_bytes'] / MB:>14.1f}"
                      f"{growth / MB:>11.1f}{info['peak_rss_bytes'] / MB:>13.1f}")
        finally:
            ex.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same as each rank, so LocalExecutor is a fair baseline
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        overhead(args)
        if not args.skip_memory:
            memory(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
