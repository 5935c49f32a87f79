"""The Router deployment: one replica = one Engine (+ one executor, in process or a TP worker group).

Serve options (replicas, placement group, user_config) are applied in deployments/app.py; this is a
plain class so it can also be driven directly in tests. Methods, called through Serve handles:

- `generate(request_id, prompt_token_ids, params: SamplingParams)`: async generator (call with
  `handle.options(stream=True)`) of the engine's `RequestOutput`s, unchanged (typed messages both
  ways: qwen2_model.engine's dataclasses, no dicts).
  Cancelling the call (client disconnect, deadline) aborts the request in the engine, which frees
  its KV blocks at once.
- `subscribe(ingress_id)`: async generator of an Ingress's shared token stream
  (deployments/token_streams.py): one list of `(request_id, RequestOutput)` per engine step for the
  requests that Ingress sent with `generate(..., via=ingress_id)`; those requests' own calls then
  answer `ViaSharedStream()` and later only their error, if any.
- `abort(request_id, index=None)`: stop a request, or one choice of it (stop strings are matched in
  the ingress, which then aborts the choice here).
- `pooled(task, token_ids, pooling, normalize)`: the one-shot heads. Concurrent calls of the same
  kind are micro-batched into one padded forward: the first waits at most `pooled_batch_wait_ms`
  for company, and a batch holds at most `pooled_max_batch_size` inputs.
- `info()`, `stats()`, `reconfigure(user_config)` (live knobs), `check_health()` (Serve's probe).

The Router imports the engine, the error contract and metrics only (no HTTP, pydantic or protobuf
in the engine's replica). Engine errors leave here as the ServeError subclasses of
deployments/errors.py, so the ingress can hand them to the client unchanged (Serve re-raises a replica's exception at the caller as a
RayTaskError that is also an instance of the original class).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, AsyncIterator, Callable

from deployments.checkpoints import resolve_model_path
from deployments.errors import (
    BUSY,
    ContextLengthExceededError,
    InvalidRequestError,
    QueueFullError,
    ServeError,
    UnavailableError,
)
from deployments.lora_adapters import AdapterCatalog, LoraLoader
from deployments.metrics import RouterMetrics
from deployments.token_streams import SharedStreamSink, ViaSharedStream
from qwen2_model.engine.engine import (AsyncEngine, Engine, EngineConfig, EngineDead, EngineError, QueueFull,
                                       RequestOutput)
from qwen2_model.engine.model_runner import PooledInput
from qwen2_model.engine.sampling import SamplingLimits, SamplingParams
from qwen2_model.tasks import GENERATE, can_run

logger = logging.getLogger("ray.serve")


@dataclasses.dataclass(frozen=True)
class EngineKnob:
    """A `user_config` key that sets the EngineConfig field of its name (and the SchedulerConfig's,
    when the scheduler has one), checked first: at least `least` (above it, if `strict`), or null
    when `nullable` (null turns the knob off)."""
    convert: Callable[[Any], Any]  # int or float
    least: float
    strict: bool = False
    nullable: bool = False
    scheduler: bool = True

    def value(self, key: str, raw: Any) -> Any:
        """`raw` converted, or ValueError naming the key and its rule."""
        if raw is None and self.nullable:
            return None
        rule = f"{'>' if self.strict else '>='} {self.least:g}{' or null' if self.nullable else ''}"
        try:
            value = self.convert(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number {rule}, got {raw!r}") from None
        if value <= self.least if self.strict else value < self.least:
            raise ValueError(f"{key} must be {rule}, got {raw}")
        return value

    def apply(self, engine: Engine, key: str, value: Any) -> None:
        """Set a value `value()` returned."""
        setattr(engine.config, key, value)
        if self.scheduler:
            setattr(engine.scheduler.config, key, value)


# The engine's live knobs. The prefill budget (scheduler.py): null turns a cap off.
ENGINE_KNOBS = {
    "max_num_seqs": EngineKnob(int, 1),
    "max_num_batched_tokens": EngineKnob(int, 1),
    "max_waiting": EngineKnob(int, 0, scheduler=False),
    "max_prefill_tokens": EngineKnob(int, 1, nullable=True),
    "prefill_step_ratio": EngineKnob(float, 1, strict=True, nullable=True),
    "prefill_drain_steps": EngineKnob(int, 1, nullable=True),
    "stream_interval": EngineKnob(int, 1, scheduler=False),  # requests started from now on
}
# Knobs `reconfigure` accepts (serve_config.yaml `user_config`).
USER_CONFIG_KEYS = (*ENGINE_KNOBS, "pooled_batch_wait_ms", "pooled_max_batch_size")


def map_engine_error(exc: BaseException) -> BaseException:
    """Engine exceptions -> the client-facing error contract; anything else passes through."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, EngineError):
        cls = ContextLengthExceededError if exc.code == "context_length_exceeded" else InvalidRequestError
        return cls(str(exc), param=exc.param)
    if isinstance(exc, QueueFull):
        return QueueFullError(f"{BUSY} ({exc}); retry later", retry_after=1.0)
    if isinstance(exc, EngineDead):
        return UnavailableError(f"The model's workers are not available: {exc}")
    return exc


@dataclasses.dataclass
class _PooledItem:
    key: tuple  # (task, pooling, normalize): only equal keys share a forward
    token_ids: list[list[int]]
    future: asyncio.Future


class Router:
    def __init__(self, model_name: str, model_path: str, tp: int = 1, dtype: str | None = None,
                 device: str | None = None, kv_cache_memory: int = 256 << 20, block_size: int = 16,
                 engine: dict | None = None, pooled_batch_wait_ms: float = 5.0, pooled_max_batch_size: int = 32,
                 torch_threads: int | None = None, gpu_memory_fraction: float = 0.0, limits: dict | None = None,
                 loras: dict | list | None = None, lora_dir: str | None = None,
                 max_loras_per_replica: int | None = None, quantization: str | None = None,
                 hf_overrides: dict | None = None):
        import torch
        # Ray sets OMP_NUM_THREADS to the actor's whole CPUs, or 1 for a fractional num_cpus: left
        # alone, a 0.25-CPU Router would run the model on one core of a many-core machine.
        torch.set_num_threads(router_torch_threads(torch_threads))
        self.model_name = model_name
        self.model_path = str(resolve_model_path(model_path))
        known = {f.name for f in dataclasses.fields(EngineConfig)} - {"limits"}
        unknown = set(engine or {}) - known
        if unknown:
            raise ValueError(f"model {model_name!r}: unknown engine options {sorted(unknown)}; known: {sorted(known)} "
                             f"(request caps such as max_n go under the application's `limits`)")
        # The application's one `limits` object: the same caps the ingress checks.
        sampling_fields = {f.name for f in dataclasses.fields(SamplingLimits)}
        sampling_limits = SamplingLimits(**{k: v for k, v in (limits or {}).items() if k in sampling_fields})
        engine = dict(engine or {})
        for key in set(engine) & set(ENGINE_KNOBS):  # the live knobs' rules hold from the start too
            engine[key] = ENGINE_KNOBS[key].value(key, engine[key])
        engine_config = EngineConfig(**engine, limits=sampling_limits)
        executor_options = dict(dtype=dtype, device=device or _default_device(), kv_cache_memory=kv_cache_memory,
                                block_size=block_size, gpu_memory_fraction=gpu_memory_fraction,
                                tokenizer_path=self.model_path, quantization=quantization, hf_overrides=hf_overrides)

        def build_engine() -> Engine:
            self.torch_threads = torch.get_num_threads()  # as the thread that runs the model sees it
            if tp > 1:
                from deployments.workers import RayExecutor  # Ray actors: only loaded when there are ranks to run
                return Engine(RayExecutor(self.model_path, tp=tp, **executor_options), engine_config)
            from qwen2_model.engine.executor import LocalExecutor
            return Engine(LocalExecutor(self.model_path, **executor_options), engine_config)

        # Built by the engine's step thread, the one thread of this process that runs torch
        # (AsyncEngine's docstring: libgomp gives every such thread a pool of its own).
        self.async_engine = AsyncEngine(build_engine)
        self.engine = self.async_engine.engine
        executor = self.engine.executor
        # Prometheus (deployments/metrics.py): step records from the engine, state sampled once a second.
        self.metrics = RouterMetrics(model_name)
        self.engine.step_observers.append(self.metrics.observe_step)
        # LoRA adapters (deployments/lora_adapters.py): declared + lora_dir, on Serve's model multiplexing
        self.loras = LoraLoader(self.async_engine, AdapterCatalog.from_config(model_name, loras, lora_dir),
                                max_loras_per_replica or self.engine.config.max_loras)
        self.tp = tp
        self.metrics.start(self.async_engine.stats, _workers_alive(executor, tp))
        self.pooled_batch_wait_ms = float(pooled_batch_wait_ms)
        self.pooled_max_batch_size = int(pooled_max_batch_size)
        self._pooled_queue: asyncio.Queue | None = None
        self._pooled_task: asyncio.Task | None = None
        self.pooled_batches = 0  # forwards run for pooled requests (tests check batching with it)
        self.pooled_max_batch = 0
        self._shared_sinks: dict[str, SharedStreamSink] = {}  # ingress id -> its shared token stream
        self.shared_stream_counts = {"batches": 0, "outputs": 0, "tokens": 0}  # sent on shared streams (stats())
        logger.info("router %s: %s from %s, tp=%d, %d KV blocks", model_name, executor.architecture,
                    self.model_path, tp, self.engine.blocks.num_blocks)

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       via: str | None = None) -> AsyncIterator[RequestOutput | ViaSharedStream]:
        """The request's outputs; with `via` naming an Ingress whose shared stream this replica
        holds, `ViaSharedStream()` instead and the outputs on that stream."""
        self._check_alive()
        sink = self._shared_sinks.get(via) if via is not None else None
        lora = await self.loras.acquire()  # the request's adapter (Serve's multiplexed model id), loaded
        stream = self.async_engine.generate(request_id, list(prompt_token_ids), params, lora=lora)
        try:
            if sink is None or sink.closed:
                async for out in stream:
                    yield out
            else:
                sink.riders += 1
                try:
                    yield ViaSharedStream()
                    async for out in stream:
                        sink.put(request_id, out)  # UnavailableError once the shared stream is gone
                finally:
                    sink.riders -= 1
        except Exception as exc:
            raise map_engine_error(exc) from None
        finally:
            # On cancellation (GeneratorExit / CancelledError) close the engine stream now: its
            # `finally` aborts the request and frees the blocks.
            await stream.aclose()

    async def subscribe(self, ingress_id: str) -> AsyncIterator[list[tuple[str, RequestOutput]]]:
        """An Ingress's shared token stream (deployments/token_streams.py): [] once registered, then
        one batch per engine step; ends after a quiet spell, or when the Ingress opens another."""
        sink = SharedStreamSink()
        previous = self._shared_sinks.get(ingress_id)
        if previous is not None:
            previous.closed = True  # its riders fail: the Ingress no longer reads it
        self._shared_sinks[ingress_id] = sink
        try:
            async for batch in sink.batches():
                if batch:
                    self.shared_stream_counts["batches"] += 1
                    self.shared_stream_counts["outputs"] += len(batch)
                    self.shared_stream_counts["tokens"] += sum(len(out.new_token_ids) for _, out in batch)
                yield batch
        finally:
            sink.closed = True
            if self._shared_sinks.get(ingress_id) is sink:
                del self._shared_sinks[ingress_id]

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.async_engine.abort(request_id, index)

    # --- pooled heads --------------------------------------------------------------------------

    async def pooled(self, task: str, token_ids: list[list[int]], pooling: str = "last",
                     normalize: bool = True) -> list:
        self._check_alive()
        # A model's own head, or embeddings (every architecture has the decoder); generation streams.
        if task == GENERATE or not can_run(self.engine.executor.architecture, task):
            raise InvalidRequestError(f"model {self.model_name!r} ({self.engine.executor.architecture}) cannot "
                                      f"run task {task!r}", param="model")
        if not token_ids:
            return []
        try:  # this request's own inputs, before it shares a forward with others
            self.engine.validate_pooled(token_ids)
        except Exception as exc:
            raise map_engine_error(exc) from None
        if self._pooled_task is None or self._pooled_task.done():
            self._pooled_queue = asyncio.Queue()
            self._pooled_task = asyncio.get_running_loop().create_task(self._pooled_loop())
        future = asyncio.get_running_loop().create_future()
        self._pooled_queue.put_nowait(_PooledItem((task, pooling, bool(normalize)), [list(t) for t in token_ids],
                                                  future))
        return await future

    async def _pooled_loop(self) -> None:
        held: list[_PooledItem] = []  # taken from the queue but of another kind than the batch
        while True:
            first = held.pop(0) if held else await self._pooled_queue.get()
            batch, size = [first], len(first.token_ids)
            deadline = time.monotonic() + self.pooled_batch_wait_ms / 1000.0
            # Same-kind items already held join first.
            for item in list(held):
                if item.key == first.key and size + len(item.token_ids) <= self.pooled_max_batch_size:
                    held.remove(item)
                    batch.append(item)
                    size += len(item.token_ids)
            while size < self.pooled_max_batch_size:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that lands
                    # as the item arrives (deployments/frontend/core.py _Deadline.run).
                    async with asyncio.timeout(timeout):
                        item = await self._pooled_queue.get()
                except TimeoutError:
                    break
                if item.key == first.key and size + len(item.token_ids) <= self.pooled_max_batch_size:
                    batch.append(item)
                    size += len(item.token_ids)
                else:
                    held.append(item)
            batch = [b for b in batch if not b.future.done()]  # callers that gave up
            if not batch:
                continue
            task, pooling, normalize = first.key
            ids = [row for item in batch for row in item.token_ids]
            try:
                results = await self.async_engine.run_pooled(PooledInput(task, ids, pooling, normalize))
            except Exception as exc:
                err = map_engine_error(exc)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            self.pooled_batches += 1
            self.pooled_max_batch = max(self.pooled_max_batch, len(ids))
            pos = 0
            for item in batch:
                n = len(item.token_ids)
                if not item.future.done():
                    item.future.set_result(results[pos:pos + n])
                pos += n

    # --- control -------------------------------------------------------------------------------

    def info(self) -> dict:
        """The model's facts; raises UnavailableError when the engine died (so /ready says 503)."""
        self._check_alive()
        cfg = self.engine.executor.config
        return {
            "name": self.model_name,
            "path": self.model_path,
            "architecture": self.engine.executor.architecture,
            "max_model_len": self.engine.max_model_len,
            "num_kv_blocks": self.engine.blocks.num_blocks,
            "block_size": self.engine.blocks.block_size,
            "eos_token_ids": list(self.engine.eos_token_ids),
            "tp": self.tp,
            # hardware.py's choice: what the model computes in and why (None where the executor
            # does not say, i.e. tensor-parallel workers today)
            "compute_dtype": self._compute_dtype(),
            "id2label": {int(k): v for k, v in (getattr(cfg, "id2label", None) or {}).items()},
            "config": self.current_config(),
        }

    def _compute_dtype(self) -> dict | None:
        choice = getattr(self.engine.executor, "dtype_choice", None)
        return None if choice is None else {"dtype": choice.name, "reason": choice.reason}

    def current_config(self) -> dict:
        # EngineKnob.apply keeps the engine's and the scheduler's copies equal: the engine's are read.
        return {
            **{key: getattr(self.engine.config, key) for key in ENGINE_KNOBS},
            "pooled_batch_wait_ms": self.pooled_batch_wait_ms,
            "pooled_max_batch_size": self.pooled_max_batch_size,
        }

    def stats(self) -> dict:
        out = dataclasses.asdict(self.async_engine.stats())
        out["pooled_batches"] = self.pooled_batches
        out["pooled_max_batch"] = self.pooled_max_batch
        out["shared_streams"] = len(self._shared_sinks)
        out["shared_stream_batches"] = self.shared_stream_counts["batches"]
        out["shared_stream_outputs"] = self.shared_stream_counts["outputs"]
        out["shared_stream_tokens"] = self.shared_stream_counts["tokens"]
        out["pid"] = os.getpid()
        out["loras"] = self.loras.stats()
        out["torch_threads"] = self.torch_threads
        out["tp_worker_pids"] = [w.get("pid") for w in getattr(self.engine.executor, "worker_infos", [])]
        return out

    def reconfigure(self, user_config: dict) -> None:
        user_config = dict(user_config or {})
        unknown = set(user_config) - set(USER_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}; known: {list(USER_CONFIG_KEYS)}")
        values = {key: knob.value(key, user_config[key]) for key, knob in ENGINE_KNOBS.items() if key in user_config}

        def change(engine: Engine) -> None:  # runs between steps (AsyncEngine.reconfigure); all checked first
            for key, value in values.items():
                ENGINE_KNOBS[key].apply(engine, key, value)

        self.async_engine.reconfigure(change)
        if "pooled_batch_wait_ms" in user_config:
            self.pooled_batch_wait_ms = max(0.0, float(user_config["pooled_batch_wait_ms"]))
        if "pooled_max_batch_size" in user_config:
            self.pooled_max_batch_size = max(1, int(user_config["pooled_max_batch_size"]))
        logger.info("router %s reconfigured: %s", self.model_name, self.current_config())

    def check_health(self) -> None:
        self._check_alive()

    def _check_alive(self) -> None:
        if not self.async_engine.alive:
            why = self.async_engine.error or "the step loop is not running"
            raise UnavailableError(f"model {self.model_name!r}: engine failed: {why}")

    def __del__(self):
        try:
            self.metrics.stop()
        except Exception:
            pass
        try:
            self.async_engine.shutdown()
        except Exception:
            pass


def router_torch_threads(configured: int | None) -> int:
    """Threads for the model in this process: `configured` (the model's `torch_threads`) when set,
    else the whole CPUs Ray reserved for this actor (num_cpus >= 1), else (a fractional num_cpus, the
    default 0.25: a share, not a core) every CPU this process may run on."""
    if configured:
        return max(1, int(configured))
    try:
        import ray
        if ray.is_initialized():
            assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            if assigned >= 1:
                return int(assigned)
    except Exception:  # not in a Ray worker: the machine's CPUs
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def _workers_alive(executor, tp: int):
    """For the qwen2_tp_workers_alive gauge: tp while the worker group lives, else 0 (tp=1: 1)."""
    def alive() -> int:
        return tp if getattr(executor, "alive", True) else 0
    return alive


def _default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"
