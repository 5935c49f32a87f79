"""serve_config.yaml on a real cluster: `ray start --head`, `serve deploy`, a live user_config change.

The cluster is this test's own (its own ports and temp dir), started with `ray start --head --block`
and stopped by signalling that process: `ray stop` would also stop any other Ray on the machine
(e.g. the session's `serve_app`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001
            last = exc
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def test_serve_deploy_and_live_user_config(tmp_path):
    http_port, grpc_port = free_port(), free_port()
    dash_port, gcs_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray puts unix sockets under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["QWEN2_SERVE_HOME"] = str(tmp_path / "home")
    # A ~/.ray/auth_token left by any earlier Ray turns token auth on for `ray start`; this
    # cluster is private to the test, so keep it off (and the serve CLI needs no token).
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"

    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    cfg_path = tmp_path / "serve_config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    address = f"http://127.0.0.1:{dash_port}"
    url = f"http://127.0.0.1:{http_port}"

    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    failures: list[str] = []
    successes = [0]
    stop = threading.Event()
    try:
        _wait(lambda: httpx.get(f"{address}/api/version", timeout=2).status_code == 200, 120, "the Ray dashboard")
        subprocess.run([str(BIN / "serve"), "deploy", str(cfg_path), "-a", address], check=True, env=env, cwd=REPO,
                       timeout=120)
        ready = _wait(lambda: (r := httpx.get(f"{url}/ready", timeout=5)).status_code == 200 and r.json(), 240,
                      "the deployed app")
        assert set(ready["models"]) == {"qwen2-demo", "qwen2-demo-classifier"}
        assert ready["models"]["qwen2-demo"]["config"]["max_num_seqs"] == 64
        r = httpx.post(f"{url}/v1/completions", json={"model": "qwen2-demo", "prompt": "Hello", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/v1/classify", json={"model": "qwen2-demo-classifier", "input": "Hello"}, timeout=60)
        assert r.status_code == 200, r.text

        def load():
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/v1/completions", json={"model": "qwen2-demo", "prompt": "Hi", "max_tokens": 4})
                        if r.status_code == 200:
                            successes[0] += 1
                        else:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(1)
        for d in config["applications"][0]["deployments"]:
            if d["name"] == "router-qwen2-demo":
                assert d["user_config"]["prefill_drain_steps"] == 4  # the scheduler knobs are in the file
                d["user_config"].update(max_num_seqs=7, max_waiting=77, pooled_batch_wait_ms=2, prefill_drain_steps=2)
        cfg_path.write_text(yaml.safe_dump(config))
        before = successes[0]
        subprocess.run([str(BIN / "serve"), "deploy", str(cfg_path), "-a", address], check=True, env=env, cwd=REPO,
                       timeout=120)
        live = _wait(lambda: (c := httpx.get(f"{url}/ready", timeout=5).json()["models"]["qwen2-demo"]["config"])
                     ["max_num_seqs"] == 7 and c, 120, "the new user_config")
        assert live["max_waiting"] == 77 and live["pooled_batch_wait_ms"] == 2 and live["prefill_drain_steps"] == 2
        time.sleep(2)
        stop.set()
        loader.join(timeout=60)
        assert not failures, failures[:5]
        assert successes[0] > before  # requests kept succeeding through the change
    finally:
        stop.set()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)

    def proxy_gone() -> bool:
        try:
            httpx.get(f"{url}/health", timeout=2)
            return False
        except httpx.HTTPError:
            return True
    _wait(proxy_gone, 30, "the cluster's HTTP proxy to stop")
