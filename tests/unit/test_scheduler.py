"""Block manager and scheduler policy, without a model: prefix-cache LRU eviction, caps, FCFS order."""

import pytest

from qwen2_model.engine.block_manager import BlockManager, NoFreeBlocks
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.engine.scheduler import Scheduler, SchedulerConfig, Sequence, StepCostModel
from tests.helpers import cache_prompt


def test_cached_blocks_are_evicted_least_recently_used_first():
    blocks = BlockManager(num_blocks=4, block_size=2)
    a = cache_prompt(blocks, [1, 2, 3, 4])  # 2 blocks
    b = cache_prompt(blocks, [5, 6, 7, 8])  # 2 blocks
    assert blocks.num_free == 4  # cached blocks count as free (evictable)
    got, _ = blocks.match_prefix([1, 2, 3, 4, 9])  # touch a: b is now least recently used
    assert got == a
    blocks.release(got)
    table = []
    blocks.grow(table, 4)  # needs 2 fresh blocks: b's are evicted, a's kept
    assert sorted(table) == sorted(b)
    assert blocks.match_prefix([5, 6, 7, 8, 0])[0] == []
    assert blocks.match_prefix([1, 2, 3, 4, 0])[0] == a


def test_grow_is_all_or_nothing():
    blocks = BlockManager(num_blocks=3, block_size=4)
    table = []
    with pytest.raises(NoFreeBlocks):
        blocks.grow(table, 13)  # 4 blocks
    assert table == [] and blocks.num_free == 3


_next_token = [1000]


def make_seq(rid: str, n: int = 8) -> Sequence:
    """A sequence whose prompt shares no tokens with any other (no prefix-cache hits)."""
    start = _next_token[0]
    _next_token[0] += n
    return Sequence(rid, 0, list(range(start, start + n)), SamplingParams(max_tokens=4), None)


def test_max_num_seqs_caps_the_running_batch():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=1000), BlockManager(100, 16))
    for i in range(5):
        scheduler.add(make_seq(f"r{i}"))
    scheduled = scheduler.schedule()
    assert [s.seq.request_id for s in scheduled] == ["r0", "r1", "r2"]
    assert len(scheduler.waiting) == 2


def test_first_come_first_served_under_a_token_budget():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=10, max_num_batched_tokens=20), BlockManager(100, 16))
    for i, n in enumerate([15, 3, 3]):
        scheduler.add(make_seq(f"r{i}", n))
    first = scheduler.schedule()
    # r0 takes 15, r1 fits in the 5 left, r2 gets the last 2 as a prefill chunk: arrival order kept
    assert [(s.seq.request_id, s.num_new_tokens) for s in first] == [("r0", 15), ("r1", 3), ("r2", 2)]
    done = [s.seq for s in first if s.samples]  # prompts completed this step: r0 and r1
    scheduler.after_step(first)
    for seq in done:  # pretend the model sampled one token for each
        seq.output_token_ids.append(1)
    second = scheduler.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in second] == [("r0", 1), ("r1", 1), ("r2", 1)]


def test_a_later_small_request_does_not_jump_the_queue():
    """When the head of the queue does not fit, nothing behind it is admitted (no starvation of big prompts)."""
    blocks = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=10, max_num_batched_tokens=100), blocks)
    scheduler.add(make_seq("running", 8))
    scheduler.after_step(scheduler.schedule())  # holds 2 of 4 blocks
    scheduler.add(make_seq("big", 12))  # needs 3 blocks: does not fit while "running" holds 2
    scheduler.add(make_seq("small", 2))  # would fit, but arrived later
    scheduled = scheduler.schedule()
    assert "small" not in [s.seq.request_id for s in scheduled]
    assert [s.request_id for s in scheduler.waiting] == ["big", "small"]


def test_a_waiting_sequence_holds_no_blocks_and_its_lookup_counts_once():
    """The head of the queue finds its prefix cached but cannot be admitted: it gives the blocks back
    (held, they could be what a running sequence needs) and is counted once, when it is admitted."""
    blocks = BlockManager(num_blocks=6, block_size=4)
    cache_prompt(blocks, list(range(1, 9)))  # 2 cached blocks
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=10, max_num_batched_tokens=100), blocks)
    big = make_seq("big", 16)  # 4 blocks, runs first
    scheduler.add(big)
    scheduler.after_step(scheduler.schedule())
    queries = blocks.prefix_queries  # big's own lookup (one miss)
    shared = Sequence("shared", 0, list(range(1, 9)) + [50, 51, 52, 53, 54], SamplingParams(max_tokens=4), None)
    scheduler.add(shared)  # 13 tokens = 4 blocks: 2 cached + 2 fresh, but only 2 are free (the cached ones)
    for _ in range(3):
        assert [s.seq.request_id for s in scheduler.schedule()] == ["big"]
        assert shared.block_table == [] and shared.num_computed == 0
        assert blocks.num_free == 2 and (blocks.prefix_queries, blocks.prefix_hits) == (queries, 0)
    scheduler.finish(big, "stop")
    assert [(s.seq.request_id, s.num_new_tokens) for s in scheduler.schedule()] == [("shared", 5)]
    assert (blocks.prefix_queries - queries, blocks.prefix_hits) == (3, 2)  # 2 found, the third missed


# --- bounded token latency: the prefill budget while sequences decode ---------------------------------

def _run_step(scheduler: Scheduler, clock: list[float] | None = None, cost=(0.0, 0.0)) -> list:
    """One step: schedule, (advance the fake clock by a + b * tokens), sample a token for each row that samples."""
    scheduled = scheduler.schedule()
    if clock is not None:
        clock[0] += cost[0] + cost[1] * sum(s.num_new_tokens for s in scheduled)
    sampled = [s.seq for s in scheduled if s.samples]
    scheduler.after_step(scheduled)
    for seq in sampled:
        seq.output_token_ids.append(1)
    return scheduled


def _decoding(scheduler: Scheduler, n: int) -> list[Sequence]:
    seqs = [make_seq(f"d{i}", 8) for i in range(n)]
    for seq in seqs:
        scheduler.add(seq)
    _run_step(scheduler)  # their prompts: from now on they decode
    assert all(seq.output_token_ids for seq in seqs)
    return seqs


@pytest.mark.parametrize("cap", [32, None])
def test_a_long_prompt_holds_no_decode_back_more_than_the_prefill_budget(cap):
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_prefill_tokens=cap,
                                          prefill_step_ratio=None), BlockManager(200, 16))
    decoders = _decoding(scheduler, 4)
    long = make_seq("long", 400)
    scheduler.add(long)
    steps = 0
    while not long.output_token_ids:
        scheduled = _run_step(scheduler)
        steps += 1
        by_id = {s.seq.request_id: s.num_new_tokens for s in scheduled}
        # every decoding stream gets its next token in every step ...
        assert all(by_id.get(d.request_id) == 1 for d in decoders)
        # ... and waits for at most the budget's worth of prompt tokens
        if cap is not None:
            assert by_id["long"] <= cap
    if cap is None:
        assert steps == 1  # uncapped, the whole prompt rides in one step (the stall the budget prevents)
    else:
        assert steps == -(-400 // cap)  # and the prompt still moves at the budget's pace


def test_the_budget_applies_only_while_something_decodes():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_prefill_tokens=32,
                                          prefill_step_ratio=None), BlockManager(200, 16))
    scheduler.add(make_seq("alone", 300))
    assert [s.num_new_tokens for s in scheduler.schedule()] == [300]  # nobody waits on this step
    assert scheduler.last_prefill_budget is None


def test_step_cost_model_recovers_a_linear_cost():
    model = StepCostModel()
    for tokens in [8, 64, 8, 8, 200, 9, 40] * 3:
        model.observe(tokens, 0.05 + 0.002 * tokens)
    assert model.ready
    assert model.a == pytest.approx(0.05, rel=1e-6) and model.b == pytest.approx(0.002, rel=1e-6)
    # 8 decodes: 0.066 s alone; twice that leaves room for 0.066 / 0.002 = 33 prompt tokens
    assert model.prefill_budget(8, 2.0) == 33


def test_adaptive_budget_keeps_a_step_with_prefill_near_ratio_times_a_decode_step():
    """Measured step times (a fake clock: a + b * tokens seconds a step) set the cap: a step that
    carries prompt tokens while 8 streams decode takes at most 2x a decode-only step."""
    a, b, ratio = 0.1, 0.002, 2.0
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, prefill_step_ratio=ratio),
                          BlockManager(400, 16))
    clock = [0.0]
    scheduler.clock = lambda: clock[0]
    for i in range(8):
        scheduler.add(make_seq(f"d{i}", 8 + i))
    _run_step(scheduler, clock, (a, b))
    for _ in range(4):  # decode-only steps: the model now has two step sizes
        _run_step(scheduler, clock, (a, b))
    long = make_seq("long", 1000)
    scheduler.add(long)
    decode_only = a + b * 8
    chunks = []
    while not long.output_token_ids:
        before = clock[0]
        scheduled = _run_step(scheduler, clock, (a, b))
        chunks.append(next(s.num_new_tokens for s in scheduled if s.seq is long))
        assert clock[0] - before <= ratio * decode_only + 1e-9
    # (2 - 1) * 0.116 s / 0.002 s per token = 58 prompt tokens a step: the prompt moves as fast as the bound allows
    assert max(chunks) in (57, 58) and len(chunks) == -(-1000 // max(chunks))


def test_the_adaptive_budget_never_stops_a_prompt():
    """However slow prompt tokens are, a step carries at least min_prefill_tokens of them."""
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, prefill_step_ratio=1.1),
                          BlockManager(400, 16))
    clock = [0.0]
    scheduler.clock = lambda: clock[0]
    for i in range(4):
        scheduler.add(make_seq(f"d{i}", 8 + i))
    for _ in range(5):
        _run_step(scheduler, clock, (0.0, 0.1))
    long = make_seq("long", 100)
    scheduler.add(long)
    scheduled = _run_step(scheduler, clock, (0.0, 0.1))
    assert scheduler.last_prefill_budget == 16  # 0.1 * 4 decodes' time = 0 tokens: the floor
    assert next(s.num_new_tokens for s in scheduled if s.seq is long) == 16


def _warm_cost_model(scheduler: Scheduler, clock: list[float], cost: tuple[float, float], decoders: int) -> None:
    for i in range(decoders):
        scheduler.add(make_seq(f"d{i}", 8 + i))
    for _ in range(5):  # the prompts, then decode-only steps: the model has two step sizes
        _run_step(scheduler, clock, cost)
    assert scheduler.cost.ready


def _prefill_burst(drain_steps: int | None) -> tuple[int, float, list[int]]:
    """31 prompts of 64 tokens queued behind one decoding stream: (steps, seconds, prompt tokens per
    step) until every one has its first token, on a fake clock of 0.09 s + 4 ms a token."""
    a, b = 0.09, 0.004
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512, prefill_step_ratio=2.0,
                                          prefill_drain_steps=drain_steps), BlockManager(800, 16))
    clock = [0.0]
    scheduler.clock = lambda: clock[0]
    _warm_cost_model(scheduler, clock, (a, b), decoders=1)
    burst = [make_seq(f"b{i}", 64) for i in range(31)]
    for seq in burst:
        scheduler.add(seq)
    start, chunks = clock[0], []
    while not all(seq.output_token_ids for seq in burst):
        scheduled = _run_step(scheduler, clock, (a, b))
        assert any(s.seq.request_id == "d0" and s.num_new_tokens == 1 for s in scheduled)  # the stream decodes on
        chunks.append(sum(s.num_new_tokens for s in scheduled if s.seq in burst))
    return len(chunks), clock[0] - start, chunks


def test_a_burst_of_waiting_prompts_lifts_the_ratio_cap():
    """With more requests waiting than streams decoding, a step carries 1/prefill_drain_steps of the
    pending prompt tokens (the ratio alone allows ~(a + b) / b = 23 behind one stream), so the
    burst is prefilled in less than half the steps; without the lift it trickles in."""
    steps, seconds, chunks = _prefill_burst(drain_steps=4)
    assert chunks[0] == -(-31 * 64 // 4)  # 1984 pending tokens / 4 = 496 (of the 511 the step has room for)
    ratio_steps, ratio_seconds, ratio_chunks = _prefill_burst(drain_steps=None)
    assert max(ratio_chunks) < 100 < chunks[0]
    assert steps < ratio_steps / 2 and seconds < 0.8 * ratio_seconds  # fewer steps, each paying a = 0.09 s


def test_a_long_prompt_behind_fewer_streams_keeps_the_ratio_cap():
    """One request waiting (a long prompt) while 8 stream decode is no crowd: the ratio holds."""
    a, b = 0.1, 0.002
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, prefill_step_ratio=2.0,
                                          prefill_drain_steps=4), BlockManager(400, 16))
    clock = [0.0]
    scheduler.clock = lambda: clock[0]
    _warm_cost_model(scheduler, clock, (a, b), decoders=8)
    long = make_seq("long", 1000)
    scheduler.add(long)
    decode_only = a + b * 8
    while not long.output_token_ids:
        before = clock[0]
        _run_step(scheduler, clock, (a, b))
        assert clock[0] - before <= 2.0 * decode_only + 1e-9
