"""Prometheus metrics end to end: known traffic in, Ray's scrape endpoint read over HTTP and parsed
with prometheus_client's parser; counters must move by exactly the expected amounts and the
histograms must get samples (deployments/metrics.py, README.md "Metrics").

Traffic on the shared app (tests/e2e/conftest.py `serve_app`): N completions with known token
counts (ignore_eos + max_tokens) over HTTP (non-streamed and streamed) and gRPC (unary and
streamed), two of them sharing a long prompt (prefix-cache hits), one classification, one invalid
request. Ray exports metrics periodically (every second in the fixture), so the test first waits
for the counters to settle (earlier tests' traffic), then polls until the expected deltas appear.
"""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.metrics import BY_NAME, SPECS
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

MAX_TOKENS = 6
LONG_PROMPT = " ".join(f"word{i}" for i in range(40))  # > 2 KV blocks of 16 tokens: prefix-cache hits on reuse
WAIT_S = 60


def exported(name: str, suffix: str = "") -> str:
    return BY_NAME[name].exported + suffix


def scrape(url: str) -> list:
    text = httpx.get(url, timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list, sample_name: str, **labels: str) -> float:
    """Sum over every series (replicas, deployments) of `sample_name` whose labels match."""
    return sum(s.value for s in samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def snapshot(samples: list, watched: dict[str, tuple[str, dict]]) -> dict[str, float]:
    return {key: value(samples, name, **labels) for key, (name, labels) in watched.items()}


def settle(url: str, watched: dict, quiet_s: float = 3.0, limit_s: float = WAIT_S) -> dict[str, float]:
    """The watched values once they stopped changing for `quiet_s` (earlier traffic fully exported)."""
    deadline = time.time() + limit_s
    last, since = snapshot(scrape(url), watched), time.time()
    while time.time() < deadline:
        time.sleep(0.5)
        now = snapshot(scrape(url), watched)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet_s:
            return now
    raise AssertionError(f"metrics did not settle within {limit_s} s: {last}")


def test_metrics_scrape(serve_app):
    url, gen, cls = serve_app.metrics_url, serve_app.generate_model, serve_app.classify_model
    assert url, "the serve_app fixture must export metrics"

    counters = {
        "length": (exported("qwen2_requests"), {"model": gen, "finish_reason": "length"}),
        "gen_tokens": (exported("qwen2_generation_tokens"), {"model": gen}),
        "prompt_tokens": (exported("qwen2_prompt_tokens"), {"model": gen}),
        "invalid": (exported("qwen2_errors"), {"model": gen, "code": "invalid_request"}),
        "pooled": (exported("qwen2_requests"), {"model": cls, "finish_reason": "pooled"}),
        "cls_prompt_tokens": (exported("qwen2_prompt_tokens"), {"model": cls}),
        "prefix_hits": (exported("qwen2_prefix_cache_hits"), {"model": gen}),
        "prefix_queries": (exported("qwen2_prefix_cache_queries"), {"model": gen}),
    }
    counts = {name: (exported(name, "_count"), {"model": gen}) for name in (
        "qwen2_time_to_first_token_seconds", "qwen2_inter_token_latency_seconds",
        "qwen2_e2e_request_latency_seconds", "qwen2_request_prompt_tokens", "qwen2_request_generation_tokens",
        "qwen2_request_queue_time_seconds", "qwen2_prefill_step_seconds", "qwen2_decode_step_seconds",
        "qwen2_batch_size_sequences", "qwen2_batch_size_tokens")}
    counts["cls_e2e"] = (exported("qwen2_e2e_request_latency_seconds", "_count"), {"model": cls})
    watched = {**counters, **counts}
    before = settle(url, watched)

    # --- known traffic -------------------------------------------------------------------------
    prompt_tokens = 0
    sampling = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=serve_app.http_url, headers=serve_app.headers, timeout=60) as http:
        for prompt in (LONG_PROMPT, LONG_PROMPT, "The quick brown fox"):  # HTTP, not streamed
            r = http.post("/v1/completions", json={"model": gen, "prompt": prompt, **sampling})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["completion_tokens"] == MAX_TOKENS
            assert body["choices"][0]["finish_reason"] == "length"
            prompt_tokens += body["usage"]["prompt_tokens"]
        # HTTP, streamed (chat), usage in the last chunk
        usage = None
        with http.stream("POST", "/v1/chat/completions", json={
                "model": gen, "messages": [{"role": "user", "content": "Hello there"}], "stream": True,
                "stream_options": {"include_usage": True}, **sampling}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage") or usage
        assert usage and usage["completion_tokens"] == MAX_TOKENS, usage
        prompt_tokens += usage["prompt_tokens"]

        # one classification
        r = http.post("/v1/classify", json={"model": cls, "input": "a fine day"})
        assert r.status_code == 200, r.text
        cls_tokens = r.json()["usage"]["prompt_tokens"]
        assert cls_tokens > 0

        # one invalid request (names the served model, fails in validation: 400 invalid_request)
        r = http.post("/v1/completions", json={"model": gen, "prompt": "", "max_tokens": 3})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text

    with grpc.insecure_channel(serve_app.grpc_target) as channel:  # gRPC, unary and streamed
        stub = pb_grpc.Qwen2ServeStub(channel)
        md = (("authorization", f"Bearer {serve_app.api_key}"),)
        req = pb.GenerateRequest(model=gen, prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0,
                                 ignore_eos=True)
        resp = stub.Generate(req, metadata=md, timeout=60)
        assert resp.usage.completion_tokens == MAX_TOKENS
        prompt_tokens += resp.usage.prompt_tokens
        msgs = list(stub.GenerateStream(req, metadata=md, timeout=60))
        assert msgs[-1].usage.completion_tokens == MAX_TOKENS
        prompt_tokens += msgs[-1].usage.prompt_tokens
    n = 6  # completions sent: 3 + 1 over HTTP, 2 over gRPC

    expected = {
        "length": n, "gen_tokens": n * MAX_TOKENS, "prompt_tokens": prompt_tokens, "invalid": 1,
        "pooled": 1, "cls_prompt_tokens": cls_tokens,
        # one per request (per choice / sequence for the queue time)
        "qwen2_time_to_first_token_seconds": n, "qwen2_e2e_request_latency_seconds": n,
        "qwen2_request_prompt_tokens": n, "qwen2_request_generation_tokens": n,
        "qwen2_request_queue_time_seconds": n, "cls_e2e": 1,
        "qwen2_inter_token_latency_seconds": n * (MAX_TOKENS - 1),
    }
    at_least = {"prefix_hits": 2, "prefix_queries": 2, "qwen2_prefill_step_seconds": 1,
                "qwen2_decode_step_seconds": 1, "qwen2_batch_size_sequences": 1,
                "qwen2_batch_size_tokens": 1}

    def deltas() -> dict[str, float]:
        now = snapshot(scrape(url), watched)
        return {k: now[k] - before[k] for k in watched}

    deadline = time.time() + WAIT_S
    while True:
        d = deltas()
        done = all(d[k] >= v for k, v in expected.items()) and all(d[k] >= v for k, v in at_least.items())
        if done or time.time() > deadline:
            break
        time.sleep(0.5)
    time.sleep(2.5)  # one more export period: nothing may come on top of the exact amounts
    d = deltas()
    assert {k: d[k] for k in expected} == {k: float(v) for k, v in expected.items()}
    for k, v in at_least.items():
        assert d[k] >= v, (k, d[k], v)
    # Every step carries a batch (sequences and tokens) and is either a prefill or a decode step.
    steps = d["qwen2_prefill_step_seconds"] + d["qwen2_decode_step_seconds"]
    assert d["qwen2_batch_size_sequences"] == d["qwen2_batch_size_tokens"] == steps


def test_every_metric_is_exported_with_model_label(serve_app):
    """After traffic, every defined metric is in the scrape (gauges included), labelled by model."""
    url, gen = serve_app.metrics_url, serve_app.generate_model
    with httpx.Client(base_url=serve_app.http_url, headers=serve_app.headers, timeout=60) as http:
        for _ in range(2):  # the second one hits the prefix cache
            r = http.post("/v1/completions", json={"model": gen, "prompt": LONG_PROMPT, "max_tokens": 2})
            assert r.status_code == 200
        assert http.post("/v1/classify", json={"model": serve_app.classify_model, "input": "x"}).status_code == 200
        assert http.post("/v1/completions", json={"model": gen, "prompt": ""}).status_code == 400
    deadline = time.time() + WAIT_S
    while True:
        samples = scrape(url)
        names = {s.name for s in samples if "model" in s.labels}
        missing = [s.name for s in SPECS if not set(s.series) & names
                   and s.name not in ("qwen2_preemptions",)]  # only after the KV cache ran out
        if not missing or time.time() > deadline:
            break
        time.sleep(1)
    assert not missing, missing
    alive = [s for s in samples if s.name == exported("qwen2_tp_workers_alive")]
    assert alive and all(s.value == 1 for s in alive), alive  # tp=1 everywhere
    kv = [s.value for s in samples if s.name == exported("qwen2_kv_cache_usage_ratio") and s.labels["model"] == gen]
    assert kv and all(0.0 <= v <= 1.0 for v in kv)
    # Serve's own metrics are on the same endpoint.
    assert any(s.name.startswith("ray_serve_") for s in samples)
