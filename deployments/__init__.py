"""deployments: everything distributed or networked: Ray actors, Serve deployments, HTTP and gRPC ingress,
metrics, the CLI and the typed gRPC client. Depends on qwen2_model, never the other way round.
"""
