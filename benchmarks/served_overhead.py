"""Where the served path spends CPU per token: each Ray process of `qwen2-serve run`, HTTP vs gRPC.

    python benchmarks/served_overhead.py                      # demo model, 64 streams x 64 tokens each way
    python benchmarks/served_overhead.py --requests 128 --concurrency 32 --max-tokens 64 --py-spy

On a tiny model (the demo causal LM: 2 layers, hidden 64) the engine's own compute is small, so what
a streamed token costs in Serve's proxies, the Ingress replica and the Router's event loop shows
plainly. The script starts `qwen2-serve run --model demo:causal_lm` on free ports, sends the same
streaming load over HTTP (`/v1/completions`) and gRPC (`GenerateStream`), and reads the CPU seconds
(utime + stime from /proc) of every process of the server between the start and the end of each
load, grouped by Ray's process title (`ray::ProxyActor`, `ray::ServeReplica:qwen2:Ingress`, ...).
Output: CPU ms per output token per process group and protocol, wall-clock tok/s, and with
`--py-spy` py-spy's collapsed stacks of the proxy, the Ingress and the Router replica for each protocol (py-spy must
be on PATH: `pip install py-spy`). CPU seconds, unlike wall time, stay meaningful on a busy box.
This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from load_client import GrpcClient, HttpClient, run_load, summarize  # noqa: E402
from load_servers import QwenServer, process_tree  # noqa: E402

MODEL = "qwen2-demo"


def group_of(title: str) -> str:
    """A short name for a process: Ray actors by their title, the rest by what they run."""
    m = re.match(r"ray::(\S+)", title)
    if m:
        name = m.group(1)
        if name.startswith("ServeReplica:"):
            return "replica " + name.split(":")[-1]
        return name.split(".")[0]  # an actor's title names the method it runs: ServeController.listen_for_change
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py", "deployments.cli"):
        if key in title:
            return key
    return "other"


def cpu_by_group(tree_before: dict, tree_after: dict) -> dict[str, float]:
    groups: dict[str, float] = {}
    for pid, (title, cpu) in tree_after.items():
        start = tree_before.get(pid, (title, 0.0))[1]
        groups[group_of(title)] = groups.get(group_of(title), 0.0) + cpu - start
    return groups


def top_frames(stacks: Path, n: int = 12) -> list[tuple[str, float]]:
    """The functions most often on the stack (inclusive share of samples) in a py-spy raw file."""
    counts, total = {}, 0
    for line in stacks.read_text().splitlines():
        frames, _, k = line.rpartition(" ")
        total += int(k)
        for f in set(frames.split(";")):
            counts[f] = counts.get(f, 0) + int(k)
    skip = ("<module>", "run (", "_run_once", "run_forever", "run_until_complete", "_run (", "main (")
    ranked = [(f, c / total) for f, c in sorted(counts.items(), key=lambda x: -x[1]) if not f.startswith(skip)]
    return ranked[:n]


def spy(pids: dict[str, int], seconds: float, out_dir: Path, tag: str) -> list[subprocess.Popen]:
    """py-spy record of the named processes for `seconds` (collapsed stacks, flamegraph.pl's input)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = []
    for name, pid in pids.items():
        stacks = out_dir / f"{tag}-{name.replace(' ', '_')}.txt"
        procs.append(subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50",
                                       "-f", "raw", "-o", str(stacks), "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


async def load(client, work, concurrency: int):
    async with client as c:
        await run_load(c.send, work[:2], concurrency=2)  # warm-up: lazy initialisation is not measured
        return await run_load(c.send, work, concurrency=concurrency)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--protocols", default="http,grpc")
    p.add_argument("--py-spy", action="store_true", help="py-spy stacks of the proxy, the Ingress and the Router per protocol")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/served_overhead-TIME)")
    args = p.parse_args()
    out = Path(args.out or HERE / "results" / time.strftime("served_overhead-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)

    from load_client import Work
    import random
    rng = random.Random(0)
    work = [Work([rng.randrange(500) for _ in range(args.prompt_len)], args.max_tokens) for _ in range(args.requests)]
    server_args = SimpleNamespace(dtype="float32", kv_cache_memory=64 << 20, max_model_len=1024, max_num_seqs=64,
                                  max_num_batched_tokens=512, prefill_step_ratio=2.0, prefill_drain_steps=4,
                                  max_prefill_tokens=None,
                                  threads=1)
    server = QwenServer(out / "server.log", "demo:causal_lm", MODEL, server_args)
    rows = {}
    with server:
        for proto in args.protocols.split(","):
            client = (HttpClient(server.base_url, MODEL) if proto == "http"
                      else GrpcClient(server.grpc_target, MODEL))
            before = process_tree(server.proc.pid, with_titles=True)
            spies = []
            if args.py_spy:
                named = {group_of(t): pid for pid, (t, _) in before.items()
                         if group_of(t) in ("ProxyActor", "replica Ingress") or group_of(t).startswith("replica router")}
                spies = spy(named, 20, out, proto)
            results, seconds = asyncio.run(load(client, work, args.concurrency))
            after = process_tree(server.proc.pid, with_titles=True)
            for s in spies:
                s.wait()
            summary = summarize(results, seconds, 1e9, 1e9)
            tokens = summary["output_tokens"]
            groups = cpu_by_group(before, after)
            rows[proto] = {"output_tokens": tokens, "failed": summary["failed"], "seconds": seconds,
                           "tok_per_s": summary["output_throughput"], "ttft_ms": summary["ttft_ms"],
                           "itl_ms": summary["itl_ms"], "tokens_per_chunk": summary["tokens_per_chunk"],
                           "cpu_ms_per_token": {g: 1000 * v / max(tokens, 1) for g, v in sorted(groups.items())}}
    (out / "results.json").write_text(json.dumps({"args": vars(args), "load": os.getloadavg(), "runs": rows}, indent=1))
    groups = sorted({g for r in rows.values() for g in r["cpu_ms_per_token"]})
    print(f"load average {os.getloadavg()}; {args.requests} requests x {args.max_tokens} tokens, c={args.concurrency}")
    print("CPU ms per output token | " + " | ".join(rows))
    for g in groups:
        print(f"{g:>28} | " + " | ".join(f"{rows[p]['cpu_ms_per_token'].get(g, 0):8.2f}" for p in rows))
    for proto, r in rows.items():
        print(f"{proto}: {r['tok_per_s']:.1f} tok/s, {r['output_tokens']} tokens, {r['failed']} failed, "
              f"{r['tokens_per_chunk']:.2f} tokens/chunk, TTFT p50 {r['ttft_ms']['p50']:.0f} ms, "
              f"ITL p50/p99 {r['itl_ms']['p50']:.0f}/{r['itl_ms']['p99']:.0f} ms")
    for stacks in sorted(out.glob("*.txt")):
        print(f"-- {stacks.stem}: most often on the stack")
        for frame, share in top_frames(stacks):
            print(f"   {share:5.0%}  {frame[:150]}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
