"""`qwen2-serve demo` as a user runs it: a subprocess on free ports, the printed curl line, Ctrl-C."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deployments.cli import QUIET_SERVE_ENV, RAYLET_TIMERS
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["QWEN2_SERVE_HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _processes(root_pid: int) -> list[tuple[int, str]]:
    """(pid, title) of `root_pid` and every process under it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        out.append((pid, title.strip()))
    return out


def _policies_by_title(root_pid: int) -> dict[str, set[int]]:
    """Scheduling policies of every thread of each process under `root_pid`, by process title."""
    out: dict[str, set[int]] = {}
    for pid, title in _processes(root_pid):
        try:
            policies = {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
        except OSError:
            continue
        out.setdefault(title, set()).update(policies)
    return out


def _environ(root_pid: int, title_prefix: str) -> dict[str, str]:
    """The environment the first process under `root_pid` whose title starts with `title_prefix` started with."""
    pid = next(pid for pid, title in _processes(root_pid) if title.startswith(title_prefix))
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _listener(port: int) -> tuple[str, str]:
    """(title of the process whose TCP socket listens on `port`, the address it is bound to);
    ("", "") if none."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return " ".join(psutil.Process(conn.pid).cmdline()[:1]), conn.laddr.ip
    return "", ""


def test_demo_prints_working_commands_and_stops_on_ctrl_c(tmp_path):
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    exe = shutil.which("qwen2-serve", path=str(BIN)) or "qwen2-serve"
    proc = subprocess.Popen([exe, "demo", "--port", str(port), "--grpc-port", str(grpc_port),
                             "--metrics-port", str(metrics_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path / "home"),
                            cwd=tmp_path)
    lines: list[str] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if "Press Ctrl-C" in line:
                break
        out = "\n".join(lines)
        assert any("Press Ctrl-C" in x for x in lines), out[-4000:]
        curl = next(x.strip() for x in lines if x.strip().startswith("curl "))
        grpc_call = next(x.strip() for x in lines if x.strip().startswith("qwen2-serve client"))
        assert f":{port}/" in curl and f":{grpc_port}" in grpc_call
        assert (tmp_path / "home" / "demo" / "causal_lm" / "config.json").is_file()
        # Direct ingress, the default (deployments/cli.py): the Ingress replica itself listens on both
        # ports, not Serve's proxy.
        for p in (port, grpc_port):
            assert _listener(p)[0].startswith("ray::ServeReplica:qwen2:Ingress"), (p, _listener(p))
        assert _listener(port)[1] == "127.0.0.1", _listener(port)  # HTTP stays on the default --host

        # Serve's background work slowed on the local Ray (deployments/cli.py QUIET_SERVE_ENV): the
        # controller, which reads it at start, got it.
        controller_env = _environ(proc.pid, "ray::ServeController")
        assert {k: controller_env.get(k) for k in QUIET_SERVE_ENV} == QUIET_SERVE_ENV, controller_env
        raylet_env = _environ(proc.pid, next(t for _, t in _processes(proc.pid) if t.endswith("/raylet")))
        assert {k: raylet_env.get(k) for k in RAYLET_TIMERS} == RAYLET_TIMERS, raylet_env  # its timers

        if shutil.which("curl"):
            res = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            body = json.loads(res.stdout)
        else:  # the same request, parsed from the printed line
            argv = shlex.split(curl)
            body = httpx.post(argv[2], content=argv[argv.index("-d") + 1],
                              headers={"Content-Type": "application/json"}, timeout=60).json()
        assert body["object"] == "text_completion" and body["model"] == "qwen2-demo"
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
        assert body["usage"]["completion_tokens"] >= 1

        if hasattr(os, "SCHED_IDLE"):  # deployments/cpu_priority.py: the model's threads keep the CPU
            policies = _policies_by_title(proc.pid)
            proxy = next(v for t, v in policies.items() if t.startswith("ray::ProxyActor"))
            ingress = next(v for t, v in policies.items() if t.startswith("ray::ServeReplica:qwen2:Ingress"))
            router = next(v for t, v in policies.items() if t.startswith("ray::ServeReplica:qwen2:router"))
            assert proxy == {os.SCHED_IDLE} and ingress == {os.SCHED_IDLE}, policies
            assert router == {os.SCHED_OTHER}, policies

        try:
            import deployments.client_cli  # noqa: F401  (the gRPC client ships with the gRPC ingress)
        except ImportError:
            pass
        else:
            res = subprocess.run(shlex.split(grpc_call), capture_output=True, text=True, timeout=60,
                                 env=_env(tmp_path / "home"))
            assert res.returncode == 0, res.stdout + res.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
            pytest.fail("qwen2-serve demo did not stop within 90 s of SIGINT")
    assert proc.returncode == 0, rest[-4000:]
    assert "Stopped." in rest
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
