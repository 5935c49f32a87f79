"""qwen2_serve.v1: generated stubs (protos/generate.py); do not edit them by hand."""
