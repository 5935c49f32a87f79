"""Environment for the Ray processes that run the model (Router replicas, tensor-parallel workers).

torch's CPU kernels run on libgomp (GNU OpenMP), which keeps a thread pool for every thread that
ever ran a parallel region. A Router runs torch on at least two threads: the replica's thread that
loads the model and the engine's step loop (pooled calls and adapter loads add `asyncio.to_thread`
workers). Once libgomp counts more pool threads than CPUs, it cuts the time a worker spins waiting
for the next parallel region from ~3 ms (300,000 spins, its default) to 1,000 spins: the workers
then sleep between the hundreds of regions of a model step and must be woken for each. Measured on
2 cores (0.5B fp32, 32 decodes, steps alternating between the two threads of one process): a step
12-18% slower on a second thread than on the first, the same once GOMP_SPINCOUNT is set; the
Router driven in-process on the serve_load workload went from 42-45 to 48-54 tok/s (the engine
alone: 56-57). Setting GOMP_SPINCOUNT explicitly keeps libgomp's own default spin for every pool.
It must be in the environment when the process starts (libgomp reads it when torch is imported),
so it goes into the actors' `runtime_env`; a value the operator set (GOMP_SPINCOUNT or
OMP_WAIT_POLICY in the deploying environment) is left alone.
"""

from __future__ import annotations

import os
from typing import Any

# libgomp's default spin count (when OMP_WAIT_POLICY is unset), kept however many pools exist.
TORCH_ENV_VARS = {"GOMP_SPINCOUNT": "300000"}


def torch_env_vars() -> dict[str, str]:
    """TORCH_ENV_VARS, unless the operator chose the OpenMP wait policy themselves."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return {}
    return dict(TORCH_ENV_VARS)


def with_torch_env(ray_actor_options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `ray_actor_options` whose runtime_env has the torch variables (theirs win)."""
    options = dict(ray_actor_options or {})
    runtime_env = dict(options.get("runtime_env") or {})
    env_vars = {**torch_env_vars(), **(runtime_env.get("env_vars") or {})}
    if env_vars:
        runtime_env["env_vars"] = env_vars
        options["runtime_env"] = runtime_env
    return options
