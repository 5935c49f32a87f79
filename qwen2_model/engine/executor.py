"""The Executor interface between the engine and wherever the model runs, and the in-process one.

The engine calls `execute(StepInput) -> StepOutput` once per step and `run_pooled` for the one-shot
heads. `load_runner` is the one place a model is built for serving (weights, KV-cache size,
runner); `LocalExecutor` runs one in this process (tp=1), and each tensor-parallel Ray worker in
deployments/workers.py builds its rank's share with the same function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch

from ..config import Qwen2Config
from ..loading import from_pretrained
from ..modeling import base_model
from ..parallel import SINGLE, ParallelContext
from ..tasks import is_generative
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


def load_runner(model_path: str | Path, dtype: str | None = None, device: str | torch.device = "cpu",
                kv_cache_memory: int = 256 << 20, block_size: int = 16, gpu_memory_fraction: float = 0.0,
                attn_backend: str | None = None, ctx: ParallelContext = SINGLE,
                agree_blocks: Callable[[int], int] | None = None,
                tokenizer_path: str | Path | None = None, linear_kernel: str | None = "auto",
                **load_options) -> ModelRunner:
    """Load the checkpoint (this rank's share under `ctx`), size its KV cache and build its runner.

    Only a causal LM gets KV blocks (and, with `tokenizer_path`, structured output). `agree_blocks`
    lets tensor-parallel ranks settle on one count (every rank must index the same blocks: the
    smallest wins). Rank 0 is the sampling rank. `load_options`: the rest of loading.from_pretrained's
    (quantization, hf_overrides, quant_kernel). dtype None means "auto" (hardware.py's choice, logged);
    `linear_kernel`: kernels.choose_linear_kernel.
    """
    model = from_pretrained(model_path, dtype=dtype or "auto", device=device, ctx=ctx, attn_backend=attn_backend,
                            **load_options)
    blocks, grammar = 0, None
    if is_generative(type(model).__name__):
        blocks = kv_blocks_for_budget(model.config, kv_cache_memory, block_size, base_model(model).dtype,
                                      ctx.world_size, device, gpu_memory_fraction)
        if tokenizer_path is not None:
            grammar = GrammarBackend.maybe_from_pretrained(tokenizer_path, model.config.vocab_size,
                                                     model.config.eos_token_ids)
    if agree_blocks is not None:
        blocks = agree_blocks(blocks)
    return ModelRunner(model, model.config.eos_token_ids, blocks, block_size, is_sampler=(ctx.rank == 0),
                       grammar=grammar, linear_kernel=linear_kernel)


class LocalExecutor:
    """The whole model in this process. dtype None or "auto": the fast dtype for this hardware (hardware.py)."""

    def __init__(self, model_path: str | Path, dtype: str | None = "auto", device: str = "cpu",
                 kv_cache_memory: int = 256 << 20, block_size: int = 16, gpu_memory_fraction: float = 0.0,
                 attn_backend: str | None = None, tokenizer_path: str | Path | None = None,
                 quantization: str | None = None, hf_overrides: dict | None = None, quant_kernel: str = "auto",
                 linear_kernel: str | None = "auto"):
        """`tokenizer_path`: the checkpoint's tokenizer, for structured output (None: no structured output).
        `quantization` ("int8"), `hf_overrides` (config.json fields), `quant_kernel`: see loading.from_pretrained.
        `linear_kernel`: the float linears' kernel path (kernels.choose_linear_kernel)."""
        self.runner = load_runner(model_path, dtype or "auto", device, kv_cache_memory, block_size,
                                  gpu_memory_fraction, attn_backend, tokenizer_path=tokenizer_path,
                                  quantization=quantization, hf_overrides=hf_overrides, quant_kernel=quant_kernel,
                                  linear_kernel=linear_kernel)
        self.model = self.runner.model
        self.dtype_choice = self.model.dtype_choice  # compute dtype and why (shown in /v1/models)
        self.config = self.model.config
        self.architecture = type(self.model).__name__
        self.block_size = block_size
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.grammar = self.runner.grammar_backend

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
        if self.grammar is not None:
            self.grammar.shutdown()
