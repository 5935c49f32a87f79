"""Tensor-parallel model shards in Ray actors, and the executor that drives them.

- `TPWorker`: one rank. `init(...)` joins torch.distributed (nccl with CUDA, gloo otherwise; same
  code path), loads only this rank's slices of the checkpoint
  (`from_pretrained(..., ctx=ParallelContext(rank, world, group))`) and builds a `ModelRunner`
  whose KV cache holds this rank's KV heads. `execute(StepInput)` runs one engine step; every
  rank takes part in the collectives, rank 0 samples and is the only one returning token ids.
- `WorkerGroup`: tp actors gang-scheduled in ONE placement group (STRICT_PACK; one GPU per bundle on
  GPUs, `cpus_per_worker` CPUs per bundle on CPU, torch threads set to match). Inside a Serve
  replica created with `placement_group_bundles=router_bundles(tp, ...)` the workers take bundles
  1..tp of the replica's own group (bundle 0 is the router); elsewhere the group makes its own
  placement group and removes it on shutdown. Rendezvous through Ray: rank 0 reports its node IP
  and a free port, every rank then calls `init_process_group("tcp://ip:port")`.
- `RayExecutor`: the engine's Executor (qwen2_model/engine/executor.py) over a WorkerGroup. Each
  step sends the same small `StepInput` to every rank and returns rank 0's `StepOutput` (token
  ids, never logits). Waiting is a `ray.wait` poll over all ranks' refs: when any rank dies or
  fails, the surviving ranks are stuck in a collective forever, so the whole group is killed and
  the call raises `WorkerDiedError` naming the rank (within a few seconds; the engine turns it
  into EngineDead for the in-flight requests). A dead group is not restarted in place: under Serve
  the Router fails its health check and Serve replaces the replica with a new group; elsewhere,
  build a new RayExecutor (and Engine: the old KV cache contents are gone).

Start-up checks run before any actor exists and name the numbers: tp >= 1, the head split
(`check_tp_split`: heads, KV heads, intermediate size), and tp against the GPUs / CPUs Ray has.
`kv_cache_memory` is per rank (as vLLM's per-GPU budget): a rank holds num_kv_heads/tp heads of
every block, so at tp=2 the same budget holds twice the blocks.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qwen2_model.config import Qwen2Config
from qwen2_model.engine.model_runner import PooledInput, StepInput, StepOutput
from qwen2_model.modeling import check_tp_split

logger = logging.getLogger(__name__)

ROUTER_BUNDLE = {"CPU": 1}
DEATH_GRACE_S = 2.0  # after a rank fails, how long to wait for the others to report (to name the dead one)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank died or failed; the whole worker group was killed. Names the rank."""

    def __init__(self, message: str, ranks: list[int] | None = None):
        super().__init__(message)
        self.ranks = ranks or []


class StartupError(ValueError):
    """A tensor-parallel layout that cannot start here; the message names the numbers."""


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- one rank ---------------------------------------------------------------------------------


class TPWorker:
    """One tensor-parallel rank (a Ray actor: `ray.remote` is applied where the group creates it)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.model = None
        self.runner = None
        self.config: Qwen2Config | None = None
        self.num_kv_blocks = 0
        self.block_size = 0
        self.device = torch.device("cpu")
        self.backend = None
        self.rss_before_load = _rss_bytes()

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port: the rendezvous point when this is rank 0."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init(self, master_addr: str, master_port: int, model_path: str, dtype: str | None, device: str,
             kv_cache_memory: int, block_size: int, attn_backend: str | None, num_threads: int,
             gpu_memory_fraction: float = 0.0, tokenizer_path: str | None = None,
             load_options: dict | None = None) -> dict:
        import torch.distributed as dist

        from qwen2_model.engine.executor import load_runner
        from qwen2_model.parallel import ParallelContext

        torch.set_num_threads(max(1, int(num_threads)))
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # Ray shows each rank only its own GPU, so it is always device 0 here.
            self.device = torch.device("cuda", self.device.index or 0)
            torch.cuda.set_device(self.device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(self.backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(minutes=10))
        ctx = ParallelContext(self.rank, self.world_size, dist.group.WORLD)

        def agree(blocks: int) -> int:  # every rank must index the same blocks: the smallest count wins
            agreed = torch.tensor([blocks], dtype=torch.int64, device=self.device)
            if self.world_size > 1:
                dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            return int(agreed.item())

        self.runner = load_runner(model_path, dtype, self.device, kv_cache_memory, block_size, gpu_memory_fraction,
                                  attn_backend, ctx=ctx, agree_blocks=agree,
                                  # structured output: the sampling rank holds the matchers and computes the masks
                                  tokenizer_path=tokenizer_path if self.rank == 0 else None, **(load_options or {}))
        self.model = self.runner.model
        self.config = self.model.config
        self.block_size = block_size
        self.num_kv_blocks = self.runner.num_kv_blocks
        return self.info()

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)  # all ranks compute; only rank 0 samples (the others return {})

    def load_lora(self, slot: int, path: str, max_loras: int, max_rank: int, name: str | None = None) -> None:
        self.runner.load_lora(slot, path, max_loras, max_rank, name)  # this rank's slices of the adapter

    def run_pooled(self, req: PooledInput) -> list | None:
        out = self.runner.run_pooled(req)
        return out if self.rank == 0 else None  # same result on every rank; ship it once

    @torch.inference_mode()
    def forward_logits(self, token_ids: list[list[int]], attention_mask: list[list[int]] | None = None):
        """The head's raw output for a batch (tests: tp parity). Rank 0 returns float32 tensors."""
        ids = torch.tensor(token_ids, device=self.device)
        mask = None if attention_mask is None else torch.tensor(attention_mask, device=self.device)
        out = self.model(ids, mask)
        if self.rank != 0:
            return None
        if isinstance(out, tuple):  # QA: (start, end)
            return tuple(t.float().cpu() for t in out)
        return out.float().cpu()

    def info(self) -> dict:
        params = 0 if self.model is None else sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "config": None if self.config is None else self.config.to_dict(),
            "architecture": None if self.model is None else type(self.model).__name__,
            "num_kv_blocks": self.num_kv_blocks,
            "block_size": self.block_size,
            "device": str(self.device),
            "backend": self.backend,
            "param_bytes": params,
            "rss_bytes": _rss_bytes(),
            "peak_rss_bytes": _peak_rss_bytes(),
            "rss_before_load_bytes": self.rss_before_load,
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "num_threads": torch.get_num_threads(),
        }

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        """Answered even while `execute` is blocked in a collective (its own concurrency group)."""
        return self.rank

    def shutdown(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


# --- the group --------------------------------------------------------------------------------


def router_bundles(tp: int, use_gpu: bool, cpus_per_worker: int = 1) -> list[dict]:
    """`placement_group_bundles` for a Serve Router replica: its own bundle first, then one per rank."""
    worker = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": cpus_per_worker}
    return [dict(ROUTER_BUNDLE)] + [dict(worker) for _ in range(tp)]


def _cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def _wait_resources(name: str, need: float, label: str, wait_s: float = 5.0) -> None:
    """tp against what Ray has; a just-removed placement group takes a moment to free its share."""
    total = ray.cluster_resources().get(name, 0)
    if need > total:
        raise StartupError(f"tensor_parallel_size needs {label} but the Ray cluster has {total:g} {name} in total")
    deadline = time.monotonic() + wait_s
    while True:
        avail = ray.available_resources().get(name, 0)
        if need <= avail:
            return
        if time.monotonic() > deadline:
            raise StartupError(f"tensor_parallel_size needs {label} but the Ray cluster has {avail:g} {name} "
                               f"available ({total:g} in total)")
        time.sleep(0.2)


class WorkerGroup:
    """tp TPWorker actors in one STRICT_PACK placement group (its own, or the caller's bundles 1..tp)."""

    def __init__(self, tp: int, use_gpu: bool = False, cpus_per_worker: int = 1,
                 runtime_env: dict | None = None, ready_timeout_s: float = 60.0):
        if tp < 1:
            raise StartupError(f"tensor_parallel_size must be >= 1, got {tp}")
        self.tp, self.use_gpu, self.cpus_per_worker = tp, use_gpu, cpus_per_worker
        self.alive = False
        self._lock = threading.Lock()
        current = ray.util.get_current_placement_group()
        if current is not None:
            specs = current.bundle_specs
            if len(specs) < tp + 1:
                raise StartupError(f"the caller's placement group has {len(specs)} bundles; tensor_parallel_size {tp} "
                                   f"needs {tp + 1} (bundle 0 for the router, one per rank): use "
                                   f"router_bundles({tp}, use_gpu={use_gpu})")
            for i in range(1, tp + 1):
                if use_gpu and specs[i].get("GPU", 0) < 1:
                    raise StartupError(f"bundle {i} of the caller's placement group is {specs[i]}: a GPU rank needs "
                                       f"{{'GPU': 1, 'CPU': 1}}")
                if specs[i].get("CPU", 0) < (1 if use_gpu else cpus_per_worker):
                    raise StartupError(f"bundle {i} of the caller's placement group is {specs[i]}: a rank needs "
                                       f"{1 if use_gpu else cpus_per_worker} CPU")
            self.pg, self.owns_pg, first = current, False, 1
        else:
            bundles = router_bundles(tp, use_gpu, cpus_per_worker)[1:]
            self.pg, self.owns_pg, first = placement_group(bundles, strategy="STRICT_PACK"), True, 0
            try:
                ray.get(self.pg.ready(), timeout=ready_timeout_s)
            except GetTimeoutError:
                remove_placement_group(self.pg)
                raise StartupError(f"no single node could hold tensor_parallel_size {tp} x {bundles[0]} within "
                                   f"{ready_timeout_s:g} s (STRICT_PACK needs all ranks on one node); cluster "
                                   f"has {ray.available_resources()} available") from None
        cpus = 1 if use_gpu else cpus_per_worker
        self.num_threads = cpus
        actor_cls = ray.remote(concurrency_groups={"control": 1})(TPWorker)
        env = dict(runtime_env or {})
        self.actors = [
            actor_cls.options(
                num_cpus=cpus, num_gpus=1 if use_gpu else 0, max_restarts=0, max_task_retries=0,
                name=None, runtime_env=env or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=first + rank, placement_group_capture_child_tasks=False),
            ).remote(rank, tp)
            for rank in range(tp)
        ]
        self.alive = True

    def start(self, model_path: str, dtype: str | None, device: str, kv_cache_memory: int, block_size: int,
              attn_backend: str | None, timeout_s: float | None = 600.0, gpu_memory_fraction: float = 0.0,
              tokenizer_path: str | None = None, load_options: dict | None = None
              ) -> list[dict]:
        """Rendezvous and load: every rank's info() dict, rank order. `load_options`: the rest of
        loading.from_pretrained's arguments (quantization, hf_overrides)."""
        addr, port = self.gather([self.actors[0].address.remote()], timeout_s=60.0, what="rendezvous")[0]
        refs = [a.init.remote(addr, port, str(model_path), dtype, device, kv_cache_memory, block_size, attn_backend,
                              self.num_threads, gpu_memory_fraction, tokenizer_path, load_options)
                for a in self.actors]
        return self.gather(refs, timeout_s=timeout_s, what="start-up")

    def call(self, method: str, *args, timeout_s: float | None = None) -> list:
        """Call `method(*args)` on every rank; results in rank order (failure-aware)."""
        self.ensure_alive()
        return self.gather([getattr(a, method).remote(*args) for a in self.actors], timeout_s=timeout_s, what=method)

    def ensure_alive(self) -> None:
        if not self.alive:
            raise WorkerDiedError(f"the tensor-parallel worker group (tp={self.tp}) is shut down after a failure; "
                                  f"start a new executor (under Serve the Router replica is replaced)")

    def gather(self, refs: list, timeout_s: float | None = None, what: str = "call", poll_s: float = 0.25) -> list:
        """Wait for every rank's ref. If any rank dies or raises, kill the group and raise WorkerDiedError.

        The surviving ranks of a collective never return on their own, so waiting on all refs at once
        (the usual ray.get) could hang forever; the poll checks the refs that are ready for errors.
        """
        index = {ref: i for i, ref in enumerate(refs)}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        checked: set = set()
        while True:
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=poll_s, fetch_local=True)
            if not pending:
                try:
                    return ray.get(refs)
                except Exception:
                    pass  # find out which rank below
            errors = {}
            for ref in ready:
                if ref in checked:
                    continue
                checked.add(ref)
                try:
                    ray.get(ref)
                except Exception as exc:
                    errors[index[ref]] = exc
            if errors:
                self._fail(refs, index, errors, what)
            if deadline is not None and time.monotonic() > deadline:
                slow = sorted(index[r] for r in pending)
                self.kill()
                raise WorkerDiedError(f"tensor-parallel rank(s) {slow} of {len(refs)} did not finish {what} within "
                                      f"{timeout_s:g} s; the worker group was shut down", slow)

    def _fail(self, refs, index, errors: dict[int, Exception], what: str):
        # A dead rank makes its gloo/nccl peers raise too; give the dead one a moment to be reported.
        if not any(isinstance(e, RayActorError) for e in errors.values()):
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=DEATH_GRACE_S)
            for ref in ready:
                if index[ref] not in errors:
                    try:
                        ray.get(ref)
                    except Exception as exc:
                        errors[index[ref]] = exc
        self.kill()
        dead = sorted(r for r, e in errors.items() if isinstance(e, RayActorError))
        if dead:
            names = ", ".join(str(r) for r in dead)
            msg = (f"tensor-parallel rank {names} of {self.tp} died during {what} "
                   f"({type(errors[dead[0]]).__name__}); the worker group was shut down (start a new executor; under Serve the Router replica is replaced)")
            raise WorkerDiedError(msg, dead) from errors[dead[0]]
        rank = min(errors)
        cause = errors[rank]
        detail = str(getattr(cause, "cause", None) or cause).strip().splitlines()
        raise WorkerDiedError(f"tensor-parallel rank {rank} of {self.tp} failed during {what}: "
                              f"{detail[-1] if detail else type(cause).__name__}; the worker group was shut down",
                              [rank]) from cause

    def ping(self, timeout_s: float = 5.0) -> list[int]:
        self.ensure_alive()
        return self.gather([a.ping.remote() for a in self.actors], timeout_s=timeout_s, what="health check")

    def kill(self) -> None:
        """Kill every rank at once (a rank blocked in a collective cannot be stopped any other way)."""
        with self._lock:
            self.alive = False
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass

    def shutdown(self) -> None:
        self.kill()
        if self.owns_pg and self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None


# --- the executor -----------------------------------------------------------------------------


def _repo_runtime_env() -> dict:
    """Ray workers must import qwen2_model/deployments: the editable install does it, PYTHONPATH too.
    Their weights and KV cache go on huge pages (hardware.HUGE_PAGES_ENV)."""
    from qwen2_model.hardware import with_huge_pages

    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {"env_vars": with_huge_pages({"PYTHONPATH": root + (os.pathsep + path if path else "")})}


class RayExecutor:
    """The engine's Executor over a tensor-parallel WorkerGroup of Ray actors."""

    def __init__(self, model_path: str | Path, tp: int = 1, dtype: str | None = None, device: str | None = None,
                 kv_cache_memory: int = 256 << 20, block_size: int = 16, attn_backend: str | None = None,
                 cpus_per_worker: int = 1, step_timeout_s: float | None = None, startup_timeout_s: float = 600.0,
                 gpu_memory_fraction: float = 0.0, tokenizer_path: str | Path | None = None,
                 quantization: str | None = None, hf_overrides: dict | None = None):
        self.model_path = str(model_path)
        self.load_options = {"quantization": quantization, "hf_overrides": hf_overrides}
        # Structured output: rank 0 builds its matchers from this tokenizer; the engine validates
        # specs against `self.grammar` (built here, in the engine's process).
        self.tokenizer_path = None if tokenizer_path is None else str(tokenizer_path)
        self.grammar = None
        self.tp = tp
        self.dtype = dtype
        self.kv_cache_memory = kv_cache_memory
        self.gpu_memory_fraction = gpu_memory_fraction
        self.block_size = block_size
        self.attn_backend = attn_backend
        self.cpus_per_worker = cpus_per_worker
        self.step_timeout_s = step_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.group: WorkerGroup | None = None
        self.worker_infos: list[dict] = []
        if tp < 1:
            raise StartupError(f"tensor_parallel_size must be >= 1, got {tp}")
        if cpus_per_worker < 1:
            raise StartupError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
        try:
            self.config = Qwen2Config.from_pretrained(self.model_path, overrides=hf_overrides)
            check_tp_split(self.config, tp)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if not ray.is_initialized():
            ray.init()
        if device is None:
            device = "cuda" if (torch.cuda.is_available() or _cluster_has_gpus()) else "cpu"
        self.device = device
        self.use_gpu = torch.device(device).type == "cuda"
        self._start()

    def _check_resources(self) -> None:
        if ray.util.get_current_placement_group() is not None:
            return  # the caller reserved the bundles already; WorkerGroup checks their shape
        if self.use_gpu:
            _wait_resources("GPU", self.tp, f"{self.tp} GPUs (one per rank)")
        else:
            need = self.tp * self.cpus_per_worker
            _wait_resources("CPU", need, f"{need} CPUs ({self.tp} ranks x {self.cpus_per_worker})")

    def _start(self) -> None:
        self._check_resources()
        started = time.perf_counter()
        self.group = WorkerGroup(self.tp, self.use_gpu, self.cpus_per_worker, runtime_env=_repo_runtime_env())
        try:
            self.worker_infos = self.group.start(self.model_path, self.dtype, self.device, self.kv_cache_memory,
                                                 self.block_size, self.attn_backend, self.startup_timeout_s,
                                                 self.gpu_memory_fraction, self.tokenizer_path, self.load_options)
        except BaseException:
            self.group.shutdown()
            raise
        info = self.worker_infos[0]
        self.config = Qwen2Config.from_dict(info["config"])
        self.architecture = info["architecture"]
        self.num_kv_blocks = info["num_kv_blocks"]
        if self.tokenizer_path is not None and self.grammar is None and self.architecture == "Qwen2ForCausalLM":
            from qwen2_model.engine.structured_output import GrammarBackend
            self.grammar = GrammarBackend.maybe_from_pretrained(self.tokenizer_path, self.config.vocab_size,
                                                                self.config.eos_token_ids)
        logger.info("tensor-parallel group up: %s tp=%d on %s (%s), %d KV blocks per rank, %.1f s",
                    self.architecture, self.tp, self.device, info["backend"], self.num_kv_blocks,
                    time.perf_counter() - started)

    # --- Executor ---

    def execute(self, step: StepInput) -> StepOutput:
        group = self._live_group()
        refs = [a.execute.remote(step) for a in group.actors]
        return group.gather(refs, timeout_s=self.step_timeout_s, what="a model step")[0]

    def run_pooled(self, req: PooledInput) -> list:
        return self._live_group().call("run_pooled", req, timeout_s=self.step_timeout_s)[0]

    def load_lora(self, slot: int, path: str, max_loras: int, max_rank: int, name: str | None = None) -> None:
        """Every rank reads its slices of the adapter into `slot`. Checked here first (header only), so
        a bad adapter raises LoraError without failing a rank (which would take the group down)."""
        from qwen2_model.lora import read_adapter

        read_adapter(path, self.config, max_rank)
        self._live_group().call("load_lora", slot, str(path), max_loras, max_rank, name, timeout_s=self.step_timeout_s)

    def forward_logits(self, token_ids: list[list[int]], attention_mask: list[list[int]] | None = None):
        """The head's full output on rank 0 (tests and debugging: ships logits, not for serving)."""
        return self._live_group().call("forward_logits", token_ids, attention_mask)[0]

    def check_health(self, timeout_s: float = 5.0) -> None:
        """Raise WorkerDiedError if any rank is dead or does not answer within timeout_s."""
        self._live_group().ping(timeout_s)

    @property
    def alive(self) -> bool:
        return self.group is not None and self.group.alive

    def worker_info(self) -> list[dict]:
        """Fresh info() from every rank (memory, device, backend)."""
        return self._live_group().call("info", timeout_s=30.0)

    def _live_group(self) -> WorkerGroup:
        if self.group is None:
            raise WorkerDiedError("the tensor-parallel worker group is shut down")
        self.group.ensure_alive()
        return self.group

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None
