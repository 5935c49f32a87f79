"""The Qwen2 model family: Qwen2Model and its four heads, with transformers' call signatures.

`model(input_ids [B, S], attention_mask=None, position_ids=None)` returns what transformers
returns: hidden states [B, S, E] (Qwen2Model), logits [B, S, V] (causal LM), [B, num_labels]
(sequence classification, pooled at the last non-padding token), [B, S, num_labels] (token
classification) or start/end logits [B, S] each (question answering).

The serving engine uses `forward_tokens(token_ids [T], positions [T], batch)` instead: flattened
tokens of many sequences, with an `AttentionBatch` that knows the paged KV cache. For the one-shot
tasks each class owns its pooling: `pooled(input_ids [B, S], attention_mask [B, S]) -> list` gives
one plain-Python result per row (probabilities, per-token probabilities, start/end logits, or,
on Qwen2Model, an embedding), which is what the engine ships to the ingress. The decoder is
tensor-parallel through the layers in parallel.py; with the default `ParallelContext` it is the
plain single-process model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen2Config
from .kernels import add_rms_norm
from .layers import DenseAttention, Qwen2RMSNorm, RotaryEmbedding, apply_rotary_qk
from .parallel import (SINGLE, ColumnParallelLinear, ParallelContext, ParallelLMHead, ReplicatedLinear,
                       RowParallelLinear, VocabParallelEmbedding)


def check_tp_split(config: Qwen2Config, tp: int) -> None:
    """Fail early, naming the numbers, when the heads cannot be split over `tp` ranks."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide num_attention_heads {heads}")
    if tp <= kv_heads and kv_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide num_key_value_heads {kv_heads}")
    if tp > kv_heads and tp % kv_heads:
        raise ValueError(f"tensor_parallel_size {tp} is above num_key_value_heads {kv_heads} "
                         f"but not a multiple of it, so KV heads cannot be replicated evenly")
    if config.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide intermediate_size {config.intermediate_size}")
    from .quantization import check_quantized_tp_split
    check_quantized_tp_split(config, tp)  # GPTQ/AWQ: packing and group boundaries


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int, ctx: ParallelContext, dtype):
        super().__init__()
        tp = ctx.world_size
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp  # local query heads
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)  # local KV heads (replicated if tp > kv)
        self.scale = self.head_dim ** -0.5
        self.sliding_window = config.layer_sliding_window(layer_idx)
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        kv_replicas = max(1, tp // config.num_key_value_heads)
        # q, k, v stacked in one column-parallel weight: one matmul instead of three.
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=True,
                                             ctx=ctx, shard_replicas={"q": 1, "k": kv_replicas, "v": kv_replicas}, dtype=dtype)
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, ctx=ctx, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D] local heads
        q_len, kv_len = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qk = apply_rotary_qk(qkv[:, :q_len + kv_len].view(T, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # [T, Hq, D], [T, Hkv, D]
        v = qkv[:, q_len + kv_len:].reshape(T, self.num_kv_heads, self.head_dim)
        out = batch.attend(self.layer_idx, q, k, v, self.sliding_window, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(T, q_len))


class Qwen2MLP(nn.Module):
    def __init__(self, config: Qwen2Config, ctx: ParallelContext, dtype):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {"gate": inter, "up": inter}, bias=False,
                                                 ctx=ctx, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, ctx=ctx, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, inter/tp] each
        return self.down_proj(F.silu(gate).mul_(up))  # in place: one [T, inter/tp] temporary, not two


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int, ctx: ParallelContext, dtype):
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx, ctx, dtype)
        self.mlp = Qwen2MLP(config, ctx, dtype)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device="meta")
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device="meta")

    def forward(self, x, residual, cos, sin, batch):
        """x: the previous layer's MLP output (the embeddings for layer 0, with residual None);
        residual: the residual stream before it. Returns (this layer's MLP output, residual stream).
        The residual adds happen in place inside the norms (kernels.add_rms_norm): the same sums,
        with no new [T, E] tensor per add."""
        h, residual = add_rms_norm(x, residual, self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
        h = self.self_attn(h, cos, sin, batch)
        h, residual = add_rms_norm(h, residual, self.post_attention_layernorm.weight,
                                   self.post_attention_layernorm.variance_epsilon)
        return self.mlp(h), residual


class Qwen2Model(nn.Module):
    """The decoder: embeddings, layers, final norm. Returns last hidden states."""

    base_prefix = "model"

    def __init__(self, config: Qwen2Config, ctx: ParallelContext = SINGLE, dtype=torch.float32,
                 attn_backend: str = "sdpa"):
        super().__init__()
        check_tp_split(config, ctx.world_size)
        self.config = config
        self.ctx = ctx
        self.attn_backend = attn_backend
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx, dtype)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i, ctx, dtype) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device="meta")
        self.rotary_emb = RotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward_tokens(self, token_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """token_ids, positions: [T] -> hidden [T, E]."""
        x = self.embed_tokens(token_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)  # [T, D]
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, batch)
        return add_rms_norm(x, residual, self.norm.weight, self.norm.variance_epsilon)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] -> last hidden states [B, S, E]. Positions default to 0..S-1 as in transformers."""
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention
        batch = DenseAttention(B, S, attention_mask, backend=self.attn_backend, causal=self.config.is_causal)
        hidden = self.forward_tokens(input_ids.reshape(-1), position_ids.reshape(-1), batch)
        return hidden.view(B, S, -1)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last",
               normalize: bool = True) -> list[list[float]]:
        """Right-padded batch -> one embedding per row: the last real token's hidden state, or the
        mean over real tokens; L2-normalized unless asked not to."""
        hidden = self(input_ids, attention_mask).float()  # [B, S, E]
        if pooling == "mean":
            pooled = (hidden * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        elif pooling == "last":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            pooled = hidden[rows, last_token_index(input_ids, None, attention_mask)]  # [B, E]
        else:
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled.tolist()


class _Qwen2Head(nn.Module):
    """A decoder (under `base_prefix`, the checkpoints' name for it) plus a head built by `_head`."""

    base_prefix = "model"

    def __init__(self, config: Qwen2Config, ctx: ParallelContext = SINGLE, dtype=torch.float32, attn_backend="sdpa"):
        super().__init__()
        self.config = config
        setattr(self, self.base_prefix, Qwen2Model(config, ctx, dtype, attn_backend))
        self._head(config, dtype)

    def _head(self, config: Qwen2Config, dtype) -> None:
        raise NotImplementedError

    @property
    def decoder(self) -> Qwen2Model:
        return self._modules[self.base_prefix]


class Qwen2ForCausalLM(_Qwen2Head):
    def _head(self, config: Qwen2Config, dtype) -> None:
        self.lm_head = ParallelLMHead(self.model.embed_tokens, tied=config.tie_word_embeddings, dtype=dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, E] -> logits [N, vocab] (gathered over tensor-parallel ranks)."""
        return self.lm_head(hidden)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        return self.compute_logits(self.model(input_ids, attention_mask, position_ids))  # [B, S, V]


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B] index of the last non-padding token; handles left and right padding (as transformers)."""
    B, S = input_ids.shape
    positions = torch.arange(S, device=input_ids.device)
    if pad_token_id is not None:
        real = input_ids != pad_token_id
    elif attention_mask is not None:
        real = attention_mask.bool()
    else:
        return torch.full((B,), S - 1, device=input_ids.device, dtype=torch.long)
    return (positions * real).argmax(-1)


class Qwen2ForSequenceClassification(_Qwen2Head):
    def _head(self, config: Qwen2Config, dtype) -> None:
        self.score = ReplicatedLinear(config.hidden_size, config.num_labels, bias=False, dtype=dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        if self.config.pad_token_id is None and attention_mask is None and input_ids.shape[0] != 1:
            raise ValueError("batches of more than one sequence need pad_token_id in config.json or an attention_mask")
        return self._logits(input_ids, attention_mask, position_ids, self.config.pad_token_id)

    def _logits(self, input_ids, attention_mask, position_ids, pad_token_id) -> torch.Tensor:
        hidden = self.model(input_ids, attention_mask, position_ids)  # [B, S, E]
        last = last_token_index(input_ids, pad_token_id, attention_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, E]
        return self.score(pooled)  # [B, num_labels]

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[float]]:
        """Label probabilities per row, from the last token the mask keeps (the padding id may be a real token)."""
        return self._logits(input_ids, attention_mask, None, None).float().softmax(-1).tolist()


class Qwen2ForTokenClassification(_Qwen2Head):
    def _head(self, config: Qwen2Config, dtype) -> None:
        bias = config.extra.get("token_classification_bias", True)
        self.score = ReplicatedLinear(config.hidden_size, config.num_labels, bias=bias, dtype=dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        return self.score(self.model(input_ids, attention_mask, position_ids))  # [B, S, num_labels]

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[list[float]]]:
        """Label probabilities of every real token of every row."""
        probs = self(input_ids, attention_mask).float().softmax(-1)  # [B, S, C]
        return [probs[i, :n].tolist() for i, n in enumerate(attention_mask.sum(1).tolist())]


class QAOutput(NamedTuple):
    start_logits: torch.Tensor  # [B, S]
    end_logits: torch.Tensor  # [B, S]


class Qwen2ForQuestionAnswering(_Qwen2Head):
    base_prefix = "transformer"  # Qwen2 QA checkpoints name the decoder `transformer.`

    def _head(self, config: Qwen2Config, dtype) -> None:
        self.qa_outputs = ReplicatedLinear(config.hidden_size, 2, bias=True, dtype=dtype)

    @property
    def model(self) -> Qwen2Model:
        return self.transformer

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> QAOutput:
        logits = self.qa_outputs(self.transformer(input_ids, attention_mask, position_ids))  # [B, S, 2]
        start, end = logits.unbind(-1)
        return QAOutput(start.contiguous(), end.contiguous())

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[list[float], list[float]]]:
        """(start logits, end logits) over every real token of every row."""
        out = self(input_ids, attention_mask)
        return [(out.start_logits[i, :n].float().tolist(), out.end_logits[i, :n].float().tolist())
                for i, n in enumerate(attention_mask.sum(1).tolist())]


MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "Qwen2Model": Qwen2Model,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
    "Qwen2ForTokenClassification": Qwen2ForTokenClassification,
    "Qwen2ForQuestionAnswering": Qwen2ForQuestionAnswering,
}


def base_model(model: nn.Module) -> Qwen2Model:
    """The decoder inside any of the classes (for embeddings and the engine)."""
    return model if isinstance(model, Qwen2Model) else model.decoder
