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

It also mends a lost cancellation in that proxy (`cancel_abandoned_streams`): Ray Serve 2.60's proxy
cancels its call to the replica only when a client's cancel lands while it awaits the next
message; a cancel that lands while it hands a message to gRPC closes the outer handler generator
and abandons the inner ones, whose `ProxyResponseGenerator` is never cancelled, so the replica
generated to max_tokens for nobody. Here a `ProxyResponseGenerator` that is garbage-collected before
it finished cancels its replica call (which aborts the request in our engine). This narrows the
loss, not closes it: the abandoned chain may only be collected by Python's cyclic GC, after the
generation ended (tests/e2e/test_grpc_cancel.py prints how many cancels still ran on).
"""

from __future__ import annotations

import grpc

from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb

SERVICE_NAME = "qwen2_serve.v1.Qwen2Serve"


def cancel_abandoned_streams() -> bool:
    """Make Serve's ProxyResponseGenerator cancel its replica call when dropped unfinished.

    Returns whether the patch is in place (False on a Ray without that class: nothing changes)."""
    try:
        from ray.serve._private.proxy_response_generator import ProxyResponseGenerator
    except ImportError:
        return False
    if getattr(ProxyResponseGenerator, "_qwen2_cancels_when_dropped", False):
        return True

    def __del__(self):  # noqa: N807
        try:
            response = getattr(self, "_response", None)
            if response is not None and not getattr(self, "_done", True) and not response.cancelled():
                response.cancel()  # the client is gone: stop the replica's generation
        except Exception:  # noqa: BLE001  (never raise from a finalizer)
            pass

    ProxyResponseGenerator.__del__ = __del__
    ProxyResponseGenerator._qwen2_cancels_when_dropped = True
    return True


def add_Qwen2ServeServicer_to_server(servicer, server) -> None:  # noqa: N802 (the generated name)
    cancel_abandoned_streams()  # runs in Serve's proxy process, before it serves any call
    service = pb.DESCRIPTOR.services_by_name["Qwen2Serve"]
    handlers = {}
    for method in service.methods:
        response = getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=None,
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
