"""The serving engine: paged KV cache, continuous batching, sampling, executors. Token ids in and out;
no tokenizer, no Ray.
"""
