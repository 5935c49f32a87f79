"""Secure defaults of a one-machine server (issue 16, README "Security"):

- with an API key every route but /health and /ready needs it, the API docs included;
- the local Ray the CLI starts (`deployments.cli.local_ray_env`) listens on loopback only: every TCP
  socket of Ray's processes (GCS, raylet, agents, workers, the metrics endpoint) is bound to
  127.0.0.1, and a --host that exposes the server leaves Ray's default alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest

from deployments.cli import local_ray_env
from tests.e2e.conftest import free_port


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect", "/v1/models"])
def test_every_route_but_health_and_ready_needs_the_key(serve_app, path):
    r = httpx.get(serve_app.http_url + path, timeout=30)
    assert r.status_code == 401, (path, r.status_code)
    assert r.json()["error"]["code"] == "unauthenticated"
    r = httpx.get(serve_app.http_url + path, headers=serve_app.headers, timeout=30)
    assert r.status_code in (200, 404), (path, r.status_code)  # 404: a docs route FastAPI does not serve
    for open_path in ("/health", "/ready"):
        assert httpx.get(serve_app.http_url + open_path, timeout=30).status_code == 200


def test_local_ray_env_only_for_a_loopback_host():
    ns = lambda **kw: argparse.Namespace(**{"address": None, "host": "127.0.0.1", **kw})  # noqa: E731
    assert local_ray_env(ns()) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    assert local_ray_env(ns(host="localhost")) != {}
    assert local_ray_env(ns(host="0.0.0.0")) == {}  # exposed on purpose: Ray keeps its default
    assert local_ray_env(ns(address="auto")) == {}  # someone else's cluster


LISTENERS = textwrap.dedent("""
    import argparse, json, os, sys, time
    from deployments.cli import local_ray_env
    os.environ.update(local_ray_env(argparse.Namespace(address=None, host=sys.argv[1])))
    import psutil, ray
    ray.init(address="local", num_cpus=1, include_dashboard=False, _metrics_export_port=int(sys.argv[2]))

    @ray.remote
    def f():
        return 1

    ray.get(f.remote())  # a worker too
    time.sleep(3)  # the agents and the metrics exporter start in the background
    out = []
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            out += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections("tcp") if c.status == "LISTEN"]
        except psutil.Error:
            pass
    ray.shutdown()
    print("LISTENERS " + json.dumps(out))
""")


def listeners(host: str) -> list[tuple[str, str, int]]:
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", LISTENERS, host, str(metrics_port)], capture_output=True, text=True,
                          timeout=180, env=env, cwd=os.getcwd())
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LISTENERS ")), None)
    assert line, proc.stderr[-2000:]
    found = [tuple(x) for x in json.loads(line.removeprefix("LISTENERS "))]
    assert any(port == metrics_port for _, _, port in found), found  # the metrics endpoint was seen
    return found


def test_the_local_ray_listens_on_loopback_only():
    found = listeners("127.0.0.1")
    print("\n".join(f"{name:24s} {ip}:{port}" for name, ip, port in sorted(found)))
    assert len(found) >= 4, found  # GCS, raylet, agents, the metrics endpoint, the driver's and worker's gRPC
    exposed = [x for x in found if x[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
