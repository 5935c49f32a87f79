"""Structured output's cost: 16 concurrent streams, half under a JSON schema, vs all unconstrained.

Both runs use the same engine, model and prompts in one process; only the constraint differs. The
checkpoint has random weights and the real Qwen vocabulary (151k tokens: the mask cost that matters;
the LM head is padded to 151936 as Qwen's), written once under --checkpoint-dir. Every request
generates exactly `--max-tokens` tokens (unconstrained: ignore_eos; constrained: a schema whose
array needs more items than fit, so the grammar never completes early), sampled at temperature 1
with seeds, so both runs do the same number of forward steps and the throughput ratio is a time ratio.

Reported: generated tokens / s for each run, the ratio (target: constrained mix >= 0.90x), and the
mask accounting of the constrained run: seconds the pool spent computing masks (overlapped with the
forward) and seconds the step waited for them after the forward (the part on the critical path).

    python benchmarks/structured_output.py                      # qwen2-0.5b shape, 16 streams
    python benchmarks/structured_output.py --layers 4 --max-tokens 48   # quicker, harsher (cheaper forward)

Record `uptime` and the CPU flags with the numbers (benchmarks/README.md). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qwen2_model.engine.engine import Engine, EngineConfig  # noqa: E402
from qwen2_model.engine.executor import LocalExecutor  # noqa: E402
from qwen2_model.engine.sampling import SamplingParams  # noqa: E402
from qwen2_model.engine.structured_output import StructuredOutput  # noqa: E402
from qwen2_model.testing import write_random_checkpoint  # noqa: E402

QWEN_TOKENIZER = ROOT.parent / "shared/fixtures/qwen-tokenizer"
# A realistic record schema (nesting, enums, bounded strings, integers) inside an array that needs
# more items than --max-tokens can hold: the constrained rows never finish early.
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 1000, "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                       "name": {"type": "string", "maxLength": 12},
                       "kind": {"enum": ["person", "place", "thing"]},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
        "required": ["id", "name", "kind", "tags"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False,
}


def checkpoint(directory: Path, layers: int) -> Path:
    out = directory / f"qwen2-0.5b-qwenvocab-{layers}l-fp32"
    if not (out / "model.safetensors").is_file():
        write_random_checkpoint(out, "qwen2-0.5b", tokenizer_dir=QWEN_TOKENIZER, num_hidden_layers=layers, seed=0)
    return out


def run(executor: LocalExecutor, prompts: dict[str, list[int]], constrained: set[str], max_tokens: int) -> dict:
    spec = StructuredOutput("json", json.dumps(SCHEMA))
    params = {rid: SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, ignore_eos=True,
                                  structured=spec if rid in constrained else None)
              for i, rid in enumerate(prompts)}
    grammars = executor.runner.grammars
    mask0, wait0 = grammars.mask_seconds, grammars.wait_seconds
    engine = Engine(executor, EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=512))
    t0 = time.perf_counter()
    out = engine.generate_all(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c) for choices in out.values() for c in choices)
    for rid in constrained:  # the constraint really held: a valid JSON prefix of the schema's shape
        assert executor.grammar.tokenizer.decode_str(out[rid][0]).startswith('{"records": [{"id": ')
    return dict(seconds=seconds, tokens=tokens, tok_s=tokens / seconds, steps=engine.stats.steps,
                mask_s=grammars.mask_seconds - mask0, wait_s=grammars.wait_seconds - wait0)


def sampler_cost(executor: LocalExecutor, streams: int, iters: int = 20) -> tuple[float, float]:
    """ms per Sampler call on [streams, V] random logits at temperature 1 (seeded rows): no masks vs
    half the rows masked (the critical-path part of structured output, apart from the pool)."""
    import torch

    from qwen2_model.engine.sampling import Sampler, SequenceSamplingState, make_generator

    V = executor.config.vocab_size
    logits = torch.randn(streams, V)
    matcher = executor.grammar.compile(StructuredOutput("json", json.dumps(SCHEMA)))
    bitmask = torch.empty(1, executor.grammar.words, dtype=torch.int32)
    executor.grammar.executor.unsafe_compute_mask_ptr([(matcher, 0)], bitmask.data_ptr(), bitmask.shape[1] * 4, 1)
    p = SamplingParams(temperature=1.0, max_tokens=16)
    out = []
    for masked in (False, True):
        states = [SequenceSamplingState(p, [], [], executor.config.eos_token_ids, make_generator(i),
                                        num_output_tokens=0, allowed_mask=bitmask[0] if masked and i % 2 == 0 else None)
                  for i in range(streams)]
        sampler = Sampler()
        sampler(logits, states)
        t0 = time.perf_counter()
        for _ in range(iters):
            sampler(logits, states)
        out.append((time.perf_counter() - t0) / iters * 1e3)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint-dir", default="/tmp/qwen2-serve-bench")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each mix; the best of each counts")
    args = ap.parse_args()

    ck = checkpoint(Path(args.checkpoint_dir), args.layers)
    executor = LocalExecutor(ck, dtype="float32", kv_cache_memory=1 << 30, tokenizer_path=ck)
    rng = random.Random(0)
    prompts = {f"r{i}": [rng.randrange(0, 150000) for _ in range(args.prompt_len)] for i in range(args.streams)}
    half = {f"r{i}" for i in range(0, args.streams, 2)}
    run(executor, {"warm": prompts["r0"]}, {"warm"}, 8)  # compile the schema, warm the kernels
    results: dict[str, list[dict]] = {"unconstrained": [], "half-json-schema": []}
    for _ in range(args.repeats):
        results["unconstrained"].append(run(executor, prompts, set(), args.max_tokens))
        results["half-json-schema"].append(run(executor, prompts, half, args.max_tokens))
    best = {name: max(rs, key=lambda r: r["tok_s"]) for name, rs in results.items()}
    load = os.getloadavg()
    print(f"model: qwen2-0.5b shape, {args.layers} layers, fp32, Qwen vocab; {args.streams} streams x "
          f"{args.max_tokens} tokens, prompt {args.prompt_len}; load avg {load[0]:.1f}")
    for name, r in best.items():
        print(f"  {name:18s} {r['tok_s']:8.1f} tok/s  ({r['tokens']} tokens in {r['seconds']:.2f} s, {r['steps']} steps;"
              f" masks {r['mask_s'] * 1e3:.0f} ms in the pool, {r['wait_s'] * 1e3:.0f} ms waited)")
    ratio = best["half-json-schema"]["tok_s"] / best["unconstrained"]["tok_s"]
    print(f"  ratio half-json-schema / unconstrained: {ratio:.3f} (target >= 0.90)")
    free_ms, masked_ms = sampler_cost(executor, args.streams)
    print(f"  sampler per step, {args.streams} rows: {free_ms:.1f} ms unconstrained, {masked_ms:.1f} ms with half "
          f"the rows masked")
    executor.shutdown()


if __name__ == "__main__":
    main()
