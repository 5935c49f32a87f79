"""Cancelled streams, over gRPC (GenerateStream) and HTTP (streaming /v1/completions), through the
Ingress's own servers (direct ingress, the CLI's default) and through Serve's proxy: every cancel
reaches the engine, nothing leaks.

Four clients at once each open streams that ask for a long generation, read two messages and cancel
(gRPC) or close the connection (HTTP). A cancel aborts the request in the engine at once
(finish_reason "abort" in the Router's stats). Two races lost cancels, so that the choice ran on to
max_tokens for nobody:
- Ray Serve 2.60's gRPC proxy alone lost about one in five (a cancel landing while the proxy hands
  a message to gRPC never cancels its call to the replica); deployments/grpc_api/raw.py ties each
  replica call to the RPC's task in the proxy (tests/unit/test_grpc_raw.py shows the mechanism).
- On any path, a cancel landing in the same loop iteration as the next token was swallowed by
  Python 3.11's asyncio.wait_for in the Frontend's per-token deadline (about one in twenty over
  gRPC through direct ingress with four clients: 4 of 80 here on that code; HTTP, 0 of 160 on
  either path, is kept as a guard); the deadline now uses asyncio.timeout
  (tests/unit/test_frontend_logic.py shows the mechanism).
Asserted: every stream was aborted in the engine, none ran on, and afterwards nothing is running
or waiting and every KV block is free. Printed: tokens and time to idle. max_tokens is the rest of
the context, so a stream could only finish on its own if its cancel took longer than generating
~1000 tokens.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc

CLIENTS = 4
STREAMS_PER_CLIENT = 20
MAX_TOKENS = 1000  # the context is 1024


def wait_idle(serve_app, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = serve_app.router_stats(serve_app.generate_model)
        if (s["running"], s["waiting"], s["free_kv_blocks"]) == (0, 0, s["num_kv_blocks"]):
            return s
        assert time.monotonic() < deadline, f"generation left running after the cancels: {s}"
        time.sleep(0.2)


def open_read_two_and_cancel(target: str, request: pb.GenerateRequest, metadata, streams: int) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.Qwen2ServeStub(ch)
        for _ in range(streams):
            call = stub.GenerateStream(request, metadata=metadata)
            for got, _msg in enumerate(call, 1):
                if got == 2:
                    break
            call.cancel()


def open_read_two_and_close(base_url: str, body: dict, headers: dict, streams: int) -> None:
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as c:
        for _ in range(streams):
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: {")
                    if seen == 2:
                        break  # leaving the block closes the connection mid-stream


@pytest.mark.parametrize("path", ["ingress", "proxy"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cancelled_streams_leave_nothing_running(serve_app, protocol, path):
    before = wait_idle(serve_app, 60)
    if protocol == "grpc":
        target = serve_app.grpc_target if path == "ingress" else serve_app.proxy_grpc_target
        md = (("authorization", f"Bearer {serve_app.api_key}"), ("x-request-timeout", "60"))
        req = pb.GenerateRequest(model=serve_app.generate_model, prompt="Once upon a time", max_tokens=MAX_TOKENS,
                                 temperature=0, ignore_eos=True)
        client, args = open_read_two_and_cancel, (target, req, md)
    else:
        target = serve_app.http_url if path == "ingress" else serve_app.proxy_http_url
        body = {"model": serve_app.generate_model, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": True}
        client, args = open_read_two_and_close, (target, body, serve_app.headers)
    start = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for f in [pool.submit(client, *args, STREAMS_PER_CLIENT) for _ in range(CLIENTS)]:
            f.result()
    cancelled_at = time.monotonic()
    after = wait_idle(serve_app, 120)
    idle_s = time.monotonic() - cancelled_at
    streams = CLIENTS * STREAMS_PER_CLIENT
    aborted = after["finished"].get("abort", 0) - before["finished"].get("abort", 0)
    ran_on = after["finished"].get("length", 0) - before["finished"].get("length", 0)
    tokens = after["generated_tokens"] - before["generated_tokens"]
    print(f"\n{streams} cancelled {protocol} streams via {target} ({path}) in {cancelled_at - start:.1f} s: "
          f"{aborted} aborted in the engine, {ran_on} ran on to max_tokens={MAX_TOKENS} (cancel lost); "
          f"{tokens} tokens generated in all; idle {idle_s:.1f} s after the last cancel")
    assert ran_on == 0, f"{ran_on} cancelled streams kept generating to max_tokens"
    assert aborted == streams
