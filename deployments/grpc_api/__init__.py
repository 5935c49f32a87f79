"""The gRPC servicer (servicer.py: the Qwen2Serve RPCs and grpc.health.v1 on the Ingress) and its
proto conversion (convert.py)."""
