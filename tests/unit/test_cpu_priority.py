"""deployments/cpu_priority.py: with QWEN2_SERVE_FRONTEND_SCHED=idle a process puts all its threads
(and those it starts later) under SCHED_IDLE; without it nothing changes. Run in child processes:
SCHED_IDLE cannot be undone without privileges."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")

CHILD = """
import os, threading, time
started = threading.Event()
threading.Thread(target=lambda: (started.set(), time.sleep(5)), daemon=True).start()
started.wait()
from deployments.cpu_priority import yield_cpu_to_model
did = yield_cpu_to_model()
later = []
t = threading.Thread(target=lambda: later.append(os.sched_getscheduler(0))); t.start(); t.join()
policies = set()
for tid in os.listdir("/proc/self/task"):  # the joined thread may still be listed, then gone
    try:
        policies.add(os.sched_getscheduler(int(tid)))
    except ProcessLookupError:
        pass
print(did, sorted(policies), later[0])
"""


def _child(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "QWEN2_SERVE_FRONTEND_SCHED"}
    if env_value is not None:
        env["QWEN2_SERVE_FRONTEND_SCHED"] = env_value
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_idle_puts_every_thread_and_later_ones_under_sched_idle():
    assert _child("idle") == f"True [{os.SCHED_IDLE}] {os.SCHED_IDLE}"


def test_without_the_variable_nothing_changes():
    assert _child(None) == f"False [{os.SCHED_OTHER}] {os.SCHED_OTHER}"
    assert _child("normal") == f"False [{os.SCHED_OTHER}] {os.SCHED_OTHER}"
