"""Sampler cost per step: plain greedy rows vs rows with penalties, at a given batch and context.

    python benchmarks/sampler_step.py --rows 64 --context 2048

The penalties (repetition over prompt + output, frequency / presence over the output) touch only
the logits of tokens each row has seen; this prints what that costs next to the greedy fast path
on the same [rows, vocab] logits, so a regression to dense [B, V] work shows up as a ratio.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from qwen2_model.engine.sampling import Sampler, SamplingParams, SequenceSamplingState


def per_step_ms(sampler: Sampler, logits: torch.Tensor, states: list, repeats: int) -> float:
    sampler(logits, states)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        sampler(logits, states)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens per row (plus 200 generated)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    logits = torch.randn(args.rows, args.vocab).to(torch.bfloat16)

    def rows(**params) -> list[SequenceSamplingState]:
        return [SequenceSamplingState(SamplingParams(temperature=0.0, **params),
                                      [rng.randrange(args.vocab) for _ in range(args.context)],
                                      [rng.randrange(args.vocab) for _ in range(200)], [0])
                for _ in range(args.rows)]

    sampler = Sampler()
    greedy = per_step_ms(sampler, logits, rows(), args.repeats)
    print(f"{args.rows} rows x {args.vocab} vocab, {args.context} + 200 context tokens, {args.threads} threads")
    print(f"  greedy (fast path)                     {greedy:7.1f} ms per step")
    for name, params in (("repetition_penalty 1.1", dict(repetition_penalty=1.1)),
                         ("frequency + presence penalties", dict(frequency_penalty=0.5, presence_penalty=0.5)),
                         ("all three", dict(repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5))):
        ms = per_step_ms(sampler, logits, rows(**params), args.repeats)
        print(f"  {name:38s} {ms:7.1f} ms per step ({ms / greedy:.1f}x greedy)")


if __name__ == "__main__":
    main()
