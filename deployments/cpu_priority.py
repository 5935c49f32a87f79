"""Serve's proxy and the Ingress replicas give the CPU to the model's threads on a machine it fills.

`qwen2-serve run` on its own local Ray gives the Router the machine's every CPU as torch threads,
and the proxy, the Ingress, Ray's daemons and the client share those cores. A model step is a chain
of OpenMP parallel regions: when a serving process wakes up (a token to forward, a request to
parse) and the kernel preempts one of the model's threads for it, the region waits for that thread
and the other cores idle. The cost is a multiple of the CPU the serving process used: on 2 cores a
loop burning 10% of one core slowed the engine alone by 18%, and the served path at 32 streams ran
with a quarter of a core idle (0.77x the engine's throughput; 1.77 of 2 cores busy).

With QWEN2_SERVE_FRONTEND_SCHED=idle in its environment (the CLI sets it before starting Ray on
this machine, unless --frontend-cpu-priority normal), the proxy (through deployments/admission.py,
which Serve imports in the proxy process) and each Ingress replica put every thread of their process
under SCHED_IDLE: the kernel then runs them on cycles the model leaves (between kernels, while a step
does its Python) instead of preempting its threads. CFS still gives SCHED_IDLE tasks a small share
under full load, so they are slowed, never starved. Measured on the serve_load workload (2 cores, 32
streams, three alternating pairs in one server session): 45.6 -> 47.9 tok/s mean, ITL p50 226 -> 213
ms. Elsewhere (a cluster, `serve deploy`) nothing changes: the variable is not set.
"""

from __future__ import annotations

import logging
import os

ENV = "QWEN2_SERVE_FRONTEND_SCHED"
IDLE = "idle"

logger = logging.getLogger(__name__)


def yield_cpu_to_model() -> bool:
    """Put every thread of this process under SCHED_IDLE when ENV says so (threads it starts later
    inherit it). Returns whether it did; a platform without SCHED_IDLE is left as it is."""
    if os.environ.get(ENV) != IDLE or not hasattr(os, "SCHED_IDLE"):
        return False
    done = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            done += 1
        except (OSError, ValueError):  # a thread that just ended
            pass
    logger.info("pid %d: %d threads run at idle CPU priority (%s=%s)", os.getpid(), done, ENV, IDLE)
    return done > 0
