"""Tensor-parallel context and the Megatron-style parallel linears, each owning its weight loading.

A `ParallelContext` says which rank of how many this process is and which torch.distributed group
to reduce over; world_size 1 is the same code path with no communication. The layers declare their
split next to themselves (as in vLLM): column-parallel layers keep a slice of the output rows,
row-parallel layers a slice of the input columns followed by one all-reduce, the embedding and LM
head a slice of the vocabulary. Each layer's `load(shard_id, tensor)` receives a *lazy* safetensors
slice (or a full tensor) and reads only this rank's rows/columns of it.

The matmul seam: a column/row-parallel linear holds either a float `weight` ([out_local, in_local],
`quant is None`) or a `quant` module (qwen2_model/quantization/linear.py: GPTQ/AWQ packed weights,
int8) that owns the weight and computes `x W^T (+ bias)`, set by the loader before weights are read;
the linear keeps its bias, its split and its communication. `layout()` says which rows/columns of the
checkpoint's [out, in] weight this rank keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import kernels


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None means the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()


def shape_of(tensor: Any) -> tuple[int, ...]:
    """Shape of a torch tensor or of a lazy safetensors slice."""
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


def read_rows(tensor: Any, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor or safetensors slice; only those bytes are read from disk."""
    return tensor[start:stop]


def read_cols(tensor: Any, start: int, stop: int) -> torch.Tensor:
    return tensor[:, start:stop]


class ShapeMismatch(ValueError):
    pass


def _check_shape(name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise ShapeMismatch(f"{name}: checkpoint shape {list(got)} does not match the model's {list(expected)}")


class LinearKernelMixin:
    """The matmul seam of the parallel linears: `matmul(x)` is x W^T (+ b) on whichever kernel path.

    Default: `F.linear` on the plain [out, in] weight; a `quant` object (qwen2_model/quantization)
    computes it itself. `prepack()` (kernels.py) moves the layer onto a oneDNN-packed copy of the
    weight and, unless `keep_plain`, releases the plain weight's storage: `weight` becomes a
    zero-stride view of one element, with the same shape, dtype and device for code that asks (LoRA
    sizes its slots from it) and no memory. A layer whose weight cannot be packed (quantized, another
    dtype or device, or a subclass with its own matmul) says so by returning False.
    """

    packed: torch.Tensor | None = None
    # `quant` (a QuantizedWeight, an nn.Module) is read with getattr: a class attribute here would
    # shadow nn.Module's lookup of the registered submodule.

    def prepack(self, keep_plain: bool = False) -> bool:
        w = self.weight
        if self.packed is not None or getattr(self, "quant", None) is not None or w is None or w.dim() != 2 or w.device.type != "cpu" \
                or w.dtype not in kernels.PACKABLE_DTYPES or type(self).matmul is not LinearKernelMixin.matmul:
            return False
        self.out_features_local = w.shape[0]
        self.packed = kernels.pack_weight(w)
        if not keep_plain:
            w.data = torch.zeros(1, dtype=w.dtype, device=w.device).expand(w.shape)
        return True

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        bias, quant = getattr(self, "bias", None), getattr(self, "quant", None)
        if quant is not None:
            return quant(x, bias)
        return kernels.linear(x, self.weight, bias, self.packed, getattr(self, "out_features_local", 0))


class ReplicatedLinear(nn.Linear):
    """A small linear kept whole on every rank (classification heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device="meta")

    def load(self, param: str, shard_id, tensor: Any) -> None:
        target = getattr(self, param)
        _check_shape(param, shape_of(tensor), tuple(target.shape))
        target.data.copy_(tensor[:] if not isinstance(tensor, torch.Tensor) else tensor)

    def expected_shards(self):
        return {("weight", None)} | ({("bias", None)} if self.bias is not None else set())


class ColumnParallelLinear(LinearKernelMixin, nn.Module):
    """y = x W^T + b with W's output rows split across ranks; output stays sharded.

    `sizes` lists the logical sub-matrices stacked in this one weight (q, k, v or gate, up), each
    with its own per-rank slice; `replicas` says how many ranks share one slice of a sub-matrix
    (KV heads are replicated when tp > num_key_value_heads).
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool, ctx: ParallelContext,
                 shard_replicas: dict[str, int] | None = None, dtype=None):
        super().__init__()
        self.ctx = ctx
        self.in_features = in_features
        self.shard_replicas = shard_replicas or {k: 1 for k in shard_sizes}
        # local rows of each sub-matrix, in the order they are stacked
        self.local_sizes = {}
        for shard_id, full in shard_sizes.items():
            parts = ctx.world_size // self.shard_replicas[shard_id]
            if full % parts:
                raise ValueError(f"{shard_id}: {full} output rows do not split over {parts} ranks")
            self.local_sizes[shard_id] = full // parts
        self.full_sizes = dict(shard_sizes)
        out_local = sum(self.local_sizes.values())
        self.weight = nn.Parameter(torch.empty(out_local, in_features, dtype=dtype, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local, dtype=dtype, device="meta"), requires_grad=False) if bias else None
        self.quant = None  # a QuantizedWeight that replaces `weight` (qwen2_model/quantization)

    lora = None  # LoRA delta hook (qwen2_model/lora.py): called with (x, y) after the base matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)  # [..., out_local]
        return y if self.lora is None else self.lora(x, y)

    def layout(self):
        from .quantization.linear import LinearLayout, OutputShard
        shards, offset = [], 0
        for sid, local in self.local_sizes.items():
            part = self.ctx.rank // self.shard_replicas[sid]
            shards.append(OutputShard(sid, self.full_sizes[sid], local, part * local, offset))
            offset += local
        return LinearLayout(self.in_features, self.in_features, 0, tuple(shards))

    def _offset(self, shard_id: str) -> int:
        offset = 0
        for sid, size in self.local_sizes.items():
            if sid == shard_id:
                return offset
            offset += size
        raise KeyError(shard_id)

    def load(self, param: str, shard_id: str, tensor: Any) -> None:
        if param != "bias" and self.quant is not None:
            return self.quant.load(param, shard_id, tensor)
        size = self.local_sizes[shard_id]
        full = self.full_sizes[shard_id]
        expected = (full, self.in_features) if param == "weight" else (full,)
        _check_shape(param, shape_of(tensor), expected)
        part = self.ctx.rank // self.shard_replicas[shard_id]
        offset = self._offset(shard_id)
        getattr(self, param).data[offset:offset + size].copy_(read_rows(tensor, part * size, (part + 1) * size))

    def expected_shards(self):
        params = list(_weight_params(self)[0]) + (["bias"] if self.bias is not None else [])
        return {(p, s) for p in params for s in self.local_sizes}

    def optional_shards(self):
        return {(p, s) for p in _weight_params(self)[1] for s in self.local_sizes}


class RowParallelLinear(LinearKernelMixin, nn.Module):
    """y = all_reduce(x_local W_local^T): W's input columns split across ranks."""

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, dtype=None):
        super().__init__()
        if in_features % ctx.world_size:
            raise ValueError(f"{in_features} input features do not split over {ctx.world_size} ranks")
        self.ctx = ctx
        self.in_local = in_features // ctx.world_size
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local, dtype=dtype, device="meta"), requires_grad=False)
        self.quant = None  # a QuantizedWeight that replaces `weight` (qwen2_model/quantization)

    lora = None  # LoRA delta hook (qwen2_model/lora.py): its partial delta joins the all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return self.ctx.all_reduce(y if self.lora is None else self.lora(x, y))

    def layout(self):
        from .quantization.linear import LinearLayout, OutputShard
        full_in = self.in_local * self.ctx.world_size
        return LinearLayout(full_in, self.in_local, self.ctx.rank * self.in_local,
                            (OutputShard(None, self.out_features, self.out_features, 0, 0),))

    def load(self, param: str, shard_id, tensor: Any) -> None:
        if self.quant is not None:
            return self.quant.load(param, shard_id, tensor)
        _check_shape(param, shape_of(tensor), (self.out_features, self.in_local * self.ctx.world_size))
        r = self.ctx.rank
        self.weight.data.copy_(read_cols(tensor, r * self.in_local, (r + 1) * self.in_local))

    def expected_shards(self):
        return {(p, None) for p in _weight_params(self)[0]}

    def optional_shards(self):
        return {(p, None) for p in _weight_params(self)[1]}


def _weight_params(linear) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) checkpoint names of a linear's weight: `weight`, or the quantized ones."""
    if linear.quant is not None and hasattr(linear.quant, "params"):
        return linear.quant.params()
    return ("weight",), ()


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across ranks; masked lookup + all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext, dtype=None):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.rows_per_rank = -(-vocab_size // ctx.world_size)  # ceil: the last rank may be padded
        self.start = ctx.rank * self.rows_per_rank
        self.stop = min(self.start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size, dtype=dtype, device="meta"), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.ctx.all_reduce(out)

    def load(self, param: str, shard_id, tensor: Any) -> None:
        _check_shape(param, shape_of(tensor), (self.vocab_size, self.hidden_size))
        rows = self.stop - self.start
        self.weight.data[:rows].copy_(read_rows(tensor, self.start, self.stop))
        self.weight.data[rows:].zero_()

    def expected_shards(self):
        return {("weight", None)}


class ParallelLMHead(LinearKernelMixin, nn.Module):
    """LM head over a vocab-parallel weight: local logits, gathered to the full vocabulary.

    With tied embeddings it holds no weight of its own and uses the embedding's shard.
    """

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool, dtype=None):
        super().__init__()
        self.ctx = embedding.ctx
        self.vocab_size = embedding.vocab_size
        self.tied = tied
        self.embedding = [embedding]  # a list so the module isn't registered twice
        if not tied:
            self.own = VocabParallelEmbedding(embedding.vocab_size, embedding.hidden_size, embedding.ctx, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding[0].weight if self.tied else self.own.weight

    bias = None

    def prepack(self, keep_plain: bool = False) -> bool:
        # A tied head shares the embedding table, which the lookups still read: keep it plain too.
        return super().prepack(keep_plain=keep_plain or self.tied)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(hidden)  # [N, vocab/tp]
        logits = self.ctx.all_gather_last_dim(logits)  # [N, tp * vocab/tp]
        return logits[..., : self.vocab_size]
