"""The Router replica's torch runs on the threads it is given, not on Ray's one-thread default.

Ray sets OMP_NUM_THREADS to an actor's whole CPUs, or 1 when num_cpus is fractional (the Router's
default is 0.25), so without a fix the model would run on one core. Real Serve deployments of the
Router (in the session's Ray, as their own applications), asked through a Serve handle.
"""

import os

from ray import serve

from deployments.router import Router


def _threads_of(name: str, **router_kwargs) -> int:
    deployment = serve.deployment(Router).options(name=name, ray_actor_options={"num_cpus": 0.25})
    handle = serve.run(deployment.bind(name, "demo:causal_lm", kv_cache_memory=4 << 20, **router_kwargs),
                       name=name, route_prefix=None)
    try:
        return handle.stats.remote().result(timeout_s=60)["torch_threads"]
    finally:
        serve.delete(name)


def test_router_torch_threads_configured_and_default(serve_app):
    # configured: exactly that many (3: neither Ray's 1 nor this machine's core count by accident)
    assert _threads_of("threads-configured", torch_threads=3) == 3
    # default with a fractional num_cpus: every CPU the replica's process may run on, not Ray's 1
    assert _threads_of("threads-default") == len(os.sched_getaffinity(0))
