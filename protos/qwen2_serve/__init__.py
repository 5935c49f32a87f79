"""qwen2_serve proto package."""
