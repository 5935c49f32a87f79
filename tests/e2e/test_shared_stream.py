"""The shared token stream served (deployments/token_streams.py, on by default): concurrent HTTP and
gRPC streams to one model come from the Router as one message per engine step, and each client gets
exactly the text it gets alone. (Cancellation on the shared stream: tests/e2e/test_stream_cancel.py and
test_router_stream_ray.py, whose later requests ride it; failures: tests/unit/test_shared_stream.py.)"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from deployments.client import Qwen2ServeClient

PROMPTS = [[5, 17, 29, 3], [11, 40, 8], [2, 9, 33, 71, 4], [100, 3, 250]]
MAX_TOKENS = 16


def _body(model: str, prompt: list[int], seed: int, **kw) -> dict:
    # Seeded sampling, not greedy: the demo model's greedy text soon repeats one token for any prompt,
    # and a seed of its own gives each request a text of its own, the same alone or batched.
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": seed,
            "ignore_eos": True, **kw}


def _streamed_text(serve_app, prompt: list[int], seed: int) -> str:
    texts = []
    with httpx.stream("POST", f"{serve_app.http_url}/v1/completions", json=_body(serve_app.generate_model, prompt,
                      seed, stream=True), headers=serve_app.headers, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                texts += [c["text"] for c in json.loads(line[len("data: "):])["choices"]]
    return "".join(texts)


def _grpc_streamed_text(serve_app, prompt: list[int], seed: int) -> str:
    with Qwen2ServeClient(serve_app.grpc_target, api_key=serve_app.api_key, timeout=120) as client:
        stream = client.generate_stream(prompt, serve_app.generate_model, max_tokens=MAX_TOKENS, temperature=1.0,
                                        seed=seed, ignore_eos=True)
        return "".join(m.text for m in stream)


def test_concurrent_streams_come_as_one_message_a_step_and_each_gets_its_own_text(serve_app):
    model = serve_app.generate_model
    alone = [_streamed_text(serve_app, p, seed) for seed, p in enumerate(PROMPTS)]  # the first also opens the shared stream
    assert len(set(alone)) == len(PROMPTS)  # different texts: outputs handed to the wrong request would show
    before = serve_app.router_stats(model)
    # Half over HTTP, half over gRPC: both ingresses' handlers share the Ingress's one stream.
    calls = [(_streamed_text if seed % 2 else _grpc_streamed_text, p, seed) for seed, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda c: c[0](serve_app, c[1], c[2]), calls))
    after = serve_app.router_stats(model)
    assert together == alone
    tokens = after["shared_stream_tokens"] - before["shared_stream_tokens"]
    outputs = after["shared_stream_outputs"] - before["shared_stream_outputs"]
    batches = after["shared_stream_batches"] - before["shared_stream_batches"]
    # Every token of the four rode the shared stream (an output may carry two when a rider fell a
    # step behind: AsyncEngine coalesces them).
    assert tokens == len(PROMPTS) * MAX_TOKENS
    assert batches < outputs  # and a message carried several requests' tokens
    assert after["shared_streams"] == 1  # one per ingress replica, not one per request
