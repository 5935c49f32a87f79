"""The shared token stream (deployments/token_streams.py) between the real Frontend and a real Router,
in-process: a step's outputs for all riding requests come as one message and the tokens are the
engine's own; a rider that leaves is aborted on the Router while the others go on; a lost stream
fails its riders with an error that says so (and frees their KV blocks); an idle stream is ended by
the Router and reopened on demand; the app arg and the CLI flag."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from deployments import token_streams
from deployments.errors import UnavailableError
from deployments.frontend.core import Frontend, ModelEntry
from deployments.frontend.requests import GenerationOptions
from deployments.router import Router
from qwen2_model.engine.engine import Engine
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.tokenizer import Qwen2Tokenizer
from tests.helpers import VARIETY_PROMPTS, assert_greedy_varies, greedy_outputs
from tests.scripted_router import Done, _Stream

MAX_TOKENS = 8


class RouterHandle:
    """A Serve handle's calls on an in-process Router: streaming calls iterate its async generators."""

    def __init__(self, router: Router):
        self.router = router
        self.vias: list[str | None] = []  # the `via` of each generate call
        self.generate = SimpleNamespace(remote=self._generate)
        self.subscribe = SimpleNamespace(remote=lambda ingress_id: _Stream(router.subscribe(ingress_id)))
        self.abort = SimpleNamespace(remote=self._abort)

    def options(self, **_):
        return self

    def _generate(self, request_id, prompt_ids, params, via=None):
        self.vias.append(via)
        return _Stream(self.router.generate(request_id, prompt_ids, params, via=via))

    def _abort(self, request_id, index=None):
        self.router.abort(request_id, index)
        return Done()


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints(num_hidden_layers=2)


@pytest.fixture(scope="module")
def expected(path):
    reference = Engine(LocalExecutor(path, kv_cache_memory=1 << 20))
    assert_greedy_varies(reference)  # so outputs handed to the wrong request would show
    return greedy_outputs(reference, max_tokens=MAX_TOKENS)


@pytest.fixture
def served(path):
    router = Router("m", str(path), kv_cache_memory=1 << 20, torch_threads=1)
    handle = RouterHandle(router)
    entry = ModelEntry("m", path=str(path), architecture="Qwen2ForCausalLM", task="generate",
                       tokenizer=Qwen2Tokenizer.from_pretrained(path), router=handle, max_model_len=512)
    yield SimpleNamespace(router=router, handle=handle, entry=entry, frontend=Frontend([entry], shared_stream=True))
    router.metrics.stop()
    router.async_engine.shutdown()


def greedy(max_tokens: int = MAX_TOKENS) -> GenerationOptions:
    return GenerationOptions(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


async def tokens_of(frontend: Frontend, entry: ModelEntry, prompt: list[int], max_tokens: int = MAX_TOKENS):
    choices, _ = await frontend.generate(entry, prompt, greedy(max_tokens))
    return choices[0].token_ids


async def open_shared(s) -> token_streams.SharedStream:
    """One request on its own call opens the shared stream; wait until the Router registered it."""
    await tokens_of(s.frontend, s.entry, VARIETY_PROMPTS[0])
    shared = s.frontend._shared["m"]
    for _ in range(500):
        if shared.up:
            return shared
        await asyncio.sleep(0.01)
    raise AssertionError("the shared stream did not come up")


def test_a_step_of_all_riders_is_one_message_and_the_tokens_are_the_engines(served, expected):
    async def scenario():
        shared = await open_shared(served)
        served.handle.vias.clear()
        got = await asyncio.gather(*[tokens_of(served.frontend, served.entry, p) for p in VARIETY_PROMPTS])
        return shared, got

    shared, got = asyncio.run(scenario())
    assert got == expected  # batched on one stream == the engine alone, request by request
    assert served.handle.vias == [shared.ingress_id] * len(VARIETY_PROMPTS)  # every request rode it
    counts = served.router.shared_stream_counts
    assert counts["tokens"] == len(VARIETY_PROMPTS) * MAX_TOKENS  # every token rode it, none lost
    assert counts["batches"] <= counts["outputs"] / 3  # several requests' outputs per message
    assert served.router.async_engine.engine.requests == {}


def test_a_rider_that_leaves_is_aborted_and_the_others_finish(served, expected):
    async def scenario():
        await open_shared(served)

        async def leave_after_two():
            agen = served.frontend.generate_stream(served.entry, VARIETY_PROMPTS[1], greedy(400),
                                                   request_id="leaver")
            deltas = [await agen.__anext__() for _ in range(2)]
            await agen.aclose()  # the client went away
            return deltas

        left, stayed = await asyncio.gather(leave_after_two(), tokens_of(served.frontend, served.entry,
                                                                         VARIETY_PROMPTS[2]))
        for _ in range(200):  # the abort reaches the engine before its next step
            if "leaver" not in served.router.async_engine.engine.requests:
                break
            await asyncio.sleep(0.01)
        return left, stayed

    left, stayed = asyncio.run(scenario())
    assert [d.token_ids for d in left] == [[t] for t in expected[1][:2]]
    assert stayed == expected[2]
    assert served.router.async_engine.engine.requests == {}  # the leaver's KV blocks are free
    assert served.router.async_engine.stats().running == 0


def test_a_lost_shared_stream_fails_its_riders_by_name_and_frees_them(served, expected):
    async def scenario():
        shared = await open_shared(served)
        riders = [asyncio.create_task(tokens_of(served.frontend, served.entry, p, max_tokens=400))
                  for p in VARIETY_PROMPTS[:3]]
        while served.router.shared_stream_counts["batches"] < 3:  # they are streaming on it
            await asyncio.sleep(0.01)
        shared._task.cancel()  # the Ingress's end of the stream breaks
        results = await asyncio.gather(*riders, return_exceptions=True)
        for _ in range(200):
            if not served.router.async_engine.engine.requests:
                break
            await asyncio.sleep(0.01)
        after = await tokens_of(served.frontend, served.entry, VARIETY_PROMPTS[3])  # served again
        return results, after

    results, after = asyncio.run(scenario())
    for r in results:
        assert isinstance(r, UnavailableError), r
        assert "shared token stream" in str(r)
    assert served.router.async_engine.engine.requests == {}  # aborted on the Router, blocks freed
    assert after == expected[3]


def test_the_router_ends_an_idle_shared_stream_and_the_ingress_reopens_it(served, expected, monkeypatch):
    monkeypatch.setattr(token_streams, "IDLE_CLOSE_S", 0.1)

    async def scenario():
        shared = await open_shared(served)
        first = shared._task
        for _ in range(300):
            if not shared.up and not served.router._shared_sinks:
                break
            await asyncio.sleep(0.01)
        ended = not shared.up and not served.router._shared_sinks and first.done()
        again = await tokens_of(served.frontend, served.entry, VARIETY_PROMPTS[4])  # on its own call
        return ended, again, shared._task is not first

    ended, again, reopened = asyncio.run(scenario())
    assert ended  # nothing rode it for IDLE_CLOSE_S: the Router let go (a draining replica is not held)
    assert again == expected[4]
    assert reopened  # the next request asked for a new one


def test_the_app_arg_and_the_cli_flag():
    from deployments.app import build_app
    from deployments.cli import app_args_for_run, build_parser

    with pytest.raises(ValueError, match="shared_stream must be true or false, got 'yes'"):
        build_app({"models": [{"name": "m", "path": "demo:causal_lm"}], "shared_stream": "yes"})

    def app_args(*flags):
        return app_args_for_run(build_parser().parse_args(["run", "--model", "demo:causal_lm", *flags]))

    assert app_args()["shared_stream"] is True
    assert app_args("--shared-stream", "off")["shared_stream"] is False
