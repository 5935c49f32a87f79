"""Every Grafana panel query answers: a real Prometheus scraping a real `qwen2-serve demo`.

    python benchmarks/prometheus_check.py [--traffic-s 40] [--prometheus /usr/bin/prometheus]

Starts `qwen2-serve demo` on free ports (loopback Ray, its metrics endpoint on a free port), starts
Prometheus (Debian's `prometheus` package: `apt-get install -y prometheus`) with
deployments/monitoring/prometheus.yml (its target rewritten to that port, scrapes every 2 s), sends
mixed traffic (completions streamed or not, chat, repeated prompts for prefix-cache hits, classify,
bad requests and unknown models for the error panel), waits for Ray's exporter (10 s refresh) and
two scrapes, then evaluates every panel query of deployments/monitoring/grafana-dashboard.json
through Prometheus's HTTP API (`$model` = `.*`, `$__rate_interval` = `1m`) and prints, per query,
how many series came back and one value. Exit status 1 if any query returned no data.
Not a CI test (it takes about two minutes and needs the Prometheus binary); the result is in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
KEY = "prom-check-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, headers=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=5, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def panel_queries(dashboard: Path) -> list[tuple[str, str]]:
    out = []

    def walk(panels):
        for p in panels or []:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels"))

    walk(json.loads(dashboard.read_text())["panels"])
    return out


def traffic(http: str, seconds: float) -> dict:
    """Mixed load for `seconds` from 4 threads; returns status counts."""
    counts: dict = {}
    deadline = time.time() + seconds
    bodies = [
        ("/v1/completions", {"model": "qwen2-demo", "prompt": "The same long prefix for the cache " * 4, "max_tokens": 16}),
        ("/v1/completions", {"model": "qwen2-demo", "prompt": "Hello", "max_tokens": 24, "stream": True}),
        ("/v1/chat/completions", {"model": "qwen2-demo", "messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 12}),
        ("/v1/classify", {"model": "qwen2-demo-classifier", "input": ["good", "bad"]}),
        ("/v1/completions", {"model": "qwen2-demo", "prompt": "x", "max_tokens": 0}),  # 400
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}),  # 404
    ]

    def worker(i: int):
        with httpx.Client(base_url=http, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            k = i
            while time.time() < deadline:
                path, body = bodies[k % len(bodies)]
                k += 1
                r = c.post(path, json=body)
                counts[r.status_code] = counts.get(r.status_code, 0) + 1

    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    parser.add_argument("--traffic-s", type=float, default=40.0)
    args = parser.parse_args()
    if not Path(args.prometheus).exists():
        print("prometheus not found: apt-get install -y prometheus (Debian), or --prometheus PATH", file=sys.stderr)
        return 2
    http_port, grpc_port, metrics_port, prom_port = free_port(), free_port(), free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="qwen2-prom-"))
    procs: list[subprocess.Popen] = []
    try:
        env = dict(os.environ, QWEN2_SERVE_HOME=str(tmp / "home"))
        demo = subprocess.Popen([sys.executable, "-m", "deployments.cli", "demo", "--port", str(http_port),
                                 "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--num-cpus", "4",
                                 "--api-key", KEY], cwd=ROOT, env=env, stdout=open(tmp / "demo.log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(demo)
        http = f"http://127.0.0.1:{http_port}"
        wait_for(http + "/ready", 300)
        print(f"demo up: {http}, metrics http://127.0.0.1:{metrics_port}/metrics")

        config = yaml.safe_load((ROOT / "deployments/monitoring/prometheus.yml").read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "2s"
        for job in config["scrape_configs"]:
            for sc in job.get("static_configs", []):
                sc["targets"] = [f"127.0.0.1:{metrics_port}"]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = subprocess.Popen([args.prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=open(tmp / "prometheus.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(prom)
        api = f"http://127.0.0.1:{prom_port}/api/v1"
        wait_for(f"http://127.0.0.1:{prom_port}/-/ready", 60)

        print(f"traffic for {args.traffic_s:.0f} s ...")
        print("status counts:", traffic(http, args.traffic_s))
        time.sleep(25)  # Ray's exporter refreshes every 10 s; rates need two scrapes after that

        targets = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        print("targets:", [(t["scrapeUrl"], t["health"]) for t in targets])
        empty = 0
        queries = panel_queries(ROOT / "deployments/monitoring/grafana-dashboard.json")
        for title, expr in queries:
            q = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
            data = httpx.get(f"{api}/query", params={"query": q}, timeout=30).json()
            result = data.get("data", {}).get("result", []) if data.get("status") == "success" else []
            value = result[0]["value"][1] if result else "-"
            empty += not result
            print(f"{'ok   ' if result else 'EMPTY'} {len(result):3d} series  {value:>12.12s}  {title}: {q[:90]}")
        print(f"\n{len(queries) - empty} of {len(queries)} panel queries returned data")
        return 1 if empty else 0
    finally:
        for p in reversed(procs):  # only what this script started, by its own process group
            try:
                os.killpg(p.pid, signal.SIGINT)
                p.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
