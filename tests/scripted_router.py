"""A scripted stand-in for a Router deployment handle, for driving the real Frontend without Ray.

It speaks the Router's typed messages: `generate.remote(request_id, prompt_ids, SamplingParams)`
streams engine `RequestOutput`s (the tokens of a fixed answer, one per step, for every choice),
`pooled.remote(task, token_ids, **kw)` returns what `pooled_results(task, token_ids)` says,
`info.remote()` answers (or fails like a dead engine), `abort.remote(...)` records the abort.
`openai_call(tokenizer, router, call)` drives the FastAPI app over such a router with the official
openai client.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from qwen2_model.engine.engine import RequestOutput
from qwen2_model.engine.sampling import SamplingParams, TokenLogprob


class Done:
    """An awaitable that is already done (what a fire-and-forget handle call returns, for the test)."""

    def __await__(self):
        return iter(())


class _Stream:
    """What `handle.options(stream=True).generate.remote(...)` returns: an async iterator with cancel()."""

    def __init__(self, agen):
        self.agen = agen

    def __aiter__(self):
        return self

    def __anext__(self):
        return self.agen.__anext__()

    def cancel(self):
        asyncio.get_running_loop().create_task(self.agen.aclose())


class _Method:
    def __init__(self, fn):
        self.remote = fn


class ScriptedRouter:
    def __init__(self, token_ids: list[int] | None = None, finish_reason: str = "stop",
                 pooled_results: Callable[[str, list[list[int]]], list] | None = None):
        self.token_ids, self.finish_reason = list(token_ids or [1]), finish_reason
        self.pooled_results = pooled_results
        self.alive = True
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self.pooled_calls: list[tuple[str, list[list[int]], dict]] = []
        self.aborts: list[tuple] = []
        self.closed = 0  # generate streams closed (finished or cancelled)
        self.handle_options: list[dict] = []  # what each .options(...) call asked for
        self.generate, self.abort = _Method(self._generate), _Method(self._abort)
        self.pooled, self.info = _Method(self._pooled), _Method(self._info)

    def options(self, stream: bool = False, _by_reference: bool = True):  # DeploymentHandle.options
        self.handle_options.append({"stream": stream, "_by_reference": _by_reference})
        return self

    def _generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        assert isinstance(params, SamplingParams)  # typed messages across the Router
        self.requests.append((list(prompt_ids), params))
        return _Stream(self._outputs(request_id, len(prompt_ids), params))

    async def _outputs(self, request_id: str, num_prompt: int, params: SamplingParams):
        try:
            for step, token in enumerate(self.token_ids):
                last = step == len(self.token_ids) - 1
                for index in range(params.n):
                    lp = None if params.logprobs is None else TokenLogprob(token, -0.5, [(token, -0.5)] * params.logprobs)
                    yield RequestOutput(request_id, index, [token], [lp], self.finish_reason if last else None,
                                        num_prompt, step + 1)
        finally:
            self.closed += 1

    def _abort(self, request_id: str, index: int | None = None):
        self.aborts.append((request_id, index))
        return Done()

    async def _pooled(self, task: str, token_ids: list[list[int]], **kw):
        self.pooled_calls.append((task, token_ids, kw))
        return self.pooled_results(task, token_ids)

    async def _info(self):
        if not self.alive:
            raise RuntimeError("engine failed")
        return {"architecture": "Qwen2ForCausalLM", "max_model_len": 4096, "num_kv_blocks": 1, "config": {}}


def openai_call(tokenizer, router: ScriptedRouter, call: Callable[[Any], Awaitable[Any]],
                frontend_kw: dict | None = None, **entry_kw):
    """Serve model "m" (a causal LM behind `router`; `frontend_kw` for the Frontend) from the FastAPI app
    in-process and return what `await call(client)` gives, `client` being the official
    `openai.AsyncOpenAI` talking to the app; a streamed result is read to the end (a list of chunks)."""
    import httpx
    import openai

    from deployments.frontend.core import Frontend, ModelEntry
    from deployments.http_api import app as http_app

    http_app.bind(Frontend([ModelEntry("m", path="", architecture="Qwen2ForCausalLM", task="generate",
                                       tokenizer=tokenizer, router=router, max_model_len=4096, **entry_kw)],
                            **(frontend_kw or {})))

    async def run():
        transport = httpx.ASGITransport(app=http_app.create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as http:
            client = openai.AsyncOpenAI(base_url="http://ingress/v1", api_key="-", http_client=http, max_retries=0)
            result = await call(client)
            if isinstance(result, openai.AsyncStream):
                return [chunk async for chunk in result]
            return result

    try:
        return asyncio.run(run())
    finally:
        http_app.bind(None)
