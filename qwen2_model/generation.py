"""A simple KV-cached greedy generation loop, one sequence at a time.

The reference path for tests and the one-process CLI check: a contiguous per-layer cache, no
paging, no batching. The serving engine (qwen2_model/engine/) is what serves traffic.
"""

from __future__ import annotations

import torch

from .layers import causal_window_mask, sdpa
from .modeling import Qwen2ForCausalLM


class ContiguousKVCache:
    """One sequence's K/V per layer, grown by concatenation: [Hkv, L, D] each."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def attend(self, layer_idx, q, k, v, sliding_window, scale):
        # q: [T, Hq, D]; k, v: [T, Hkv, D] for the T new tokens
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, D]
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=1)
            v = torch.cat([self.values[layer_idx], v], dim=1)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        T, L = q.shape[0], k.shape[1]
        q_pos = torch.arange(L - T, L, device=q.device)
        mask = causal_window_mask(q_pos, torch.arange(L, device=q.device), sliding_window)  # [T, L]
        out = sdpa(q.transpose(0, 1)[None], k[None], v[None], mask[None, None], scale)  # [1, Hq, T, D]
        return out[0].transpose(0, 1)


@torch.inference_mode()
def greedy_generate(model: Qwen2ForCausalLM, prompt_ids: list[int], max_new_tokens: int,
                    eos_token_ids: list[int] | None = None) -> list[int]:
    """Greedy decode with a KV cache; returns the generated ids (stops early at an EOS id)."""
    device = model.lm_head.weight.device
    cache = ContiguousKVCache(model.config.num_hidden_layers)
    tokens = torch.tensor(prompt_ids, device=device)
    positions = torch.arange(len(prompt_ids), device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model.model.forward_tokens(tokens, positions, cache)  # [T, E]
        next_id = int(model.compute_logits(hidden[-1:]).argmax(-1))
        out.append(next_id)
        if eos_token_ids and next_id in eos_token_ids:
            break
        start = int(positions[-1]) + 1
        tokens = torch.tensor([next_id], device=device)
        positions = torch.tensor([start], device=device)
    return out
