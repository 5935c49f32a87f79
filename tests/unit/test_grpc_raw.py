"""deployments/grpc_api/raw.py in Serve's own gRPC server: a client cancel always cancels the replica call.

gRPC delivers a client's cancel by cancelling the task that serves the RPC. When that task is
awaiting gRPC's send of a message (not Serve's `ProxyResponseGenerator.__anext__`), Serve 2.60 never
cancels its call to the replica. These tests register our service on Serve's real
`gRPCGenericServer` (which wraps every handler with its `service_handler_factory`, as in the proxy),
drive the resulting handler the way grpc.aio does (iterate, await a send per message) and cancel
the task during a send. The replica call is a stand-in `DeploymentResponseGenerator` that records
`cancel()`.
"""

from __future__ import annotations

import asyncio
import unittest.mock

import grpc
import pytest

pytest.importorskip("ray.serve._private.grpc_util")
from ray.serve._private.grpc_util import gRPCGenericServer  # noqa: E402
from ray.serve._private.proxy_response_generator import ProxyResponseGenerator  # noqa: E402
from ray.serve.handle import DeploymentResponseGenerator  # noqa: E402

from deployments.grpc_api import raw  # noqa: E402


class FakeReplicaCall(DeploymentResponseGenerator):
    """A replica stream of `n` messages (None: endless) that records whether it was cancelled."""

    def __init__(self, n: int | None):  # noqa: D107 (no Serve state needed)
        self.n, self.sent, self._cancelled = n, 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self._cancelled:
            raise asyncio.CancelledError()
        if self.n is not None and self.sent >= self.n:
            raise StopAsyncIteration
        self.sent += 1
        return f"message {self.sent}"

    def cancel(self):
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled


def serve_factory(calls: list, n: int | None):
    """Like gRPCProxy.service_handler_factory: a unary_stream handler relaying one replica call
    through a ProxyResponseGenerator (and, like Serve's, turning every exception into a status)."""
    def factory(service_method, streaming_type):
        async def unary_stream(request, context):
            call = FakeReplicaCall(n)
            calls.append(call)
            try:
                async for message in ProxyResponseGenerator(call):
                    yield message
            except BaseException:
                return

        async def unary(request, context):
            call = FakeReplicaCall(1)
            calls.append(call)
            return await ProxyResponseGenerator(call).__anext__()
        return unary_stream if streaming_type.name == "UNARY_STREAM" else unary
    return factory


def make_server(calls: list, n: int | None, with_raw: bool) -> gRPCGenericServer:
    server = gRPCGenericServer(serve_factory(calls, n))
    if with_raw:
        raw.add_Qwen2ServeServicer_to_server(unittest.mock.Mock(), server)  # as Serve does
    else:  # Serve's own path for the same method, without raw.py's task tracking
        raw.cancel_with_the_rpc()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            raw.SERVICE_NAME, {"GenerateStream": grpc.unary_stream_rpc_method_handler(None)}),))
    return server


def generate_stream_handler(server: gRPCGenericServer):
    for handlers in server.generic_rpc_handlers:
        for method, h in handlers[0]._method_handlers.items():
            if method.endswith("/GenerateStream"):
                return h.unary_stream
    raise AssertionError("GenerateStream not registered")


class FakeContext:
    """The parts of grpc.aio's ServicerContext the proxy-side code reads."""

    def __init__(self, metadata=()):
        self.metadata = tuple(metadata)

    def invocation_metadata(self):
        return self.metadata

    def trailing_metadata(self):
        return ()

    def code(self):
        return None

    def details(self):
        return ""


async def serve_rpc(handler, sent: list, sending: asyncio.Event, hang_at: int | None):
    """What grpc.aio does with a unary_stream handler: write each message, awaiting the write;
    the write of message `hang_at` never completes (the client cancels during it)."""
    async for message in handler(b"", FakeContext()):
        sent.append(message)
        if len(sent) == hang_at:
            sending.set()
            await asyncio.Event().wait()
        await asyncio.sleep(0)


async def cancel_during_send(with_raw: bool) -> FakeReplicaCall:
    calls: list = []
    handler = generate_stream_handler(make_server(calls, None, with_raw))
    sent: list = []
    sending = asyncio.Event()
    task = asyncio.create_task(serve_rpc(handler, sent, sending, hang_at=2))
    await asyncio.wait([task, asyncio.create_task(sending.wait())], return_when=asyncio.FIRST_COMPLETED)
    assert not task.done(), task.exception()
    task.cancel()  # the client's cancel lands while the proxy writes message 2
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # done callbacks run
    return calls[-1]


def test_cancel_during_a_send_cancels_the_replica_call():
    call = asyncio.run(cancel_during_send(with_raw=True))
    assert call.sent >= 2 and call.cancelled()


def test_serve_alone_loses_that_cancel():
    """The loss being mended: the same cancel through Serve's handler without raw.py's tracking."""
    call = asyncio.run(cancel_during_send(with_raw=False))
    assert call.sent >= 2 and not call.cancelled()


def test_a_finished_stream_is_not_cancelled():
    async def main():
        calls: list = []
        handler = generate_stream_handler(make_server(calls, 3, with_raw=True))
        sent: list = []
        await asyncio.create_task(serve_rpc(handler, sent, asyncio.Event(), hang_at=None))
        await asyncio.sleep(0)
        return calls[-1], sent

    call, sent = asyncio.run(main())
    assert sent == ["message 1", "message 2", "message 3"] and not call.cancelled()
