"""50 cancelled gRPC GenerateStream calls: every cancel reaches the engine, and nothing leaks.

Each stream asks for a long generation, reads two messages and is cancelled by the client. A cancel
aborts the request in the engine at once (finish_reason "abort" in the Router's stats). Ray Serve
2.60's gRPC proxy alone loses about one in five (a cancel landing while the proxy hands a message
to gRPC never cancels its call to the replica, so the choice ran on to max_tokens);
deployments/grpc_api/raw.py ties each replica call to the RPC's task in the proxy, so it is
cancelled however the RPC ends (docs/architecture.md "Departures"; tests/unit/test_grpc_raw.py
shows the mechanism). Asserted: all 50 were aborted in the engine, none ran on, and afterwards
nothing is running or waiting and every KV block is free. Printed: tokens and time to idle.
max_tokens is the rest of the context, so a stream could only finish on its own if its cancel
took longer than generating ~1000 tokens.
"""

from __future__ import annotations

import time

import grpc

from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc

STREAMS = 50
MAX_TOKENS = 1000  # the context is 1024


def wait_idle(serve_app, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = serve_app.router_stats(serve_app.generate_model)
        if (s["running"], s["waiting"], s["free_kv_blocks"]) == (0, 0, s["num_kv_blocks"]):
            return s
        assert time.monotonic() < deadline, f"generation left running after the cancels: {s}"
        time.sleep(0.2)


def test_fifty_cancelled_streams_leave_nothing_running(serve_app):
    before = wait_idle(serve_app, 60)
    md = (("authorization", f"Bearer {serve_app.api_key}"), ("x-request-timeout", "60"))
    req = pb.GenerateRequest(model=serve_app.generate_model, prompt="Once upon a time", max_tokens=MAX_TOKENS,
                             temperature=0, ignore_eos=True)
    start = time.monotonic()
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        stub = pb_grpc.Qwen2ServeStub(ch)
        for _ in range(STREAMS):
            call = stub.GenerateStream(req, metadata=md)
            for got, _msg in enumerate(call, 1):
                if got == 2:
                    break
            call.cancel()
    cancelled_at = time.monotonic()
    after = wait_idle(serve_app, 120)
    idle_s = time.monotonic() - cancelled_at
    aborted = after["finished"].get("abort", 0) - before["finished"].get("abort", 0)
    ran_on = after["finished"].get("length", 0) - before["finished"].get("length", 0)
    tokens = after["generated_tokens"] - before["generated_tokens"]
    print(f"\n{STREAMS} cancelled GenerateStream calls in {cancelled_at - start:.1f} s: {aborted} aborted in the "
          f"engine, {ran_on} ran on to max_tokens={MAX_TOKENS} (cancel lost); "
          f"{tokens} tokens generated in all; idle {idle_s:.1f} s after the last cancel")
    assert ran_on == 0, f"{ran_on} cancelled streams kept generating to max_tokens"
    assert aborted == STREAMS
