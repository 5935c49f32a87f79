"""deployments/cpu_priority.py: with QWEN2_SERVE_FRONTEND_SCHED=idle a process puts all its threads
(and those it starts later) under SCHED_IDLE, and a Router all but its engine's step thread and the
threads that one starts (the model's OpenMP workers); without it nothing changes. Run in child
processes: SCHED_IDLE cannot be undone without privileges."""

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
    return _run(CHILD, env_value)


def test_idle_puts_every_thread_and_later_ones_under_sched_idle():
    assert _child("idle") == f"True [{os.SCHED_IDLE}] {os.SCHED_IDLE}"


def test_without_the_variable_nothing_changes():
    assert _child(None) == f"False [{os.SCHED_OTHER}] {os.SCHED_OTHER}"
    assert _child("normal") == f"False [{os.SCHED_OTHER}] {os.SCHED_OTHER}"


STEP_CHILD = """
import os, threading, time
from pathlib import Path
started = threading.Event()
threading.Thread(target=lambda: (started.set(), time.sleep(5)), daemon=True).start()  # e.g. Ray's IO thread
started.wait()
from deployments.cpu_priority import model_thread_first

def comm():
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

def build():  # as the engine's step thread runs it: the model's workers start from here
    worker = []
    t = threading.Thread(target=lambda: worker.append((os.sched_getscheduler(0), comm()))); t.start(); t.join()
    return os.sched_getscheduler(0), comm(), worker[0]

out = []
step = threading.Thread(target=lambda: out.append(model_thread_first(build)())); step.start(); step.join()
later = []
t = threading.Thread(target=lambda: later.append(os.sched_getscheduler(0))); t.start(); t.join()
others = {os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}  # main + the sleeping one
print(out[0][0], out[0][1], out[0][2][0], out[0][2][1], sorted(others), later[0])
"""


def _run(code: str, env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "QWEN2_SERVE_FRONTEND_SCHED"}
    if env_value is not None:
        env["QWEN2_SERVE_FRONTEND_SCHED"] = env_value
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_a_routers_step_thread_and_its_workers_keep_the_cpu_the_rest_yields():
    from deployments.cpu_priority import STEP_THREAD_NAME

    step, step_name, worker, worker_name, others, later = _run(STEP_CHILD, "idle").split(" ", 5)
    assert (int(step), int(worker)) == (os.SCHED_OTHER, os.SCHED_OTHER)  # the model's threads
    assert step_name == worker_name == STEP_THREAD_NAME  # what top -H shows for them
    assert others == f"[{os.SCHED_IDLE}]" and int(later) == os.SCHED_IDLE  # the rest, and threads it starts later


def test_a_routers_threads_keep_their_policy_without_the_variable():
    step, _, worker, _, others, later = _run(STEP_CHILD, None).split(" ", 5)
    assert (int(step), int(worker), int(later)) == (os.SCHED_OTHER,) * 3 and others == f"[{os.SCHED_OTHER}]"
