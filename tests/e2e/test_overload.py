"""Overload: a full queue is refused fast, over HTTP and gRPC, while the replica is busy generating.

The generate Router is reconfigured live to a small batch and queue (max_num_seqs 2, max_waiting 2),
filled with long streaming generations (2 running, 2 waiting), and then hit by sustained load:
BURST clients sending ROUNDS short requests each, back to back. Every one must be refused with 429 +
Retry-After + the OpenAI error body (HTTP) or RESOURCE_EXHAUSTED with retry-after metadata (gRPC).
The rejection latency (client side, send to answer) is printed next to the latency of GET /health
under the same load (what the Serve proxy and the ingress cost by themselves): the target is p99
under 50 ms (issue 16), reported here, not asserted (the 2-core CI box is shared; timings belong in
benchmarks). One refusal first teaches the views (the Router decides it); then most are decided in
Serve's proxy (deployments/admission.py: header / trailing metadata `x-qwen2-refused-by: proxy`),
without any Ray call, and about one per hold goes on to the ingress and the Router to find out
whether the queue still is full. Asserted: every request is refused as the contract says, and the
proxy decided some of them (the view works); printed: where they were decided and the latencies.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import statistics
import threading
import time
import urllib.parse
from dataclasses import dataclass

import grpc
import httpx
import pytest

from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc

BURST = 20  # concurrent clients
ROUNDS = 5  # requests per client, back to back
LONG_TOKENS = 1000  # the context is 1024: these outlast the burst by far


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


@pytest.fixture()
def busy_router(serve_app):
    """The generate Router with 2 running + 2 waiting long generations; restored afterwards."""
    router = serve_app.router(serve_app.generate_model)
    old = router.info.remote().result(timeout_s=30)["config"]
    router.reconfigure.remote({"max_num_seqs": 2, "max_waiting": 2}).result(timeout_s=30)
    results: list = []
    stop = threading.Event()

    def long_stream(i: int):
        body = {"model": serve_app.generate_model, "prompt": f"story {i}", "max_tokens": LONG_TOKENS,
                "ignore_eos": True, "stream": True}
        tokens = 0
        with httpx.Client(timeout=300) as c, c.stream("POST", serve_app.http_url + "/v1/completions", json=body,
                                                      headers=serve_app.headers) as r:
            for line in r.iter_lines():
                if stop.is_set():
                    break
                if line.startswith("data: {"):
                    tokens += 1
        results.append((r.status_code, tokens))

    threads = [threading.Thread(target=long_stream, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    deadline = time.time() + 60
    while True:
        stats = serve_app.router_stats(serve_app.generate_model)
        if stats["running"] == 2 and stats["waiting"] == 2:
            break
        assert time.time() < deadline, f"could not fill the queue: {stats}"
        time.sleep(0.1)
    try:
        yield stats
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        router.reconfigure.remote({"max_num_seqs": old["max_num_seqs"],
                                   "max_waiting": old["max_waiting"]}).result(timeout_s=30)


def burst(open_client, n: int = BURST, rounds: int = ROUNDS) -> list[tuple[float, object]]:
    """n clients in threads, each with its own connection: `open_client()` -> (call, close) opens
    and warms it before the start line; then `call()` `rounds` times back to back ->
    [(seconds, result)]. A lean client (one keep-alive connection per thread, http.client / a
    gRPC channel each) so the figures measure the server more than the client's own contention."""
    barrier = threading.Barrier(n)

    def client(i):
        call, close = open_client()
        try:
            barrier.wait()
            out = []
            for _ in range(rounds):
                t = time.perf_counter()
                result = call()
                out.append((time.perf_counter() - t, result))
            return out
        finally:
            close()

    with cf.ThreadPoolExecutor(n) as pool:
        return [x for per_client in pool.map(client, range(n)) for x in per_client]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_client(serve_app, method: str, path: str, body: dict | None = None):
    """An `open_client` for `burst`: one http.client connection, warmed with GET /health."""
    def open_client():
        url = urllib.parse.urlsplit(serve_app.http_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("GET", "/health")
        conn.getresponse().read()
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **serve_app.headers}

        def call() -> Answer:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        return call, conn.close
    return open_client


def summary(latencies: list[float]) -> str:
    ms = [x * 1e3 for x in latencies]
    return f"p50 {statistics.median(ms):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms"


def report(name: str, results: list[tuple[float, bool]], reference: list[float]) -> None:
    """results: (seconds, decided in the proxy)."""
    in_proxy = [lat for lat, p in results if p]
    behind = [lat for lat, p in results if not p]
    print(f"\n{name}: {len(results)} rejections while busy: {summary([lat for lat, _ in results])}; "
          f"{len(in_proxy)} decided in the proxy ({summary(in_proxy) if in_proxy else '-'}), {len(behind)} "
          f"behind it ({summary(behind) if behind else '-'}); GET /health under the same load: {summary(reference)}")
    assert in_proxy, "no queue-full was decided in Serve's proxy (deployments/admission.py)"


def health_reference(serve_app) -> list[float]:
    return [lat for lat, _ in burst(http_client(serve_app, "GET", "/health"))]


def test_http_queue_full_is_a_fast_429(serve_app, busy_router):
    body = {"model": serve_app.generate_model, "prompt": "Hello", "max_tokens": 4}
    with httpx.Client(base_url=serve_app.http_url, headers=serve_app.headers, timeout=60) as c:
        assert c.post("/v1/completions", json=body).status_code == 429  # teaches the views
    results = burst(http_client(serve_app, "POST", "/v1/completions", body))
    for _, r in results:
        assert r.status == 429, r.body
        assert r.headers["retry-after"] == "1"
        error = json.loads(r.body)["error"]
        assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
    report("HTTP 429", [(lat, r.headers.get("x-qwen2-refused-by") == "proxy") for lat, r in results],
           health_reference(serve_app))
    stats = serve_app.router_stats(serve_app.generate_model)
    assert stats["running"] == 2 and stats["waiting"] == 2  # the burst left nothing behind


def test_grpc_queue_full_is_a_fast_resource_exhausted(serve_app, busy_router):
    md = (("authorization", f"Bearer {serve_app.api_key}"),)
    req = pb.GenerateRequest(model=serve_app.generate_model, prompt="Hello", max_tokens=4)

    def open_client():
        ch = grpc.insecure_channel(serve_app.grpc_target)
        stub = pb_grpc.Qwen2ServeStub(ch)
        stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30)

        def call():
            try:
                stub.Generate(req, metadata=md, timeout=60)
                return None
            except grpc.RpcError as e:
                return e
        return call, ch.close

    call, close = open_client()
    assert call() is not None  # teaches the views
    close()
    results = burst(open_client)
    for _, e in results:
        assert e is not None and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        assert dict(e.trailing_metadata() or ()).get("retry-after") == "1"
    report("gRPC RESOURCE_EXHAUSTED",
           [(lat, dict(e.trailing_metadata() or ()).get("x-qwen2-refused-by") == "proxy") for lat, e in results],
           health_reference(serve_app))
