"""The servicer function Serve's gRPC proxy is given: Qwen2Serve's methods with raw request bytes.

The generated `add_Qwen2ServeServicer_to_server` registers each method with the request message's
`FromString` as deserializer, so Serve's proxy parses the request before anything of ours runs: a
body that does not decode (corrupt wire format, bad UTF-8 in a string field) fails inside gRPC with
UNKNOWN "Unexpected DecodeError", which we never see. This function registers the same methods
(Serve replaces the handlers with its routing, keeping the deserializer) with no deserializer, so
the proxy forwards the bytes unparsed and `GrpcIngressMixin` decodes them in the ingress replica:
undecodable bytes are INVALID_ARGUMENT like any other bad field, and the message size is checked
before the parse.

    grpc_servicer_functions: ["deployments.grpc_api.raw.add_Qwen2ServeServicer_to_server", ...]

Kept tiny (grpc and the descriptors only): Serve's proxy process imports it.

It also mends a lost cancellation in that proxy (`cancel_with_the_rpc`). Ray Serve 2.60's proxy
cancels its call to the replica only when a client's cancel lands while it awaits the replica's
next message (inside `ProxyResponseGenerator.__anext__`). gRPC delivers a client's cancel by
cancelling the task that serves the RPC, wherever that task is awaiting; when it is awaiting
gRPC's own send of a message (about one cancel in five under load), the CancelledError is raised
outside Serve's generators, which are left suspended at a `yield` and later closed without
cancelling anything, so the replica generated to max_tokens for nobody. Here every
`ProxyResponseGenerator` created while serving one of our RPCs is tied to that RPC's task: when the
task ends (cancelled, failed or done), a replica call that had not finished is cancelled, which
cancels the ingress's handler and aborts the request in the engine. This covers every way the RPC
can end, including a cancel that lands while a message is being sent.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import weakref

import grpc

from deployments import admission
from deployments.errors import BUSY
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb

SERVICE_NAME = "qwen2_serve.v1.Qwen2Serve"


# Tasks serving our RPCs in this proxy process (gRPC runs each RPC's handler in a task of its own).
_RPC_TASKS: "weakref.WeakSet[asyncio.Task]" = weakref.WeakSet()


def _cancel_if_unfinished(generator, task: asyncio.Task) -> None:
    """Done callback of an RPC's task: the replica call of an RPC that ended early is cancelled."""
    try:
        response = generator._response
        if not generator._done and not response.cancelled():
            response.cancel()  # cancels the ingress's handler, which aborts the engine request
    except Exception:  # noqa: BLE001  (a done callback must not raise)
        pass


def cancel_with_the_rpc() -> bool:
    """Make Serve's ProxyResponseGenerator cancel its replica call when the RPC's task that created
    it ends first. Only for tasks in `_RPC_TASKS` (our service's RPCs): Serve's HTTP path has its
    own disconnect detection. Returns whether the patch is in place (False on a Ray without that
    class: nothing changes)."""
    try:
        from ray.serve._private.proxy_response_generator import ProxyResponseGenerator
    except ImportError:
        return False
    if getattr(ProxyResponseGenerator, "_qwen2_cancels_with_rpc", False):
        return True
    original_init = ProxyResponseGenerator.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):  # noqa: N807
        original_init(self, *args, **kwargs)
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop
            return
        if task is not None and task in _RPC_TASKS:
            task.add_done_callback(functools.partial(_cancel_if_unfinished, self))

    ProxyResponseGenerator.__init__ = __init__
    ProxyResponseGenerator._qwen2_cancels_with_rpc = True
    return True


ADMISSION_METHODS = {f"/{SERVICE_NAME}/Generate", f"/{SERVICE_NAME}/GenerateStream"}


def _requested_model(request) -> str | None:
    try:
        return pb.GenerateRequest.FromString(bytes(request)).model
    except Exception:  # noqa: BLE001  (undecodable: the ingress answers INVALID_ARGUMENT)
        return None


def _grpc_outcome(context, admitted: bool) -> str:
    if admitted:
        return "admitted"
    if admission.grpc_outcome(context) == "full":
        return "full"
    # A stream's error reaches the proxy without trailing metadata: the code and the message say it.
    try:
        if context.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and \
                (context.details() or "").startswith(BUSY):
            return "full"
    except Exception:  # noqa: BLE001
        pass
    return "other"


_REFUSED = object()  # _check_view's answer when it has set RESOURCE_EXHAUSTED on the context


def _check_view(view, method: str, request, context):
    """Before Serve's handler: when the view says the model's queue is full, set RESOURCE_EXHAUSTED
    on the context (no exception: grpc.aio's abort path costs more) and return `_REFUSED`; else
    the caller's credential digest for learning from the answer (None: a method the view does not
    cover)."""
    if method not in ADMISSION_METHODS or view.hold_s <= 0:
        return None
    credential = admission.grpc_credential(context)
    model = _requested_model(request) if view.watching(method) else None
    if model is not None and view.refuse(method, model, credential):
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details(admission.MESSAGE)
        context.set_trailing_metadata((("retry-after", "1"), ("error-code", "queue_full"), admission.REFUSED_BY))
        return _REFUSED
    return credential


def _learn(view, method: str, request, context, credential, admitted: bool, start: float) -> None:
    if credential is None:
        return
    outcome = _grpc_outcome(context, admitted)
    if outcome == "full" or view.watching(method):
        model = _requested_model(request)
        if model is not None:
            view.answered(method, model, credential, outcome, view.clock() - start)


def _tracking_factory(factory):
    """Serve's service_handler_factory, with each RPC's task recorded in `_RPC_TASKS`, and for
    Generate / GenerateStream the proxy's admission view (deployments/admission.py) in front."""
    view = admission.GRPC_VIEW

    def make(service_method, streaming_type):
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if inspect.isasyncgenfunction(handler):
            async def stream(request, context):
                _RPC_TASKS.add(asyncio.current_task())
                start = view.clock()
                credential = _check_view(view, service_method, request, context)
                if credential is _REFUSED:
                    return
                admitted = False
                try:
                    async for message in handler(request, context):
                        if not admitted:
                            admitted = True
                            _learn(view, service_method, request, context, credential, True, start)
                        yield message
                finally:
                    if not admitted:
                        _learn(view, service_method, request, context, credential, False, start)
            return stream

        async def unary(request, context):
            _RPC_TASKS.add(asyncio.current_task())
            start = view.clock()
            credential = _check_view(view, service_method, request, context)
            if credential is _REFUSED:
                return b""
            result = await handler(request, context)
            code = context.code()
            _learn(view, service_method, request, context, credential, code in (None, grpc.StatusCode.OK), start)
            return result
        return unary
    return make


def add_Qwen2ServeServicer_to_server(servicer, server) -> None:  # noqa: N802 (the generated name)
    cancel_with_the_rpc()  # runs in Serve's proxy process, before it serves any call
    service = pb.DESCRIPTOR.services_by_name["Qwen2Serve"]
    handlers = {}
    for method in service.methods:
        response = getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=None,
                                     response_serializer=response.SerializeToString)
    # Serve's server wraps each handler with its `service_handler_factory` as it is added: for our
    # service only, that factory also records each RPC's task (cancel_with_the_rpc).
    factory = getattr(server, "service_handler_factory", None)
    if factory is not None:
        server.service_handler_factory = _tracking_factory(factory)
    try:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62
            server.add_registered_method_handlers(SERVICE_NAME, handlers)
    finally:
        if factory is not None:
            server.service_handler_factory = factory
