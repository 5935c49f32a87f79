"""A served model's torch work all runs on the engine's step thread (AsyncEngine).

libgomp (torch's CPU threads) gives every thread that runs a parallel region a pool of its own, and
once the pools' threads outnumber the CPUs it cuts its workers' spin to ~100 iterations: the step's
worker then sleeps between the hundreds of small regions of a decode step. So the engine is built on
the step thread, and pooled forwards and adapter checks go there too (`AsyncEngine.call`), never to
a thread of their own.
"""

import asyncio
import threading

import pytest
import torch

from deployments.router import Router
from qwen2_model.engine.engine import AsyncEngine, Engine, EngineConfig, EngineDead
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.model_runner import PooledInput
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.lora import LoraError


class ThreadRecordingExecutor(LocalExecutor):
    """A LocalExecutor that notes which thread built it and which threads ran its forwards."""

    def __init__(self, *args, **kwargs):
        self.threads: dict[str, set[int]] = {"build": {threading.get_ident()}, "execute": set(), "pooled": set()}
        super().__init__(*args, **kwargs)

    def execute(self, step):
        self.threads["execute"].add(threading.get_ident())
        return super().execute(step)

    def run_pooled(self, req):
        self.threads["pooled"].add(threading.get_ident())
        return super().run_pooled(req)


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints(num_hidden_layers=2)


def generate(runner: AsyncEngine, rid: str, prompt: list[int]) -> list[int]:
    async def run():
        return [t async for out in runner.generate(rid, prompt, SamplingParams(max_tokens=4, temperature=0.0,
                                                                               ignore_eos=True))
                for t in out.new_token_ids]
    return asyncio.run(run())


def test_an_engine_built_by_a_function_is_built_and_stepped_on_the_step_thread(checkpoint):
    runner = AsyncEngine(lambda: Engine(ThreadRecordingExecutor(checkpoint, kv_cache_memory=1 << 20)))
    try:
        threads = runner.engine.executor.threads
        assert len(generate(runner, "a", [1, 2, 3])) == 4
        step_thread = runner._thread.ident
        assert threads["build"] == {step_thread} != {threading.get_ident()}
        assert threads["execute"] == {step_thread}
    finally:
        runner.shutdown()


def test_pooled_forwards_and_adapter_checks_run_on_the_step_thread(checkpoint):
    runner = AsyncEngine(Engine(ThreadRecordingExecutor(checkpoint, kv_cache_memory=1 << 20)))
    seen: list[int] = []
    real_add_lora = runner.engine.add_lora

    def add_lora(name, path):
        seen.append(threading.get_ident())
        return real_add_lora(name, path)

    runner.engine.add_lora = add_lora
    try:
        rows = asyncio.run(runner.run_pooled(PooledInput("embed", [[1, 2, 3], [4, 5]])))
        assert len(rows) == 2
        assert runner.engine.executor.threads["pooled"] == {runner._thread.ident}
        with pytest.raises(LoraError, match="missing"):  # not an adapter: refused, and the refusal reaches the caller
            asyncio.run(runner.add_lora("nope", str(checkpoint) + "/missing"))
        assert seen == [runner._thread.ident]
        assert len(generate(runner, "after", [7, 8])) == 4  # an error in a call leaves the loop running
    finally:
        runner.shutdown()


def test_a_failed_build_is_raised_to_the_caller_and_calls_after_shutdown_are_refused(checkpoint):
    def broken() -> Engine:
        raise FileNotFoundError("no checkpoint at /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        AsyncEngine(broken)
    runner = AsyncEngine(Engine(LocalExecutor(checkpoint, kv_cache_memory=1 << 20)))
    assert runner.call(lambda engine: engine.config.max_num_seqs).result(timeout=10) == EngineConfig().max_num_seqs
    runner.shutdown()
    with pytest.raises(EngineDead):
        runner.call(lambda engine: None)


def test_the_router_builds_its_model_on_the_engines_step_thread(checkpoint, monkeypatch):
    import qwen2_model.engine.executor as executor_module

    monkeypatch.setattr(executor_module, "LocalExecutor", ThreadRecordingExecutor)
    before = torch.get_num_threads()
    router = Router("m", checkpoint, kv_cache_memory=1 << 20, device="cpu", torch_threads=1)
    try:
        threads = router.engine.executor.threads
        assert threads["build"] == {router.async_engine._thread.ident} != {threading.get_ident()}
        assert router.stats()["torch_threads"] == 1  # as seen by the thread that runs the model
    finally:
        router.metrics.stop()
        router.async_engine.shutdown()
        torch.set_num_threads(before)
