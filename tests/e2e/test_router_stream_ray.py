"""`router_stream: ray` served: a second Serve application on the session's Ray whose Ingress takes the
Router's token stream as Ray streaming objects (Serve's default) instead of over Serve's gRPC (ours,
which every other e2e test uses). Shown with a real HTTP client through Serve's proxy: a streamed greedy
completion is token for token what the main app gives for the same checkpoint and prompt, and a client
that leaves mid-stream gets its request aborted on the Router (counted as aborted, nothing left
running)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

APP = "raystream"
MODEL = "raystream-gen"
PROMPT = [5, 17, 29, 3, 11, 40, 8]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def ray_stream_app(serve_app):
    from ray import serve

    args = {"request_timeout_s": 120, "router_stream": "ray", "models": [{
        "name": MODEL, "path": str(serve_app.checkpoints[serve_app.generate_model]), "kv_cache_memory": 4 << 20,
        "torch_threads": 1, "engine": {"max_model_len": 256}}]}
    yield serve_app.run_app(APP, args)
    serve.delete(APP)


def _body(model: str, **kw) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **kw}


def _stream_texts(url: str, headers: dict, model: str, stop_after: int | None = None, **kw) -> list[str]:
    texts = []
    with httpx.stream("POST", f"{url}/v1/completions", json=_body(model, stream=True, **kw), headers=headers,
                      timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            texts += [c["text"] for c in chunk["choices"]]
            if stop_after is not None and len(texts) >= stop_after:
                break  # leave mid-stream: the connection closes with the `with`
    return texts


def test_a_streamed_completion_over_ray_objects_equals_the_grpc_streamed_one(serve_app, ray_stream_app):
    reference = httpx.post(f"{serve_app.http_url}/v1/completions", json=_body(serve_app.generate_model),
                           headers=serve_app.headers, timeout=120)
    assert reference.status_code == 200, reference.text
    assert reference.json()["usage"]["completion_tokens"] == MAX_TOKENS
    texts = _stream_texts(ray_stream_app, {}, MODEL)
    assert len(texts) > 1  # it did stream
    assert "".join(texts) == reference.json()["choices"][0]["text"]


def test_leaving_mid_stream_aborts_the_request_on_the_router(ray_stream_app):
    from ray import serve

    router = serve.get_deployment_handle(f"router-{MODEL}", app_name=APP)
    before = router.stats.remote().result(timeout_s=30)
    long = 240  # far more than the two chunks read (max_model_len 256)
    assert len(_stream_texts(ray_stream_app, {}, MODEL, stop_after=2, max_tokens=long)) == 2
    deadline = time.time() + 30
    while True:
        st = router.stats.remote().result(timeout_s=30)
        if st["finished"].get("abort", 0) > before["finished"].get("abort", 0):
            break
        assert time.time() < deadline, f"the abandoned request was not aborted on the Router: {st}"
        time.sleep(0.2)
    assert st["running"] == 0 and st["waiting"] == 0
    assert st["generated_tokens"] - before["generated_tokens"] < long  # it stopped before max_tokens
