"""The Executor interface between the engine and wherever the model runs, and the in-process one.

The engine calls `execute(StepInput) -> StepOutput` once per step and `run_pooled` for the one-shot
heads. `LocalExecutor` runs a ModelRunner in this process (tp=1); the Ray worker group in
deployments/workers.py implements the same methods over tensor-parallel actors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..config import Qwen2Config
from ..loading import from_pretrained
from .paged_attention import PagedKVCache
from .model_runner import ModelRunner, PooledInput, StepInput, StepOutput
from .structured_output import GrammarBackend


class Executor(Protocol):
    config: Qwen2Config
    architecture: str
    num_kv_blocks: int
    block_size: int

    def execute(self, step: StepInput) -> StepOutput: ...
    def run_pooled(self, req: PooledInput) -> list: ...
    # LoRA: read the adapter at `path` into `slot` (slots made on first use); LoraError if it cannot apply
    def load_lora(self, slot: int, path: str, max_loras: int, max_rank: int, name: str | None = None) -> None: ...
    def shutdown(self) -> None: ...


def kv_blocks_for_budget(config: Qwen2Config, kv_cache_memory: int, block_size: int, dtype: torch.dtype,
                         tp: int = 1, device: str | torch.device = "cpu", gpu_memory_fraction: float = 0.0) -> int:
    """How many blocks fit: `kv_cache_memory` bytes or, on CUDA with `gpu_memory_fraction` set, that
    fraction of the GPU memory still free after the weights loaded (it then takes precedence)."""
    if gpu_memory_fraction and not 0 < gpu_memory_fraction <= 1:
        raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction}")
    kv_heads = max(1, config.num_key_value_heads // tp)
    per_block = PagedKVCache.bytes_per_block(config.num_hidden_layers, block_size, kv_heads, config.head_dim, dtype)
    budget = kv_cache_memory
    if gpu_memory_fraction and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = int(free * gpu_memory_fraction)
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(f"kv_cache_memory {budget} bytes holds no KV block ({per_block} bytes per block of "
                         f"{block_size} tokens)")
    return int(blocks)


class LocalExecutor:
    """The whole model in this process. dtype None or "auto": the fast dtype for this hardware (hardware.py)."""

    def __init__(self, model_path: str | Path, dtype: str | None = "auto", device: str = "cpu",
                 kv_cache_memory: int = 256 << 20, block_size: int = 16, gpu_memory_fraction: float = 0.0,
                 attn_backend: str | None = None, tokenizer_path: str | Path | None = None,
                 quantization: str | None = None, hf_overrides: dict | None = None, quant_kernel: str = "auto"):
        """`tokenizer_path`: the checkpoint's tokenizer, for structured output (None: no structured output).
        `quantization` ("int8"), `hf_overrides` (config.json fields), `quant_kernel`: see loading.from_pretrained."""
        self.model = from_pretrained(model_path, dtype=dtype or "auto", device=device, attn_backend=attn_backend,
                                     quantization=quantization, hf_overrides=hf_overrides, quant_kernel=quant_kernel)
        self.dtype_choice = self.model.dtype_choice  # compute dtype and why (shown in /v1/models)
        self.config = self.model.config
        self.architecture = type(self.model).__name__
        self.block_size = block_size
        self.num_kv_blocks = 0
        if self.architecture == "Qwen2ForCausalLM":
            self.num_kv_blocks = kv_blocks_for_budget(self.config, kv_cache_memory, block_size,
                                                      self.model.model.dtype, 1, device, gpu_memory_fraction)
        self.grammar = None
        if tokenizer_path is not None and self.architecture == "Qwen2ForCausalLM":
            self.grammar = GrammarBackend.from_pretrained(tokenizer_path, self.config.vocab_size,
                                                          self.config.eos_token_ids)
        self.runner = ModelRunner(self.model, self.config.eos_token_ids, self.num_kv_blocks, block_size,
                                  grammar=self.grammar)

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)

    def run_pooled(self, req: PooledInput) -> list:
        return self.runner.run_pooled(req)

    def load_lora(self, slot: int, path: str, max_loras: int, max_rank: int, name: str | None = None) -> None:
        self.runner.load_lora(slot, path, max_loras, max_rank, name)

    def shutdown(self) -> None:
        self.runner = None
        if self.grammar is not None:
            self.grammar.shutdown()
