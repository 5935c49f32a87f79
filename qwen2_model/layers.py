"""Qwen2's building blocks: RMSNorm, rotary embeddings, and the attention backends.

The math follows transformers' modeling_qwen2.py. Layers work on *flattened* tokens ([T, ...],
all sequences of a batch concatenated) so that the serving engine can mix prefill chunks and
decodes in one step; how attention reaches the other tokens of a sequence is the job of an
`AttentionBatch`:

- `DenseAttention`: a padded [B, S] batch with no cache (transformers-style forward, classification).
- the engine's paged KV-cache batch (qwen2_model/engine/kv_cache.py) implements the same `attend`.

Backends: torch SDPA (default, CPU and GPU) or flash-attn (CUDA, when installed). `pick_backend`
chooses and logs; `QWEN2_ATTENTION_BACKEND=sdpa|flash` or the `attn_backend` argument overrides.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen2Config

logger = logging.getLogger(__name__)


class Qwen2RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 like transformers."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def load(self, param: str, shard_id, tensor) -> None:
        from .parallel import _check_shape, shape_of
        _check_shape(param, shape_of(tensor), tuple(self.weight.shape))
        self.weight.data.copy_(tensor[:] if not isinstance(tensor, torch.Tensor) else tensor)

    def expected_shards(self):
        return {("weight", None)}


# --- rotary embeddings ----------------------------------------------------------------------------

def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [D/2]


def _yarn_inv_freq(config: Qwen2Config, dim: int) -> tuple[torch.Tensor, float]:
    scaling = config.rope_scaling
    base, factor = config.rope_theta, scaling["factor"]
    original_max = scaling.get("original_max_position_embeddings") or config.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 interpolates
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for non-interleaved (half-split) RoPE, from rope_theta and rope_scaling."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.dim = config.head_dim
        self.rope_type = config.rope_type
        self.attention_scaling = 1.0
        if self.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(config, self.dim)
        else:
            inv_freq = _default_inv_freq(config.rope_theta, self.dim)
            if self.rope_type == "linear":
                inv_freq = inv_freq / config.rope_scaling["factor"]
        self.inv_freq = inv_freq  # [D/2] float32; a plain attribute, moved with `to_device`
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype -> cos, sin [N, D]

    def to_device(self, device) -> None:
        self.inv_freq = self.inv_freq.to(device)
        self._tables.clear()

    def _table(self, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..size-1 (at least), built once and grown by doubling."""
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] < size:
            n = max(1024, 1 << (size - 1).bit_length())
            table = self._compute(torch.arange(n, device=self.inv_freq.device), self.inv_freq, dtype)
            self._tables[dtype] = table
        return table

    def _inv_freq_for(self, max_position: int) -> torch.Tensor:
        if self.rope_type != "dynamic" or max_position + 1 <= self.config.max_position_embeddings:
            return self.inv_freq
        # Dynamic NTK: stretch the base once the sequence outgrows the trained length.
        factor, max_pos = self.config.rope_scaling["factor"], self.config.max_position_embeddings
        seq_len = max_position + 1
        base = self.config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return _default_inv_freq(base, self.dim).to(self.inv_freq.device)

    def _compute(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[..., None] * inv_freq  # [..., D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., D]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., D] for `positions` [...]."""
        if self.rope_type == "dynamic" or positions.device.type != "cpu" or not positions.numel():
            # dynamic NTK depends on the batch's longest position; on GPUs the max() would sync
            max_position = int(positions.max()) if self.rope_type == "dynamic" and positions.numel() else 0
            return self._compute(positions, self._inv_freq_for(max_position), dtype)
        # A table row is the same expression on the same float inputs, so the values are identical
        # bit for bit; the step gathers its rows instead of recomputing cos/sin (two ops, not six).
        cos, sin = self._table(int(positions.max()) + 1, dtype)
        return cos[positions], sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [T, Hq, D], k: [T, Hkv, D], cos/sin: [T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rotary_qk(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k heads at once: qk [T, Hq + Hkv, D] (a view into the fused qkv output) -> a new
    contiguous [T, Hq + Hkv, D]. The same expression as `apply_rotary`, so the same values, in half the ops."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D]
    return qk * cos + rotate_half(qk) * sin


# --- attention backends ---------------------------------------------------------------------------

def flash_attn_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(requested: str | None = None, device: torch.device | str = "cpu") -> str:
    """'flash' when asked for or (auto) on CUDA with flash-attn installed; else 'sdpa'. Logged."""
    requested = (requested or os.environ.get("QWEN2_ATTENTION_BACKEND") or "auto").lower()
    if requested not in ("auto", "sdpa", "flash"):
        raise ValueError(f"attn_backend must be 'auto', 'sdpa' or 'flash', got {requested!r}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "flash" and not (on_cuda and flash_attn_available()):
        raise ValueError("attn_backend='flash' needs a CUDA device and the flash-attn package (pip install 'qwen2-serve[gpu]')")
    backend = "flash" if requested == "flash" or (requested == "auto" and on_cuda and flash_attn_available()) else "sdpa"
    logger.info("attention backend: %s (requested %s, device %s)", backend, requested, device)
    return backend


class AttentionBatch(Protocol):
    """How the tokens of one forward pass attend to each other (and to cached tokens)."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sliding_window: int | None, scale: float) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens -> [T, Hq, D]."""
        ...


def causal_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool mask [..., Sq, Sk]: key visible iff k <= q and (no window or k > q - window)."""
    q_pos, k_pos = q_pos[..., :, None], k_pos[..., None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    return visible


class DenseAttention:
    """A padded [B, S] batch attending within itself (no KV cache), like transformers' forward.

    `key_padding_mask` [B, S] (1 = real token) hides padding keys. `causal=False` (bidirectional
    embedding models, config `is_causal: false`): every token sees every real token of its sequence. A query row that would see no
    key at all (a left-padding position) is allowed to see itself, so SDPA never produces NaN
    that could leak through 0 * NaN; those rows' outputs are padding and are never read.
    """

    def __init__(self, batch: int, seq: int, key_padding_mask: torch.Tensor | None, backend: str = "sdpa",
                 causal: bool = True):
        self.batch, self.seq = batch, seq
        self.causal = causal
        self.key_padding_mask = key_padding_mask
        self.backend = backend
        self._masks: dict[int | None, torch.Tensor] = {}

    def _mask(self, window: int | None, device) -> torch.Tensor:
        if window not in self._masks:
            pos = torch.arange(self.seq, device=device)
            mask = causal_window_mask(pos, pos, window)[None] if self.causal else \
                torch.ones(1, self.seq, self.seq, dtype=torch.bool, device=device)  # [1, S, S]
            if self.key_padding_mask is not None:
                mask = mask & self.key_padding_mask.bool()[:, None, :]  # [B, S, S]
                mask = mask | torch.eye(self.seq, dtype=torch.bool, device=device)[None]
            self._masks[window] = mask[:, None]  # [B|1, 1, S, S]
        return self._masks[window]

    def attend(self, layer_idx, q, k, v, sliding_window, scale):
        B, S = self.batch, self.seq
        if self.backend == "flash" and self.key_padding_mask is None:
            from flash_attn import flash_attn_func
            window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
            out = flash_attn_func(q.view(B, S, *q.shape[1:]), k.view(B, S, *k.shape[1:]), v.view(B, S, *v.shape[1:]),
                                  softmax_scale=scale, causal=self.causal, window_size=window)
            return out.reshape(B * S, *q.shape[1:])
        qb = q.view(B, S, *q.shape[1:]).transpose(1, 2)  # [B, Hq, S, D]
        kb = k.view(B, S, *k.shape[1:]).transpose(1, 2)  # [B, Hkv, S, D]
        vb = v.view(B, S, *v.shape[1:]).transpose(1, 2)
        if not self.causal and self.key_padding_mask is None:
            out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=kb.shape[1] != qb.shape[1])
        elif self.key_padding_mask is None and (sliding_window is None or sliding_window >= S):
            # No padding, no window in reach: SDPA's causal kernel, no mask, KV heads not expanded.
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                                 enable_gqa=kb.shape[1] != qb.shape[1])
        else:
            out = sdpa(qb, kb, vb, self._mask(sliding_window, q.device), scale)  # [B, Hq, S, D]
        return out.transpose(1, 2).reshape(B * S, *q.shape[1:])


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Grouped-query SDPA. q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D]; mask bool, True = visible."""
    if k.shape[1] != q.shape[1]:
        # Expand KV heads to the query heads (a view, then one copy) rather than `enable_gqa`,
        # which takes a slow path on CPU for bool masks.
        groups = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(k.shape[0], q.shape[1], *k.shape[2:])
        v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(v.shape[0], q.shape[1], *v.shape[2:])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
