"""A bounded soak: steady mixed load for minutes, a Router replica killed periodically.

    python benchmarks/soak.py [--minutes 3 --kill-every 45 --clients 4]

Starts its own local Ray + Serve (loopback) with the demo causal LM behind 2 Router replicas, then
runs `--clients` threads of mixed traffic (completions streamed and not, chat, repeated prompts)
and, every `--kill-every` seconds, SIGKILLs one Router replica's process (a process this script
started through Ray; Serve replaces it). Every 10 s it samples the resident memory of the Ingress
and Router processes and each Router's KV usage and queue. At the end it prints the error rate
overall and outside the 15 s after each kill, the RSS of each process at start and end (growth
is a leak), and the KV usage when idle (must be 0: no leaked blocks).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import signal
import socket
import tempfile
import threading
import time
from collections import Counter

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_processes() -> dict[str, psutil.Process]:
    """Ingress and Router replica processes of this script's Ray (its descendants), by Ray's title."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for key in ("Ingress", "router-qwen2-demo"):
            if f"ServeReplica:soak:{key}" in title:
                out[f"{key}:{p.pid}"] = p
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--kill-every", type=float, default=45.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    os.environ.setdefault("QWEN2_SERVE_HOME", tempfile.mkdtemp(prefix="qwen2-soak-"))
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback-only Ray, as the CLI's
    import ray
    from ray import serve

    from deployments.app import build_app

    http_port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        app = build_app({"models": [{"name": "qwen2-demo", "path": "demo:causal_lm", "num_replicas": 2,
                                     "kv_cache_memory": 32 << 20, "torch_threads": 1,
                                     "engine": {"max_model_len": 1024}}]})
        serve.run(app, name="soak", route_prefix="/")
        url = f"http://127.0.0.1:{http_port}"
        router = serve.get_deployment_handle("router-qwen2-demo", app_name="soak")
        run(url, router, args)
    finally:
        serve.shutdown()
        ray.shutdown()


def run(url: str, router, args) -> None:
    stop = threading.Event()
    results: list[tuple[float, int]] = []  # (time, status; 0 = connection error)
    kills: list[float] = []
    samples: list[tuple[float, dict, list]] = []
    rng = random.Random(0)
    bodies = [
        ("/v1/completions", {"prompt": "A shared prefix for the cache " * 3, "max_tokens": 24}),
        ("/v1/completions", {"prompt": "Stream this", "max_tokens": 32, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}),
        ("/v1/completions", {"prompt": "Long one", "max_tokens": 200, "ignore_eos": True}),
    ]

    def client(i: int):
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                path, body = bodies[rng.randrange(len(bodies))]
                try:
                    status = c.post(path, json={"model": "qwen2-demo", **body}).status_code
                except httpx.HTTPError:
                    status = 0
                results.append((time.time(), status))

    def stats_of_replicas() -> list[dict]:
        seen = {}
        for _ in range(6):  # the handle picks a replica; ask a few times to see both
            try:
                s = router.stats.remote().result(timeout_s=10)
                seen[s["pid"]] = s
            except Exception:  # noqa: BLE001 (a replica being replaced)
                pass
        return list(seen.values())

    start = time.time()
    end = start + args.minutes * 60
    with cf.ThreadPoolExecutor(args.clients) as pool:
        for i in range(args.clients):
            pool.submit(client, i)
        next_kill, next_sample = start + args.kill_every, start
        while time.time() < end:
            now = time.time()
            if now >= next_sample:
                rss = {k: p.memory_info().rss >> 20 for k, p in serve_processes().items() if p.is_running()}
                samples.append((now - start, rss, [(s["pid"], round(s["kv_usage"], 3), s["running"], s["waiting"])
                                                   for s in stats_of_replicas()]))
                print(f"t={now - start:5.0f}s rss MiB {rss} routers (pid, kv, running, waiting) {samples[-1][2]}",
                      flush=True)
                next_sample = now + 10
            if now >= next_kill:
                victims = [p for k, p in serve_processes().items() if k.startswith("router")]
                if victims:
                    v = rng.choice(victims)
                    print(f"t={now - start:5.0f}s kill -9 router replica pid {v.pid}", flush=True)
                    os.kill(v.pid, signal.SIGKILL)
                    kills.append(now)
                next_kill = now + args.kill_every
            time.sleep(0.5)
        stop.set()
    time.sleep(5)
    idle = stats_of_replicas()

    def near_kill(t: float) -> bool:
        return any(0 <= t - k <= 15 for k in kills)

    total = Counter(s for _, s in results)
    quiet = Counter(s for t, s in results if not near_kill(t))
    err = lambda c: sum(v for k, v in c.items() if k != 200) / max(1, sum(c.values()))  # noqa: E731
    print(f"\n{args.minutes:g} min, {args.clients} clients, {len(kills)} replica kills")
    print(f"requests {sum(total.values())}: statuses {dict(total)}; error rate {err(total) * 100:.2f}% overall, "
          f"{err(quiet) * 100:.2f}% outside the 15 s after each kill")
    first, last = samples[0][1], samples[-1][1]
    for key in sorted(set(first) | set(last)):
        print(f"RSS {key:32s} {first.get(key, '-')} MiB at start -> {last.get(key, '-')} MiB at end")
    print("idle routers (pid, kv usage, running, waiting):",
          [(s["pid"], s["kv_usage"], s["running"], s["waiting"]) for s in idle])


if __name__ == "__main__":
    main()
