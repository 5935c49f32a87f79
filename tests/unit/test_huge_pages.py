"""The Router's and the tensor-parallel workers' processes start with torch's huge-page allocation on
(qwen2_model/hardware.py HUGE_PAGES_ENV), and on this kernel that puts a big tensor on huge pages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.app import _router_options
from deployments.workers import _repo_runtime_env
from qwen2_model.hardware import HUGE_PAGES_ENV, with_huge_pages

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_the_router_starts_with_huge_pages():
    env = _router_options({"name": "m"})["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["THP_MEM_ALLOC_ENABLE"] == "1"


def test_an_operators_runtime_env_is_kept_and_their_value_wins():
    options = _router_options({"name": "m", "ray_actor_options": {
        "num_cpus": 2, "runtime_env": {"pip": ["x"], "env_vars": {"A": "b", "THP_MEM_ALLOC_ENABLE": "0"}}}})
    actor = options["ray_actor_options"]
    assert actor["num_cpus"] == 2 and actor["runtime_env"]["pip"] == ["x"]
    assert actor["runtime_env"]["env_vars"] == {"A": "b", "THP_MEM_ALLOC_ENABLE": "0"}


def test_tensor_parallel_workers_start_with_huge_pages():
    env = _repo_runtime_env()["env_vars"]
    assert env["THP_MEM_ALLOC_ENABLE"] == "1" and "PYTHONPATH" in env
    assert with_huge_pages(None) == HUGE_PAGES_ENV


PROBE = """
import torch
t = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, every page touched
kb = [int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0]
print(kb)
"""


def _huge_kib(env_extra: dict) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **env_extra}, capture_output=True, text=True,
                         check=True, timeout=120)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(),
                    reason="transparent huge pages are off on this kernel")
def test_the_variable_puts_a_big_tensor_on_huge_pages():
    assert _huge_kib(HUGE_PAGES_ENV) >= 32 << 10  # at least half of the 64 MiB
    if "[madvise]" in THP_MODE.read_text():  # huge pages only where asked for: without the variable, none
        assert _huge_kib({}) < 32 << 10
