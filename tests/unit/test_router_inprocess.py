"""The Router driven in-process (no Ray, no Serve): typed generation out of the real engine, and
pooled micro-batching (concurrent calls share one forward, each gets its own rows, a bad request
fails alone, different kinds never share a forward)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.errors import InvalidRequestError
from deployments.router import Router
from qwen2_model.engine.engine import Engine, RequestOutput
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.sampling import SamplingParams
from tests.helpers import assert_greedy_varies, greedy_outputs

INPUTS = [[1, 2, 3], [40, 41], [7, 8, 9, 10, 11], [300], [12, 13]]


def make_router(path, **kw) -> Router:
    return Router("m", str(path), kv_cache_memory=1 << 20, torch_threads=1, **kw)


def close(router: Router) -> None:
    router.metrics.stop()
    router.async_engine.shutdown()


def test_generation_streams_the_engines_typed_outputs(checkpoints):
    path = checkpoints(num_hidden_layers=2)
    reference = Engine(LocalExecutor(path, kv_cache_memory=1 << 20))
    assert_greedy_varies(reference)  # so a row mix-up would show
    expected = greedy_outputs(reference, max_tokens=8)
    router = make_router(path)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> list[int]:
        tokens = []
        async for out in router.generate(f"r{i}", prompt, params):
            assert isinstance(out, RequestOutput)
            tokens += out.new_token_ids
        return tokens

    async def all_at_once():
        from tests.helpers import VARIETY_PROMPTS
        return await asyncio.gather(*[one(i, p) for i, p in enumerate(VARIETY_PROMPTS)])

    try:
        assert asyncio.run(all_at_once()) == expected  # batched together == one engine, alone
    finally:
        close(router)


def test_pooled_calls_share_a_forward_and_each_gets_its_own_rows(checkpoints):
    router = make_router(checkpoints("sequence_classification", num_hidden_layers=2), pooled_batch_wait_ms=500,
                         pooled_max_batch_size=16)

    async def scenario():
        alone = [await router.pooled("classify", [ids]) for ids in INPUTS]
        forwards = router.pooled_batches
        together = await asyncio.gather(*[router.pooled("classify", [ids]) for ids in INPUTS])
        shared = router.pooled_batches - forwards
        # A bad request fails alone; the one it was batched with is answered.
        good, bad = await asyncio.gather(router.pooled("classify", [INPUTS[0]]),
                                         router.pooled("classify", [[10 ** 7]]), return_exceptions=True)
        # Different kinds never share a forward.
        forwards = router.pooled_batches
        await asyncio.gather(router.pooled("classify", [INPUTS[0]]), router.pooled("embed", [INPUTS[0]]))
        kinds = router.pooled_batches - forwards
        return alone, together, shared, good, bad, kinds

    try:
        alone, together, shared, good, bad, kinds = asyncio.run(scenario())
    finally:
        close(router)
    assert shared == 1 and router.pooled_max_batch >= len(INPUTS)  # five calls, one forward
    for a, t in zip(alone, together):
        assert t[0] == pytest.approx(a[0], abs=1e-5)
    assert len({tuple(round(p, 4) for p in a[0]) for a in alone}) == len(INPUTS)  # rows differ: a swap would show
    assert good[0] == pytest.approx(alone[0][0], abs=1e-5)
    assert isinstance(bad, InvalidRequestError) and bad.param == "input" and "vocabulary" in bad.message
    assert kinds == 2


def test_a_task_the_model_cannot_do_names_the_model(checkpoints):
    router = make_router(checkpoints("sequence_classification", num_hidden_layers=2))
    try:
        for task in ("answer", "generate"):
            with pytest.raises(InvalidRequestError) as info:
                asyncio.run(router.pooled(task, [INPUTS[0]]))
            assert info.value.param == "model"
    finally:
        close(router)


def test_reconfigure_sets_the_streaming_and_prefill_knobs_live(checkpoints):
    """user_config stream_interval / prefill_drain_steps reach the engine between steps (a bad value
    is refused by name), and a request started afterwards streams k tokens a message."""
    router = make_router(checkpoints(num_hidden_layers=2))
    try:
        router.reconfigure({"stream_interval": 3, "prefill_drain_steps": 2})
        config = router.current_config()
        assert config["stream_interval"] == 3 and config["prefill_drain_steps"] == 2
        assert router.engine.scheduler.config.prefill_drain_steps == 2
        bad_values = {"max_num_seqs": 0, "max_num_batched_tokens": 0, "max_waiting": -1, "max_prefill_tokens": 0,
                      "prefill_step_ratio": 1.0, "prefill_drain_steps": 0, "stream_interval": 0}
        for key, value in bad_values.items():
            with pytest.raises(ValueError, match=f"^{key} must be "):
                router.reconfigure({key: value})
        assert router.current_config()["stream_interval"] == 3  # a refused change changes nothing
        with pytest.raises(ValueError, match="^max_num_seqs must be a number >= 1, got 'many'"):
            router.reconfigure({"stream_interval": 5, "max_num_seqs": "many"})
        assert router.current_config()["stream_interval"] == 3  # nor does its good half: all checked first
        router.reconfigure({"max_prefill_tokens": 64, "max_waiting": 5})
        assert router.engine.scheduler.config.max_prefill_tokens == 64 and router.engine.config.max_waiting == 5
        router.reconfigure({"max_prefill_tokens": None})  # null turns the cap off
        assert router.engine.scheduler.config.max_prefill_tokens is None

        async def sizes() -> list[int]:
            params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
            return [len(out.new_token_ids) async for out in router.generate("k3", [1, 2, 3], params)]

        got = asyncio.run(sizes())
        assert sum(got) == 8 and got[0] >= 1 and all(n >= 3 for n in got[1:-1]) and len(got) <= 4
    finally:
        close(router)


def test_a_bad_engine_knob_is_refused_by_name_before_the_model_loads(checkpoints, monkeypatch):
    import qwen2_model.engine.executor as executor_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(executor_module, "LocalExecutor", no_load)
    with pytest.raises(ValueError, match="^prefill_step_ratio must be > 1 or null, got 0.5"):
        make_router(checkpoints(num_hidden_layers=2), engine={"prefill_step_ratio": 0.5})
