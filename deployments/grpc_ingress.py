"""gRPC ingress: the Qwen2Serve service's methods on the ingress deployment, behind Serve's gRPC proxy.

(Being written: the methods land here as `GrpcIngressMixin`, which deployments/app.py mixes into the
ingress deployment.)
"""


class GrpcIngressMixin:
    """RPC methods named as in protos/qwen2_serve/v1/qwen2_serve.proto; they use `self.frontend`."""
