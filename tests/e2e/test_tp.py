"""Tensor parallelism on CPU with gloo, through real Ray actors (deployments/workers.py).

tp=2 (and tp=4, KV heads replicated) against the single-process model: logits of all four heads (and
of the process reward model, with its served step pooling)
within float tolerance, greedy generation through the engine token for token identical, on the tiny
preset and on the Qwen2-0.5B head layout (14 heads, 2 KV heads; 2 layers and a small vocabulary to
stay fast). Killing a rank mid-generation fails the step within 10 s naming the rank, and the
group can be rebuilt. Each start-up check fails with a message naming the numbers.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.workers import RayExecutor, StartupError, WorkerDiedError, router_bundles
from qwen2_model.engine.engine import Engine, EngineConfig, EngineDead
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.model_runner import PooledInput, SeqStep, StepInput
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.loading import from_pretrained
from qwen2_model.testing import write_random_checkpoint

KV = 4 << 20  # per-rank KV budget: plenty for the tests, cheap to allocate
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = {"a": [1, 2, 3, 4, 5, 6, 7], "b": [40, 41, 42], "c": list(range(100, 150))}
HEADS = ["causal_lm", "sequence_classification", "token_classification", "question_answering"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    made = {}

    def get(preset: str, head: str = "causal_lm", **overrides):
        key = (preset, head, tuple(sorted(overrides.items())))
        if key not in made:
            extra = dict(num_hidden_layers=2, vocab_size=8192) if preset == "qwen2-0.5b" else {}
            extra.update(overrides)
            made[key] = write_random_checkpoint(tmp_path_factory.mktemp(f"{preset}-{head}"), preset=preset,
                                                head=head, **extra)
        return made[key]
    return get


def executor(path, tp, **kw):
    return RayExecutor(path, tp=tp, kv_cache_memory=KV, **kw)


def assert_same_output(ours, ref, atol):
    if isinstance(ref, tuple):  # QA start/end logits
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b.float(), atol=atol, rtol=1e-4)
    else:
        torch.testing.assert_close(ours, ref.float(), atol=atol, rtol=1e-4)


def batch_for(path):
    vocab = from_pretrained(path).config.vocab_size
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (2, 9), generator=g).tolist()


@pytest.mark.parametrize("preset", ["tiny", "qwen2-0.5b"])
@pytest.mark.parametrize("head", HEADS[1:])  # causal_lm: in test_greedy_generation_matches_local
def test_tp2_logits_match_tp1(ckpts, preset, head):
    path = ckpts(preset, head)
    ref_model = from_pretrained(path)
    ids = batch_for(path)
    mask = [[1] * 9, [1] * 6 + [0] * 3]  # one right-padded row
    with torch.inference_mode():
        ref = ref_model(torch.tensor(ids), torch.tensor(mask))
    ex = executor(path, 2)
    try:
        assert ex.architecture == type(ref_model).__name__
        assert_same_output(ex.forward_logits(ids, mask), ref, atol=1e-4)
        if head == "sequence_classification":  # the serving path of a one-shot head
            req = PooledInput("classify", [ids[0], ids[1][:6]])
            local = LocalExecutor(path).run_pooled(req)
            torch.testing.assert_close(torch.tensor(ex.run_pooled(req)), torch.tensor(local), atol=1e-5, rtol=1e-4)
    finally:
        ex.shutdown()


@pytest.mark.parametrize("preset,tp", [("tiny", 2), ("tiny", 4), ("qwen2-0.5b", 2)])
def test_greedy_generation_matches_local(ckpts, preset, tp):
    """Causal-LM logits and greedy tokens; tp=4 on the tiny preset (2 KV heads) replicates each KV head."""
    path = ckpts(preset)
    config = EngineConfig(max_num_batched_tokens=32)  # prompt "c" is prefilled in two chunks
    expected = Engine(LocalExecutor(path, kv_cache_memory=KV), config).generate_all(PROMPTS, GREEDY)
    ex = executor(path, tp)
    try:
        assert ex.num_kv_blocks > 0
        ids = batch_for(path)
        with torch.inference_mode():
            ref = from_pretrained(path)(torch.tensor(ids))
        assert_same_output(ex.forward_logits(ids), ref, atol=1e-4)
        assert Engine(ex, config).generate_all(PROMPTS, GREEDY) == expected
        # Prompt logprobs come from the prefill rows' logits, all-gathered over the ranks like the sampled rows'.
        local = prompt_logprobs(Engine(LocalExecutor(path, kv_cache_memory=KV), config))
        sharded = prompt_logprobs(Engine(ex, config))
        assert [lp.token_id for lp in sharded] == PROMPTS["c"][1:]
        for a, b in zip(sharded, local):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)
    finally:
        ex.shutdown()


def prompt_logprobs(engine: Engine) -> list:
    """Prompt "c" (two prefill chunks at a 32-token budget) with prompt_logprobs=3 -> its logprobs."""
    engine.add_request("c", PROMPTS["c"], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return next(o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None)


def assert_dies_within(actor, seconds: float) -> None:
    """ray.kill is asynchronous: a ping sent right after it may still be answered, so poll until it fails."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            ray.get(actor.ping.remote(), timeout=seconds)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the actor still answers {seconds:g} s after its group was killed")
        time.sleep(0.1)


def test_killed_rank_fails_the_step_then_a_new_group_serves(ckpts):
    path = ckpts("tiny")
    long = SamplingParams(temperature=0.0, max_tokens=3000, ignore_eos=True)
    ex = executor(path, 2)
    try:
        engine = Engine(ex)
        engine.add_request("long", [1, 2, 3], long)
        for _ in range(3):
            engine.step()
        killed_at = []

        def kill_rank_1():
            killed_at.append(time.monotonic())
            ray.kill(ex.group.actors[1], no_restart=True)

        timer = threading.Timer(0.3, kill_rank_1)
        timer.start()
        with pytest.raises(EngineDead) as info:
            while engine.has_unfinished():
                engine.step()
        failed_at = time.monotonic()
        timer.join()
        assert engine.stats.generated_tokens < 3000, "the generation finished before the kill"
        cause = info.value.__cause__
        assert isinstance(cause, WorkerDiedError), repr(cause)
        assert cause.ranks == [1] and "rank 1 of 2 died" in str(cause)
        print(f"kill -> WorkerDiedError: {failed_at - killed_at[0]:.2f} s")
        assert failed_at - killed_at[0] < 10.0
        # The whole group is gone (rank 0 was stuck in a collective): later calls fail at once.
        assert not ex.alive
        with pytest.raises(WorkerDiedError, match="start a new executor"):
            ex.check_health()
        ex.shutdown()
        ex = executor(path, 2)  # what Serve does when the Router replica fails its health check
        ex.check_health()
        expected = Engine(LocalExecutor(path, kv_cache_memory=KV)).generate_all(PROMPTS, GREEDY)
        assert Engine(ex).generate_all(PROMPTS, GREEDY) == expected
        # Rank 0 stuck in a collective that rank 1 never joins, then rank 1 dies: no hang.
        group = ex.group
        step = StepInput([SeqStep(0, [1, 2, 3], 0, [0], True, GREEDY)])
        stuck = group.actors[0].execute.remote(step)
        assert not ray.wait([stuck], timeout=1.0)[0], "rank 0 finished a step alone"
        assert group.ping() == [0, 1]  # the health check is answered while a step is stuck
        ray.kill(group.actors[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1 of 2 died"):
            group.gather([stuck, group.actors[1].execute.remote(step)])
        assert time.monotonic() - start < 10.0
        assert_dies_within(group.actors[0], 10.0)  # rank 0 was killed with the group
        with pytest.raises(WorkerDiedError, match="start a new executor"):
            ex.execute(step)
    finally:
        ex.shutdown()


def test_workers_use_the_callers_placement_group(ckpts):
    """A Serve Router replica's placement group: bundle 0 for the router, 1..tp for the ranks."""
    path = ckpts("tiny")
    pg = placement_group(router_bundles(2, use_gpu=False), strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=30)

    @ray.remote(num_cpus=1)
    def router(tp):
        ex = RayExecutor(path, tp=tp, kv_cache_memory=KV)
        try:
            pid_threads = [(i["pid"], i["num_threads"]) for i in ex.worker_info()]
            return Engine(ex).generate_all({"a": PROMPTS["a"]}, GREEDY), pid_threads
        finally:
            ex.shutdown()

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    try:
        tokens, workers = ray.get(router.options(scheduling_strategy=strategy).remote(2), timeout=120)
        assert tokens == Engine(LocalExecutor(path, kv_cache_memory=KV)).generate_all({"a": PROMPTS["a"]}, GREEDY)
        assert [t for _, t in workers] == [1, 1] and len({p for p, _ in workers}) == 2
        with pytest.raises(StartupError, match="has 3 bundles; tensor_parallel_size 4 needs 5"):
            ray.get(router.options(scheduling_strategy=strategy).remote(4), timeout=60)
    finally:
        remove_placement_group(pg)


@pytest.mark.parametrize("overrides,tp,kw,message", [
    ({}, 0, {}, "tensor_parallel_size must be >= 1, got 0"),
    ({}, 3, {}, "tensor_parallel_size 3 does not divide num_attention_heads 4"),
    (dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=4), 6, {},
     "tensor_parallel_size 6 is above num_key_value_heads 4 but not a multiple of it"),
    (dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=130), 4, {},
     "tensor_parallel_size 4 does not divide intermediate_size 130"),
    (dict(num_attention_heads=8, num_key_value_heads=8), 8, {},
     "needs 8 CPUs (8 ranks x 1) but the Ray cluster has 4 CPU in total"),
    ({}, 2, dict(cpus_per_worker=3), "needs 6 CPUs (2 ranks x 3) but the Ray cluster has 4 CPU in total"),
    ({}, 2, dict(device="cuda"), "needs 2 GPUs (one per rank) but the Ray cluster has 0 GPU in total"),
])
def test_startup_checks_name_the_numbers(ckpts, overrides, tp, kw, message):
    path = ckpts("tiny", **overrides)
    with pytest.raises(StartupError) as info:
        RayExecutor(path, tp=tp, kv_cache_memory=KV, **kw)
    assert message in str(info.value)
    # Nothing was left behind: no actor, no placement group holding CPUs.
    deadline = time.monotonic() + 5
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 4
    assert not ray.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_serve_router_with_tp2_placement_group_serves_same_greedy_text(ckpts):
    """The whole path at tp=2: Serve gang-schedules the Router replica and its two TP workers in one
    STRICT_PACK placement group (app.py's placement_group_bundles); HTTP greedy text equals the
    single-process engine's."""
    import httpx
    from ray import serve

    from deployments.app import build_app
    from qwen2_model.tokenizer import Qwen2Tokenizer
    from tests.e2e.conftest import free_port

    path = ckpts("tiny", "causal_lm", vocab_size=512)  # = the trained tokenizer's size: every id decodes
    prompt = "hello world, tensor parallel"
    tokenizer = Qwen2Tokenizer.from_pretrained(path)
    prompt_ids = tokenizer.encode(prompt)
    expected_ids = Engine(LocalExecutor(path, kv_cache_memory=KV)).generate_all({"p": prompt_ids}, GREEDY)["p"][0]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"models": [{"name": "tp2", "path": str(path), "tp": 2, "kv_cache_memory": KV,
                                         "torch_threads": 1, "deployment": {"health_check_period_s": 1}}]}),
                  name="tp2-app", route_prefix="/")
        body = {"model": "tp2", "prompt": prompt, "max_tokens": GREEDY.max_tokens, "temperature": 0,
                "ignore_eos": True}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected_ids, skip_special_tokens=True)
        assert reply.json()["usage"]["completion_tokens"] == GREEDY.max_tokens
        router = serve.get_deployment_handle("router-tp2", app_name="tp2-app")
        info = router.info.remote().result(timeout_s=30)
        assert info["tp"] == 2
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
        # the Router replica's own group: its bundle plus one per TP worker, packed on one node
        assert any(len(g["bundles"]) == 3 and g["strategy"] == "STRICT_PACK" for g in groups), groups
        assert_worker_death_gives_503_then_serve_recovers(port, router, body)
    finally:
        serve.shutdown()


def assert_worker_death_gives_503_then_serve_recovers(port, router, body):
    """Kill a TP worker under a streaming request: the client gets a clear 503 (UNAVAILABLE) fast, and
    Serve's health check replaces the Router replica with a new worker group."""
    import json
    import os
    import signal

    import httpx

    before = router.stats.remote().result(timeout_s=30)
    assert len(before["tp_worker_pids"]) == 2
    url = f"http://127.0.0.1:{port}/v1/completions"
    long_body = {**body, "max_tokens": 900, "stream": True}
    with httpx.stream("POST", url, json=long_body, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # generating
        killed_at = time.monotonic()
        os.kill(before["tp_worker_pids"][1], signal.SIGKILL)
        events = [json.loads(line[5:]) for line in lines if line.startswith("data:") and "[DONE]" not in line]
    assert time.monotonic() - killed_at < 10
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == "unavailable", events[-3:]
    assert "rank 1" in errors[0]["message"], errors[0]  # names the worker that died
    deadline = time.monotonic() + 120
    while True:  # Serve's health check fails, the replica (and its worker group) is replaced
        reply = httpx.post(url, json=body, timeout=60)
        if reply.status_code == 200:
            break
        assert reply.status_code == 503, reply.text
        assert time.monotonic() < deadline, "the Router replica was not replaced"
        time.sleep(1)
    after = router.stats.remote().result(timeout_s=30)
    assert after["pid"] != before["pid"] and set(after["tp_worker_pids"]).isdisjoint(before["tp_worker_pids"])


def test_structured_output_at_tp2_matches_local(ckpts):
    """Rank 0 holds the matchers (built from the checkpoint's tokenizer); same constrained tokens as tp=1."""
    from qwen2_model.engine.structured_output import StructuredOutput

    path = ckpts("tiny")
    spec = StructuredOutput("regex", "[a-z]{3,6}-[0-9]{2}")
    params = SamplingParams(temperature=0.0, max_tokens=24, structured=spec)
    expected = Engine(LocalExecutor(path, kv_cache_memory=KV, tokenizer_path=path)).generate_all(PROMPTS, params)
    ex = executor(path, 2, tokenizer_path=path)
    try:
        assert Engine(ex).generate_all(PROMPTS, params) == expected
        assert all(len(ids[0]) < 24 for ids in expected.values())  # the grammar ended them (stop)
    finally:
        ex.shutdown()


def test_process_reward_model_at_tp2_matches_tp1(ckpts):
    """The reward heads (score = Linear, ReLU, Linear; kept whole on every rank) on the sharded decoder:
    raw scores and the served step pooling equal the single-process model."""
    path = ckpts("tiny", "process_reward_model")
    ref_model = from_pretrained(path)
    tag = ref_model.step_tag_id
    ids = [[1, 2, tag, 3, 4, 5, 6, tag, 7], [8, tag, 9, 10, 11, 12, 0, 0, 0]]
    mask = [[1] * 9, [1] * 6 + [0] * 3]
    with torch.inference_mode():
        ref = ref_model(torch.tensor(ids), torch.tensor(mask))
    ex = executor(path, 2)
    try:
        assert ex.architecture == "Qwen2ForProcessRewardModel"
        real = torch.tensor(mask).bool()
        torch.testing.assert_close(ex.forward_logits(ids, mask)[real], ref.float()[real], atol=1e-4, rtol=1e-4)
        req = PooledInput("reward", [ids[0], ids[1][:6]])
        local = LocalExecutor(path).run_pooled(req)
        served = ex.run_pooled(req)
        assert [len(r) for r in served] == [2, 1]
        for a, b in zip(served, local):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-4)
    finally:
        ex.shutdown()
