"""AsyncEngine coalesces a choice's queued outputs: a consumer that fell behind gets one message
with every token it missed (one Serve message and one SSE / gRPC write instead of one per token),
and the tokens are exactly those of a consumer that kept up."""

import asyncio

import pytest

from qwen2_model.engine.engine import AsyncEngine, Engine, EngineConfig
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.testing import write_random_checkpoint


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    return LocalExecutor(write_random_checkpoint(tmp_path_factory.mktemp("ck"), num_hidden_layers=2),
                         kv_cache_memory=2 << 20)


async def _collect(engine: AsyncEngine, rid: str, lag_s: float, **params) -> list:
    outs = []
    stream = engine.generate(rid, [5, 6, 7, 8], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                               **params))
    async for out in stream:
        outs.append(out)
        if len(outs) == 1 and lag_s:
            while engine.engine.requests.get(rid):  # let the engine finish while we do not read
                await asyncio.sleep(lag_s)
            await asyncio.sleep(0.2)  # and its last outputs reach this loop
    return outs


def test_a_slow_consumer_gets_the_missed_tokens_in_one_message(executor):
    async def main():
        engine = AsyncEngine(Engine(executor, EngineConfig()))
        try:
            fast = await _collect(engine, "keeps-up", 0.0)
            slow = await _collect(engine, "falls-behind", 0.01, logprobs=1)
        finally:
            engine._stopped = True
            engine._wake.set()
        return fast, slow

    fast, slow = asyncio.run(main())
    tokens = [t for o in fast for t in o.new_token_ids]
    # A reader that keeps up gets about one message per step; how many exactly depends on the
    # machine's load (a starved event loop coalesces too), so only the tokens are asserted here.
    assert len(tokens) == 12 and all(o.new_token_ids for o in fast)
    assert len(slow) == 2  # the first, then the 11 it missed at once
    assert [t for o in slow for t in o.new_token_ids] == tokens
    assert [lp.token_id for o in slow for lp in o.new_logprobs] == tokens  # logprobs stay aligned
    assert slow[-1].finish_reason == "length" and slow[-1].num_output_tokens == 12


def test_stream_interval_sends_the_first_token_then_every_k_tokens(executor):
    """EngineConfig.stream_interval 4 (vLLM's --stream-interval): a choice's first token goes out at
    once, then messages of at least 4 tokens, the rest with the finish; the tokens (and their
    logprobs) are those of stream_interval 1, for each of n choices."""
    async def run(interval: int) -> list:
        engine = AsyncEngine(Engine(executor, EngineConfig(stream_interval=interval)))
        try:
            params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=2, logprobs=1, ignore_eos=True)
            return [out async for out in engine.generate(f"k{interval}", [5, 6, 7, 8], params)]
        finally:
            engine._stopped = True
            engine._wake.set()

    every, grouped = asyncio.run(run(1)), asyncio.run(run(4))
    for index in (0, 1):
        ones = [o for o in every if o.index == index]
        fours = [o for o in grouped if o.index == index]
        tokens = [t for o in ones for t in o.new_token_ids]
        assert len(tokens) == 10 and [t for o in fours for t in o.new_token_ids] == tokens
        assert [lp.token_id for o in fours for lp in o.new_logprobs] == tokens
        assert not fours[0].finished  # the first token is not held back
        assert all(len(o.new_token_ids) >= 4 for o in fours[1:-1]) and fours[-1].finish_reason == "length"
        assert len(fours) <= 1 + -(-9 // 4)
