"""The serving engine: continuous batching, paged KV cache, preemption, prefix caching, sampling, streaming."""

import asyncio
import random

import pytest
import torch

from qwen2_model.engine.engine import AsyncEngine, Engine, EngineConfig, EngineError, QueueFull
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.paged_attention import PagedKVCache
from qwen2_model.engine.model_runner import PooledInput
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.testing import write_random_checkpoint
from tests.helpers import assert_greedy_varies

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    # A sliding window on the second layer, so paged attention's window path is exercised too. Weights
    # scaled (tests/helpers.py) so greedy output varies and "batched equals alone" would catch a swap.
    return checkpoints(num_hidden_layers=2, use_sliding_window=True, sliding_window=24, max_window_layers=1, seed=3)


@pytest.fixture(scope="module")
def executor(checkpoint):
    return LocalExecutor(checkpoint, kv_cache_memory=2 << 20)


def make_engine(executor, **config):
    return Engine(executor, EngineConfig(**config))


def small_executor(checkpoint, executor, num_blocks: int) -> LocalExecutor:
    """The same checkpoint with a KV cache of exactly `num_blocks` 16-token blocks."""
    cfg = executor.config
    per_block = PagedKVCache.bytes_per_block(cfg.num_hidden_layers, 16, cfg.num_key_value_heads, cfg.head_dim,
                                             torch.float32)
    return LocalExecutor(checkpoint, kv_cache_memory=num_blocks * per_block)


def test_the_checkpoint_greedy_output_varies(executor):
    assert_greedy_varies(Engine(executor))


def random_prompts(n, seed=0, lo=3, hi=90):
    rng = random.Random(seed)
    return {f"r{i}": [rng.randrange(0, 500) for _ in range(rng.randrange(lo, hi))] for i in range(n)}


def test_32_concurrent_greedy_equal_alone_and_transformers(checkpoint, executor):
    transformers = pytest.importorskip("transformers")
    prompts = random_prompts(32)
    engine = make_engine(executor, max_num_batched_tokens=128)
    together = engine.generate_all(prompts, SamplingParams(max_tokens=32, **GREEDY))
    assert engine.stats.max_batch_seqs >= 16  # they really ran together
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for rid, prompt in prompts.items():
        alone = make_engine(executor).generate_all({rid: prompt}, SamplingParams(max_tokens=32, **GREEDY))[rid][0]
        assert together[rid][0] == alone, rid
        with torch.no_grad():
            ids = torch.tensor([prompt])  # explicit mask: a prompt may contain the pad id
            expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                    do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert alone == expected, rid


def test_seeded_request_same_alone_and_in_busy_batch(executor):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = [11, 22, 33, 44, 55]
    alone = make_engine(executor).generate_all({"seeded": prompt}, params)["seeded"][0]
    engine = make_engine(executor)
    busy = {rid: p for rid, p in random_prompts(12, seed=5).items()}
    others = {rid: SamplingParams(max_tokens=30, temperature=0.8, ignore_eos=True) for rid in busy}
    out = engine.generate_all({**busy, "seeded": prompt}, {**others, "seeded": params})
    assert out["seeded"][0] == alone
    other_seed = make_engine(executor).generate_all({"s": prompt}, SamplingParams(
        max_tokens=24, temperature=1.0, top_p=0.95, seed=99, ignore_eos=True))["s"][0]
    assert other_seed != alone


@pytest.mark.parametrize("prefix_caching", [False, True])  # with it, a preempted prompt may come back from the cache
def test_preemption_under_small_kv_budget_keeps_outputs(checkpoint, executor, prefix_caching):
    prompts = random_prompts(12, seed=7, lo=20, hi=60)
    params = SamplingParams(max_tokens=40, **GREEDY)
    roomy = make_engine(executor).generate_all(prompts, params)
    small = small_executor(checkpoint, executor, 12)
    assert small.num_kv_blocks == 12  # 12 blocks of 16 tokens: far too few for 12 sequences of ~90 tokens
    engine = make_engine(small, enable_prefix_caching=prefix_caching)
    tight = engine.generate_all(prompts, params)
    assert engine.stats.preemptions > 0
    assert tight == roomy
    assert engine.blocks.num_free == engine.blocks.num_blocks


def _run(engine, requests: dict) -> list:
    """Add {request_id: (prompt, params)} and step until done; every RequestOutput, in order."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def _assert_prompt_logprobs_match(executor, prompt: list[int], logprobs, k: int) -> None:
    with torch.no_grad():
        ref = executor.model(torch.tensor([prompt]))[0].float().log_softmax(-1)  # [S, V]
    assert [lp.token_id for lp in logprobs] == prompt[1:]  # one per prompt token after the first
    for q, lp in enumerate(logprobs):  # the row at position q predicts token q + 1
        assert abs(lp.logprob - ref[q, prompt[q + 1]].item()) < 1e-4, q
        assert [t for t, _ in lp.top] == ref[q].topk(k).indices.tolist(), q


@pytest.mark.parametrize("budget", [512, 16])  # the whole prompt in one step, or chunks of 16 tokens
def test_prompt_logprobs_equal_a_full_forward(executor, budget):
    prompt = random_prompts(1, seed=11, lo=70, hi=71)["r0"]
    engine = make_engine(executor, max_num_batched_tokens=budget)
    _run(engine, {"warm": (prompt, SamplingParams(max_tokens=2, **GREEDY))})  # the prompt is now in the prefix cache
    outputs = _run(engine, {"p": (prompt, SamplingParams(max_tokens=3, n=2, prompt_logprobs=2, **GREEDY))})
    carrying = [o for o in outputs if o.prompt_logprobs is not None]
    assert sorted(o.index for o in carrying) == [0, 1]  # each choice's first output, and only that one
    assert all(o.num_output_tokens == 1 for o in carrying)
    for o in carrying:
        _assert_prompt_logprobs_match(executor, prompt, o.prompt_logprobs, 2)
    plain = _run(engine, {"q": (prompt, SamplingParams(max_tokens=2, **GREEDY))})
    assert all(o.prompt_logprobs is None for o in plain)


def test_prompt_logprobs_survive_preemption(checkpoint, executor):
    prompts = random_prompts(6, seed=8, lo=30, hi=60)
    engine = make_engine(small_executor(checkpoint, executor, 8), max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=30, prompt_logprobs=1, **GREEDY)
    outputs = _run(engine, {rid: (p, params) for rid, p in prompts.items()})
    assert engine.stats.preemptions > 0
    for rid, prompt in prompts.items():
        (first,) = [o for o in outputs if o.request_id == rid and o.prompt_logprobs is not None]
        _assert_prompt_logprobs_match(executor, prompt, first.prompt_logprobs, 1)


def test_waiting_sequences_hold_no_cached_blocks_so_preemption_cannot_deadlock(checkpoint, executor):
    """A preempted prompt found in the prefix cache but not admitted must give those blocks back:
    two waiting sequences each holding cached blocks the other needs used to stall the engine."""
    prompts = random_prompts(6, seed=8, lo=30, hi=60)
    params = SamplingParams(max_tokens=30, **GREEDY)
    roomy = make_engine(executor).generate_all(prompts, params)
    engine = make_engine(small_executor(checkpoint, executor, 8), max_num_batched_tokens=32)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
    for _ in range(2000):  # ~150 steps are needed; a stalled engine would loop forever
        if not engine.has_unfinished():
            break
        for o in engine.step():
            outputs[o.request_id].extend(o.new_token_ids)
    assert not engine.has_unfinished(), [(s.request_id, len(s.block_table)) for s in engine.scheduler.waiting]
    assert engine.stats.preemptions > 0
    assert outputs == {rid: out[0] for rid, out in roomy.items()}
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prefix_cache_reuses_blocks_and_gives_same_output(executor):
    shared = list(range(100, 180))  # 80 tokens = 5 full blocks
    engine = make_engine(executor)
    params = SamplingParams(max_tokens=16, **GREEDY)
    first = engine.generate_all({"a": shared + [1, 2, 3]}, params)["a"][0]
    hits_before = engine.blocks.prefix_hits
    second = engine.generate_all({"b": shared + [1, 2, 3]}, params)["b"][0]
    assert engine.blocks.prefix_hits - hits_before == 5
    assert second == first
    cold = make_engine(executor, enable_prefix_caching=False).generate_all({"c": shared + [1, 2, 3]}, params)["c"][0]
    assert cold == first
    # a different continuation of the same prefix also hits and matches its own cold run
    third = engine.generate_all({"d": shared + [7, 8]}, params)["d"][0]
    assert third == make_engine(executor, enable_prefix_caching=False).generate_all({"d": shared + [7, 8]}, params)["d"][0]


def test_no_block_leak_after_1000_requests_with_random_aborts(executor):
    engine = make_engine(executor, max_num_seqs=32, max_num_batched_tokens=256)
    rng = random.Random(0)
    live: list[str] = []
    for i in range(1000):
        rid = f"q{i}"
        prompt = [rng.randrange(0, 500) for _ in range(rng.randrange(1, 40))]
        engine.add_request(rid, prompt, SamplingParams(max_tokens=rng.randrange(1, 6), n=rng.choice([1, 1, 2]),
                                                      **GREEDY))
        live.append(rid)
        if rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        if i % 3 == 0:
            engine.step()
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.requests
    assert all(rc == 0 for rc in engine.blocks.ref_counts)


def test_chunked_prefill_does_not_stall_decodes(executor):
    engine = make_engine(executor, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=30, **GREEDY)
    engine.add_request("short", [1, 2, 3], params)
    engine.step()  # prefill of the short one
    engine.add_request("long", list(range(200, 400)), params)  # 200 tokens: 7 chunks of <= 32
    decode_steps_during_prefill = 0
    for _ in range(6):
        outputs = engine.step()
        if any(o.request_id == "short" for o in outputs):
            decode_steps_during_prefill += 1
        assert engine.last_step.num_tokens <= 32
    assert decode_steps_during_prefill == 6
    while engine.has_unfinished():
        engine.step()
    alone = make_engine(executor).generate_all({"long": list(range(200, 400))}, params)["long"][0]
    again = make_engine(executor, max_num_batched_tokens=32).generate_all({"long": list(range(200, 400))}, params)
    assert again["long"][0] == alone


def run_one(executor, prompt, **params):
    engine = make_engine(executor)
    engine.add_request("x", prompt, SamplingParams(**params))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_max_tokens_gives_length_finish(executor):
    outs = run_one(executor, [5, 6, 7], max_tokens=7, **GREEDY)
    assert sum(len(o.new_token_ids) for o in outs) == 7
    assert outs[-1].finish_reason == "length"


def test_stop_token_ids_and_min_tokens(executor):
    free_run = [t for o in run_one(executor, [5, 6, 7], max_tokens=12, **GREEDY) for t in o.new_token_ids]
    stop_at = free_run[4]
    outs = run_one(executor, [5, 6, 7], max_tokens=12, stop_token_ids=[stop_at], **GREEDY)
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == free_run[:free_run.index(stop_at) + 1]
    assert outs[-1].finish_reason == "stop"
    # min_tokens bans the stop id until reached, so the output is at least that long
    outs = run_one(executor, [5, 6, 7], max_tokens=12, min_tokens=10, stop_token_ids=[stop_at], **GREEDY)
    assert sum(len(o.new_token_ids) for o in outs) >= 10


def test_eos_stops_unless_ignore_eos(executor):
    eos = executor.config.eos_token_ids[0]
    free_run = [t for o in run_one(executor, [9, 8, 7], max_tokens=10, **GREEDY) for t in o.new_token_ids]
    # Make the engine treat the 3rd generated token as EOS: the same run must stop there.
    engine = make_engine(executor)
    engine.eos_token_ids = [free_run[2]]
    engine.add_request("x", [9, 8, 7], SamplingParams(max_tokens=10, temperature=0.0))
    toks = []
    while engine.has_unfinished():
        for o in engine.step():
            toks += o.new_token_ids
            last = o
    assert toks == free_run[:free_run.index(free_run[2]) + 1] and last.finish_reason == "stop"
    engine = make_engine(executor)
    engine.eos_token_ids = [free_run[2], eos]
    engine.add_request("y", [9, 8, 7], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    toks = []
    while engine.has_unfinished():
        toks += [t for o in engine.step() for t in o.new_token_ids]
    assert toks == free_run


def test_logprobs_are_returned(executor):
    outs = run_one(executor, [5, 6, 7], max_tokens=4, logprobs=3, **GREEDY)
    for o in outs:
        lp = o.new_logprobs[0]
        assert lp.token_id == o.new_token_ids[0] and len(lp.top) == 3 and lp.logprob <= 0
        assert lp.top[0][0] == lp.token_id  # greedy picks the top token


def test_n_choices_share_prompt_blocks(executor):
    engine = make_engine(executor)
    prompt = list(range(50, 120))  # 70 tokens: 4 full blocks
    engine.add_request("n", prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))
    results = {}
    while engine.has_unfinished():
        for o in engine.step():
            results.setdefault(o.index, []).extend(o.new_token_ids)
    assert sorted(results) == [0, 1, 2] and all(len(v) == 8 for v in results.values())
    assert len({tuple(v) for v in results.values()}) > 1  # different seeds per choice
    assert engine.blocks.prefix_hits >= 8  # choices 1 and 2 reused the 4 prompt blocks


def test_invalid_requests_name_the_field(executor):
    engine = make_engine(executor, max_model_len=64)
    with pytest.raises(EngineError, match="max_tokens") as err:
        engine.add_request("a", [1] * 60, SamplingParams(max_tokens=10))
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.add_request("b", [10 ** 7], SamplingParams())
    with pytest.raises(EngineError, match="temperature"):
        engine.add_request("c", [1], SamplingParams(temperature=-1))
    with pytest.raises(EngineError, match="at least one token"):
        engine.add_request("d", [], SamplingParams())
    with pytest.raises(EngineError, match="stop_token_ids") as err:  # would index another row's logits
        engine.add_request("s", [1], SamplingParams(stop_token_ids=[executor.config.vocab_size]))
    assert err.value.param == "stop_token_ids"
    with pytest.raises(EngineError, match="logit_bias") as err:
        engine.add_request("b", [1], SamplingParams(logit_bias={executor.config.vocab_size: 1.0}))
    assert err.value.param == "logit_bias"
    engine.add_request("e", [1], SamplingParams())
    with pytest.raises(EngineError, match="already in use"):
        engine.add_request("e", [1], SamplingParams())
    full = make_engine(executor, max_waiting=1)
    full.add_request("f", [1], SamplingParams())
    with pytest.raises(QueueFull):
        full.add_request("g", [1], SamplingParams())


def test_async_engine_streams_and_cancellation_frees_blocks(executor):
    engine = make_engine(executor)
    runner = AsyncEngine(engine)

    async def main():
        streamed = []
        async for out in runner.generate("s", [1, 2, 3], SamplingParams(max_tokens=10, **GREEDY)):
            streamed.extend(out.new_token_ids)
        gen = runner.generate("c", [4, 5, 6], SamplingParams(max_tokens=1000, **GREEDY))
        got = 0
        async for _ in gen:
            got += 1
            if got == 3:
                break
        await gen.aclose()
        return streamed

    try:
        streamed = asyncio.run(main())
        assert len(streamed) == 10
        assert streamed == make_engine(executor).generate_all({"s": [1, 2, 3]}, SamplingParams(max_tokens=10, **GREEDY))["s"][0]
        stats = runner.stats()
        assert stats.running == 0 and stats.waiting == 0
        assert stats.free_kv_blocks == stats.num_kv_blocks
        assert stats.generated_tokens < 100  # the cancelled request did not run on to 1000 tokens
    finally:
        runner._stopped = True
        runner._thread.join(5)


@pytest.mark.parametrize("head,task", [("sequence_classification", "classify"),
                                       ("token_classification", "classify_tokens"),
                                       ("question_answering", "answer"), ("base", "embed")])
def test_batched_pooled_heads_equal_single_forwards(tmp_path, head, task):
    ck = write_random_checkpoint(tmp_path, head=head)
    ex = LocalExecutor(ck)
    engine = Engine(ex)
    inputs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    batched = engine.run_pooled(PooledInput(task, inputs))
    for ids, got in zip(inputs, batched):
        alone = engine.run_pooled(PooledInput(task, [ids]))[0]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(alone), atol=1e-5, rtol=0)
    if task == "classify":  # against the model's own padded-batch forward
        with torch.no_grad():
            probs = ex.model(torch.tensor([inputs[0]])).softmax(-1)[0]
        torch.testing.assert_close(torch.tensor(batched[0]), probs, atol=1e-5, rtol=0)


def test_async_engine_never_blocks_the_event_loop_on_a_step(executor):
    """Adding and aborting requests while a (slow) step runs must not stall the event loop."""
    import time

    class SlowExecutor:
        def __init__(self, inner):
            self.inner = inner
            self.config, self.architecture = inner.config, inner.architecture
            self.num_kv_blocks, self.block_size = inner.num_kv_blocks, inner.block_size

        def execute(self, step):
            time.sleep(0.3)
            return self.inner.execute(step)

        def shutdown(self):
            pass

    runner = AsyncEngine(Engine(SlowExecutor(executor)))

    async def main():
        async def consume(rid):
            return [o async for o in runner.generate(rid, [1, 2, 3], SamplingParams(max_tokens=3, **GREEDY))]

        first = asyncio.create_task(consume("a"))
        await asyncio.sleep(0.05)  # the step thread is now inside a 0.3 s step
        gaps, last = [], time.perf_counter()
        second = asyncio.create_task(consume("b"))
        for _ in range(40):
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        results = await asyncio.gather(first, second)
        return max(gaps), results

    try:
        worst_gap, (a, b) = asyncio.run(main())
        assert worst_gap < 0.15, worst_gap  # a 0.3 s step never held the loop
        assert sum(len(o.new_token_ids) for o in a) == 3 and sum(len(o.new_token_ids) for o in b) == 3
    finally:
        runner._stopped = True
        runner._thread.join(5)


def test_async_engine_checks_requests_before_queueing(executor):
    runner = AsyncEngine(make_engine(executor, max_waiting=0))

    async def first(rid, **params):
        async for out in runner.generate(rid, [1, 2], SamplingParams(**params)):
            return out

    try:
        with pytest.raises(QueueFull):
            asyncio.run(first("q", max_tokens=2))
        with pytest.raises(EngineError, match="temperature"):
            asyncio.run(first("t", temperature=-1.0))
    finally:
        runner._stopped = True
        runner._thread.join(5)


def test_kv_capacity_from_a_byte_budget(executor):
    from qwen2_model.engine.executor import kv_blocks_for_budget

    cfg = executor.config
    per_block = PagedKVCache.bytes_per_block(cfg.num_hidden_layers, 16, cfg.num_key_value_heads, cfg.head_dim,
                                             torch.float32)
    assert kv_blocks_for_budget(cfg, 10 * per_block + 1, 16, torch.float32) == 10
    # tp=2 halves a rank's KV heads, so the same bytes hold twice the blocks
    assert kv_blocks_for_budget(cfg, 10 * per_block, 16, torch.float32, tp=2) == 20
    # the GPU fraction only applies on CUDA; on CPU the byte budget stands
    assert kv_blocks_for_budget(cfg, 10 * per_block, 16, torch.float32, gpu_memory_fraction=0.5) == 10
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        kv_blocks_for_budget(cfg, per_block, 16, torch.float32, gpu_memory_fraction=1.5)
    with pytest.raises(ValueError, match="holds no KV block"):
        kv_blocks_for_budget(cfg, per_block - 1, 16, torch.float32)


def test_pooled_batches_are_split_by_padded_tokens(tmp_path):
    ck = write_random_checkpoint(tmp_path, head="sequence_classification")
    ex = LocalExecutor(ck)
    calls = []
    real = ex.run_pooled
    ex.run_pooled = lambda req: calls.append([len(t) for t in req.token_ids]) or real(req)
    inputs = [[5] * n for n in (30, 3, 12, 7, 25, 4)]
    small = Engine(ex, EngineConfig(max_pooled_batch_tokens=40))
    split = small.run_pooled(PooledInput("classify", inputs))
    assert all(len(c) * max(c) <= 40 for c in calls) and len(calls) > 1
    one_by_one = [Engine(ex).run_pooled(PooledInput("classify", [ids]))[0] for ids in inputs]
    torch.testing.assert_close(torch.tensor(split), torch.tensor(one_by_one), atol=1e-5, rtol=0)
