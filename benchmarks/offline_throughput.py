"""Offline throughput: the engine vs transformers' `generate`, side by side in one run.

Workload (fixed seed): `--num-requests` random prompts of token ids, prompt lengths uniform in
[32, 512] and output lengths uniform in [16, 256] (both multiplied by `--scale`), greedy, every
request `ignore_eos=True` with an exact `max_tokens`, so every system generates exactly the same
number of tokens. Systems:

- engine: `Engine.generate_all` over a `LocalExecutor` (all requests submitted at t=0, continuous
  batching over the paged KV cache);
- hf-sequential: `AutoModelForCausalLM` (bf16, sdpa) `generate(max_new_tokens=N, min_new_tokens=N,
  do_sample=False)`, one request at a time;
- hf-static-8: the same, in left-padded batches of 8 in arrival order, each batch run to the longest
  N of the batch; only each request's own N tokens count as useful output (the rest is waste that
  static batching pays and is part of what is measured).

Model loading and a short warm-up are outside the timings. Then the engine's greedy tokens for the
first 4 requests are compared with transformers' sequential ones (the reference); bf16 may diverge
legitimately after a near-tie, so the matching prefix length is printed, not just pass/fail.

    python benchmarks/offline_throughput.py                                # full: 64 requests, both peers
    python benchmarks/offline_throughput.py --num-requests 16 --scale 0.25  # quick estimate
    python benchmarks/offline_throughput.py --engine-only                  # engine alone (+ 4-request check)

This is a benchmark, not a test: nothing here is run by the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

# The weights and KV cache on huge pages, as in the served Router: read by torch once, at its first
# allocation, so set before the import (qwen2_model/hardware.py HUGE_PAGES_ENV). Only when run as a
# script: peers/run.py imports this module, and its peers' subprocesses keep their own defaults.
if __name__ == "__main__":
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qwen2_model.engine.engine import Engine, EngineConfig  # noqa: E402
from qwen2_model.engine.executor import LocalExecutor  # noqa: E402
from qwen2_model.engine.sampling import SamplingParams  # noqa: E402

DEFAULT_CHECKPOINT = "/tmp/qwen2-serve-bench/qwen2-0.5b-fp32"
NUM_VERIFY = 4
STATIC_BATCH = 8
LAST_CPU = [0.0]  # process CPU seconds of the last timed run (robust to other processes on the box)


# --- workload -------------------------------------------------------------------------------------

def make_workload(num_requests: int, seed: int, vocab_size: int, scale: float = 1.0,
                  prompt_range=(32, 512), output_range=(16, 256)) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output length)], reproducible from `seed`."""
    rng = random.Random(seed)
    lo_p, hi_p = (max(1, round(x * scale)) for x in prompt_range)
    lo_o, hi_o = (max(1, round(x * scale)) for x in output_range)
    work = []
    for _ in range(num_requests):
        plen, olen = rng.randint(lo_p, hi_p), rng.randint(lo_o, hi_o)
        work.append(([rng.randrange(vocab_size) for _ in range(plen)], olen))
    return work


def ensure_checkpoint(path: str, dtype: str = "float32") -> Path:
    ckpt = Path(path)
    if not (ckpt / "config.json").is_file():
        from qwen2_model.testing import write_random_checkpoint
        print(f"writing a random qwen2-0.5b {dtype} checkpoint to {ckpt} ...", flush=True)
        write_random_checkpoint(ckpt, preset="qwen2-0.5b", dtype=dtype)
    return ckpt


# --- systems --------------------------------------------------------------------------------------

def build_engine(ckpt: Path, args) -> Engine:
    executor = LocalExecutor(ckpt, dtype=args.dtype, device="cpu", kv_cache_memory=args.kv_cache_memory,
                             linear_kernel=args.linear_kernel)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=False)  # random prompts share nothing; keep it honest
    return Engine(executor, config)


def run_engine(engine: Engine, work) -> tuple[float, list[list[int]]]:
    prompts = {f"r{i}": p for i, (p, _) in enumerate(work)}
    params = {f"r{i}": SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for i, (_, n) in enumerate(work)}
    start, cpu = time.perf_counter(), time.process_time()
    out = engine.generate_all(prompts, params)
    seconds = time.perf_counter() - start
    LAST_CPU[0] = time.process_time() - cpu
    return seconds, [out[f"r{i}"][0] for i in range(len(work))]


def load_hf(ckpt: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _hf_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    pad = model.config.eos_token_id
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    return out[:, input_ids.shape[1]:]  # [B, n]


@torch.inference_mode()
def run_hf_sequential(model, work) -> tuple[float, list[list[int]]]:
    outputs = []
    start, cpu = time.perf_counter(), time.process_time()
    for prompt, n in work:
        ids = torch.tensor([prompt])
        outputs.append(_hf_generate(model, ids, torch.ones_like(ids), n)[0, :n].tolist())
    LAST_CPU[0] = time.process_time() - cpu
    return time.perf_counter() - start, outputs


@torch.inference_mode()
def run_hf_static(model, work, batch_size: int = STATIC_BATCH) -> tuple[float, list[list[int]], int]:
    """Left-padded batches in arrival order; returns (seconds, each request's own tokens, tokens computed)."""
    pad = model.config.eos_token_id
    outputs, computed = [], 0
    start, cpu = time.perf_counter(), time.process_time()
    for b in range(0, len(work), batch_size):
        batch = work[b:b + batch_size]
        width, n_max = max(len(p) for p, _ in batch), max(n for _, n in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gen = _hf_generate(model, ids, mask, n_max)
        outputs.extend(gen[i, :n].tolist() for i, (_, n) in enumerate(batch))
        computed += len(batch) * n_max
    LAST_CPU[0] = time.process_time() - cpu
    return time.perf_counter() - start, outputs, computed


# --- profile (engine only) ------------------------------------------------------------------------

class StepProfiler:
    """Per-step time split of the engine, by wrapping its functions in this process (no engine edits).

    CPU execution is synchronous, so wall time around a call is its cost. Categories nest: the
    engine step = scheduler/bookkeeping + executor; the executor = input building (token/position
    tensors, PagedAttentionBatch: slot mapping, decode slot tables) + decoder + LM head + sampling;
    the decoder = linears + attention + the rest (embedding, RMSNorm, rotary, SiLU, residual adds);
    attention = cache write (index_copy_) + KV gather (`k_cache[slots]`) + SDPA + the rest (q
    gather/scatter, masks). Steps are split into decode-only steps and steps with prefill tokens.
    """

    def __init__(self):
        import collections
        self.t = collections.defaultdict(float)
        self.cur = collections.defaultdict(float)
        self.steps = {"decode": [0, 0.0, 0], "mixed": [0, 0.0, 0]}  # count, seconds, tokens
        self._patches = []

    def wrap(self, owner, name, key):
        orig = getattr(owner, name)
        cur = self.cur

        def timed(*a, **kw):
            s = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                cur[key] += time.perf_counter() - s
        self._patches.append((owner, name, orig))
        setattr(owner, name, timed)

    def install(self, engine: Engine) -> None:
        from qwen2_model import parallel
        from qwen2_model.engine import paged_attention
        runner = engine.executor.runner
        self.wrap(parallel.ColumnParallelLinear, "forward", "linear")
        self.wrap(parallel.RowParallelLinear, "forward", "linear")
        self.wrap(paged_attention.PagedAttentionBatch, "attend", "attention")
        self.wrap(paged_attention.PagedAttentionBatch, "__init__", "build_inputs")
        self.wrap(runner.decoder, "forward_tokens", "decoder")
        self.wrap(runner.model, "compute_logits", "lm_head")
        self.wrap(runner, "_sample", "sampling")
        self.wrap(runner, "execute", "executor")
        self.wrap(engine.scheduler, "schedule", "schedule")
        # inside attention: the ops, via torch functions the attention module calls
        self.wrap(paged_attention, "gather_blocks", "kv_gather")  # the KV gather (index_select of whole blocks)
        self.wrap(torch.nn.functional, "scaled_dot_product_attention", "sdpa")
        self.wrap(torch.Tensor, "index_copy_", "cache_write")
        orig_step = engine.step

        def step():
            s = time.perf_counter()
            out = orig_step()
            dt = time.perf_counter() - s
            sched = engine.last_step.num_tokens, engine.last_step.prefill_tokens
            kind = "mixed" if sched[1] else "decode"
            self.steps[kind][0] += 1
            self.steps[kind][1] += dt
            self.steps[kind][2] += sched[0]
            self.cur["step"] += dt
            for k, v in self.cur.items():
                self.t[(kind, k)] += v
            self.cur.clear()
            return out
        engine.step = step

    def uninstall(self) -> None:
        for owner, name, orig in reversed(self._patches):
            setattr(owner, name, orig)

    def report(self) -> str:
        rows = [("step (total)", "step", None),
                ("  scheduler + engine bookkeeping", None, ("step", ["executor"])),
                ("  executor", "executor", None),
                ("    build inputs (tensors, slots)", None, ("executor", ["decoder", "lm_head", "sampling"])),
                ("    decoder forward", "decoder", None),
                ("      linear layers (qkv,o,gate_up,down)", "linear", None),
                ("      attention (PagedAttentionBatch)", "attention", None),
                ("        KV gather (blocks)", "kv_gather", None),
                ("        SDPA", "sdpa", None),
                ("        cache write index_copy_", "cache_write", None),
                ("        rest (q gather, masks, scatter)", None, ("attention", ["kv_gather", "sdpa", "cache_write"])),
                ("      rest (embed, norms, rotary, silu, adds)", None, ("decoder", ["linear", "attention"])),
                ("    LM head", "lm_head", None),
                ("    sampling", "sampling", None)]
        lines = []
        for kind, (n, secs, toks) in self.steps.items():
            if not n:
                continue
            lines.append(f"{kind} steps: {n}, {secs:.2f} s, {toks / n:.1f} tokens/step, {secs / n * 1e3:.1f} ms/step")
            for label, key, derived in rows:
                if key:
                    v = self.t[(kind, key)]
                else:
                    parent, minus = derived
                    v = self.t[(kind, parent)] - sum(self.t[(kind, m)] for m in minus)
                lines.append(f"  {label:<46}{v / n * 1e3:9.2f} ms/step {100 * v / secs:6.1f}%")
        return "\n".join(lines)


def _best(fn, reps: int = 7) -> float:
    """Min wall time of `reps` calls, in ms: robust to other processes preempting this one."""
    fn()
    best = float("inf")
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - s)
    return best * 1e3


class _Printing(dict):
    def __setitem__(self, name, ms):
        super().__setitem__(name, ms)
        print(f"  {name:<56}{ms:9.2f} ms", flush=True)


@torch.inference_mode()
def run_microprofile(engine: Engine, batch_seqs: int, context: int) -> None:
    """One decode step of `batch_seqs` sequences at `context` tokens each, split into its parts (min of N)."""
    from qwen2_model.engine.paged_attention import PagedAttentionBatch, SeqSlice, gather_blocks
    from qwen2_model.kernels import add_rms_norm
    from qwen2_model.layers import apply_rotary_qk
    runner = engine.executor.runner
    dec, cache, bs = runner.decoder, runner.cache, engine.blocks.block_size
    per_seq = -(-context // bs)
    slices = [SeqSlice(i, 1, context, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(batch_seqs)]
    B, L, layers = batch_seqs, context, len(dec.layers)
    attn = dec.layers[0].self_attn
    Hq, Hkv, D, E = attn.num_heads, attn.num_kv_heads, attn.head_dim, dec.config.hidden_size
    tokens = torch.randint(0, 1000, (B,))
    positions = torch.full((B,), L - 1)
    batch = PagedAttentionBatch(cache, slices, "cpu")
    x = torch.randn(B, E, dtype=dec.dtype)
    q, k, v = (torch.randn(B, h, D, dtype=dec.dtype) for h in (Hq, Hkv, Hkv))
    qk = torch.randn(B, Hq + Hkv, D, dtype=dec.dtype)
    tables, _, rows = batch._decode_meta
    kc = cache.keys[0]
    mask = batch._decode_mask(None)
    qd = q.view(B, Hkv, Hq // Hkv, D)
    kd = gather_blocks(kc, tables, bs).transpose(1, 2)
    mlp, lay = dec.layers[0].mlp, dec.layers[0]
    h1 = torch.randn(B, mlp.down_proj.in_local, dtype=dec.dtype)
    gu = torch.randn(B, 2 * mlp.down_proj.in_local, dtype=dec.dtype)
    logits = runner.model.compute_logits(x)
    cos, sin = dec.rotary_emb(positions, dec.dtype)
    r = _Printing()
    print(f"micro-profile: one decode step, {B} sequences x {L} context tokens, {layers} layers, "
          f"linear kernel {runner.linear_kernel}, {dec.dtype}, min of N, ms per step (components x {layers} layers):",
          flush=True)
    r["step: decoder forward_tokens (all layers)"] = _best(lambda: dec.forward_tokens(tokens, positions, batch), 3)
    r["  linears: qkv_proj"] = layers * _best(lambda: attn.qkv_proj(x))
    r["  linears: o_proj"] = layers * _best(lambda: attn.o_proj(x))
    r["  linears: gate_up_proj"] = layers * _best(lambda: mlp.gate_up_proj(x))
    r["  linears: down_proj"] = layers * _best(lambda: mlp.down_proj(h1))
    r["  attention: attend() total"] = layers * _best(lambda: batch.attend(0, q, k, v, None, attn.scale))
    r["    KV gather, whole blocks (k+v)"] = layers * 2 * _best(lambda: gather_blocks(kc, tables, bs))
    r["    SDPA (bool mask, GQA in seq dim)"] = layers * _best(lambda: torch.nn.functional.scaled_dot_product_attention(
        qd, kd, kd, attn_mask=mask, scale=attn.scale))
    r["    cache write index_copy_ (k+v)"] = layers * 2 * _best(lambda: kc.index_copy_(0, batch.slot_mapping, k))
    r["  residual add + RMSNorm x2"] = layers * 2 * _best(lambda: add_rms_norm(x.clone(), x, lay.input_layernorm.weight, 1e-6))
    r["  rotary (q and k together)"] = layers * _best(lambda: apply_rotary_qk(qk, cos, sin))
    r["  SiLU*up (in place)"] = layers * _best(lambda: torch.nn.functional.silu(gu[:, :h1.shape[1]]).mul_(gu[:, h1.shape[1]:]))
    r["LM head (tied, 151936 x 896)"] = _best(lambda: runner.model.compute_logits(x))
    r["sampling (greedy max + tolist)"] = _best(lambda: logits.max(-1).indices.tolist())
    r["build PagedAttentionBatch (slot tables)"] = _best(lambda: PagedAttentionBatch(cache, slices, "cpu"))


def run_profile(engine: Engine, work, torch_profile: str | None) -> None:
    prof = StepProfiler()
    prof.install(engine)
    try:
        secs, _ = run_engine(engine, work)
    finally:
        prof.uninstall()
    print(f"profiled run (timers add a little overhead): {secs:.1f} s, {sum(n for _, n in work) / secs:.1f} tok/s")
    print(prof.report(), flush=True)
    if torch_profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            run_engine(engine, work)
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        Path(torch_profile).write_text(table + "\n")
        print(table)


# --- report ---------------------------------------------------------------------------------------

def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply prompt (32-512) and output (16-256) lengths, e.g. 0.25 for a quick run")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="qwen2-0.5b-shaped checkpoint; written if absent")
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--engine-only", action="store_true", help="no peers (the 4-request check still runs HF)")
    who.add_argument("--peers", choices=["sequential", "static", "both"], default="both")
    ap.add_argument("--no-verify", action="store_true", help="skip the engine-vs-transformers greedy check")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="bytes of KV cache for the engine")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--dtype", default="float32", help="compute dtype of both systems (the checkpoint is float32)")
    ap.add_argument("--linear-kernel", default="auto", choices=["auto", "packed", "plain"],
                    help="the engine's linear kernel path (qwen2_model/kernels.py)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the comparison: run the engine alone with per-step timers and print the split")
    ap.add_argument("--microprofile", metavar="B,L", help="time the parts of one decode step of B sequences at "
                    "L context tokens (min of N: robust to a busy box) and exit, e.g. 64,400")
    ap.add_argument("--torch-profile", metavar="FILE", help="with --profile: also a torch.profiler op table, saved here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ckpt = ensure_checkpoint(args.checkpoint)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    work = make_workload(args.num_requests, args.seed, vocab, args.scale)
    total_out = sum(n for _, n in work)
    print(f"workload: {len(work)} requests, seed {args.seed}, scale {args.scale}: prompt tokens "
          f"{sum(len(p) for p, _ in work)} (min {min(len(p) for p, _ in work)}, max {max(len(p) for p, _ in work)}), "
          f"output tokens {total_out} (min {min(n for _, n in work)}, max {max(n for _, n in work)}); "
          f"greedy, ignore_eos; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    peers = [] if args.engine_only else (["sequential", "static"] if args.peers == "both" else [args.peers])
    results: dict[str, dict] = {}

    # engine
    engine = build_engine(ckpt, args)
    print(f"engine: max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}, "
          f"{engine.blocks.num_blocks} KV blocks x {engine.blocks.block_size} tokens", flush=True)
    run_engine(engine, make_workload(2, args.seed + 1, vocab, 0.1))  # warm-up
    if args.microprofile:
        b, l = (int(x) for x in args.microprofile.split(","))
        run_microprofile(engine, b, l)
        return 0
    if args.profile:
        run_profile(engine, work, args.torch_profile)
        return 0
    steps0 = engine.stats.steps
    secs, engine_out = run_engine(engine, work)
    assert [len(o) for o in engine_out] == [n for _, n in work], "engine did not produce exactly max_tokens"
    results["engine"] = dict(seconds=secs, tokens=total_out, steps=engine.stats.steps - steps0,
                             max_batch_seqs=engine.stats.max_batch_seqs, preemptions=engine.stats.preemptions,
                             load_after=os.getloadavg()[0], cpu_seconds=LAST_CPU[0])
    print(f"  engine: {secs:.1f} s, {total_out / secs:.1f} tok/s, {results['engine']['steps']} steps, "
          f"max batch {engine.stats.max_batch_seqs} seqs, {engine.stats.preemptions} preemptions", flush=True)
    del engine
    gc.collect()

    # transformers
    hf_seq_out = None
    if peers or not args.no_verify:
        model = load_hf(ckpt, getattr(torch, args.dtype))
        _hf_generate(model, torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), 2)  # warm-up
        if "sequential" in peers:
            secs, hf_seq_out = run_hf_sequential(model, work)
            results["hf-sequential"] = dict(seconds=secs, tokens=total_out, load_after=os.getloadavg()[0], cpu_seconds=LAST_CPU[0])
            print(f"  hf-sequential: {secs:.1f} s, {total_out / secs:.1f} tok/s", flush=True)
        if "static" in peers:
            secs, _, computed = run_hf_static(model, work)
            results["hf-static-8"] = dict(seconds=secs, tokens=total_out, computed_tokens=computed,
                                          load_after=os.getloadavg()[0], cpu_seconds=LAST_CPU[0])
            print(f"  hf-static-8: {secs:.1f} s, {total_out / secs:.1f} useful tok/s "
                  f"({computed} tokens generated, {computed - total_out} of them padding waste)", flush=True)
        if hf_seq_out is None and not args.no_verify:
            _, hf_seq_out = run_hf_sequential(model, work[:NUM_VERIFY])
        del model
        gc.collect()

    # table
    peer_names = [p for p in ("hf-sequential", "hf-static-8") if p in results]
    print()
    header = f"{'system':<16}{'wall s':>9}{'out tokens':>12}{'tok/s':>9}" + "".join(f"{'vs ' + p:>18}" for p in peer_names) + f"{'load':>7}{'cpu s':>9}{'tok/cpu-s':>11}" + "".join(f"{'cpu-ratio vs ' + p[3:]:>22}" for p in peer_names)
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        tps = r["tokens"] / r["seconds"]
        r["tokens_per_second"] = tps
        ratios = "".join(f"{tps / (results[p]['tokens'] / results[p]['seconds']):>17.2f}x" for p in peer_names)
        tpc = r["tokens"] / r["cpu_seconds"]
        cpu_ratios = "".join(f"{tpc / (results[p]['tokens'] / results[p]['cpu_seconds']):>21.2f}x" for p in peer_names)
        print(f"{name:<16}{r['seconds']:>9.1f}{r['tokens']:>12d}{tps:>9.1f}{ratios}{r['load_after']:>7.1f}"
              f"{r['cpu_seconds']:>9.1f}{tpc:>11.2f}{cpu_ratios}")
    print("(load: the 1-minute load average when the system finished; above the core count, other processes "
          "shared the CPU and wall numbers are noisy; cpu s = this process's CPU seconds, tok/cpu-s the contention-robust "
          "view — with 2 threads an idle box gives cpu s ~ 2 x wall s)")
    if "hf-static-8" in results:
        r = results["hf-static-8"]
        print(f"(hf-static-8 counts only each request's own max_tokens as output: it generated {r['computed_tokens']} "
              f"tokens, {r['computed_tokens'] - r['tokens']} of them for requests already done)")
    for p in peer_names:
        results["engine"][f"ratio_vs_{p}"] = results["engine"]["tokens_per_second"] / results[p]["tokens_per_second"]
    targets = {"hf-sequential": 4.0, "hf-static-8": 2.0}
    for p in peer_names:
        ok = results["engine"][f"ratio_vs_{p}"] >= targets[p]
        print(f"target engine >= {targets[p]:.0f}x {p}: {'MET' if ok else 'NOT MET'} "
              f"({results['engine'][f'ratio_vs_{p}']:.2f}x)")

    # greedy check
    if hf_seq_out is not None:
        print(f"\ngreedy check, engine vs transformers sequential (first {NUM_VERIFY} requests):")
        checks = []
        for i in range(min(NUM_VERIFY, len(work))):
            m = matching_prefix(engine_out[i], hf_seq_out[i])
            n = len(hf_seq_out[i])
            checks.append(dict(request=i, matching_prefix=m, tokens=n))
            status = "identical" if m == n else f"DIVERGES at token {m} (engine {engine_out[i][m]}, hf {hf_seq_out[i][m]})"
            print(f"  request {i}: prompt {len(work[i][0])}, {n} tokens: {m}/{n} match before divergence -> {status}")
        results["greedy_check"] = checks

    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), results=results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
