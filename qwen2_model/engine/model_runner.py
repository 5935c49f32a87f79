"""Runs one engine step on one (tensor-parallel rank of a) model: flat batch in, sampled token ids out.

The same class serves the in-process executor and each Ray worker (deployments/workers.py): it owns
the model shard, its slice of the paged KV cache and, on the sampling rank, the per-sequence random
generators. The messages it takes and returns (`StepInput`, `StepOutput`) are small plain
dataclasses: token ids and block tables in, token ids and logprobs out; full-vocabulary logits never
leave the process.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from ..kernels import choose_linear_kernel, prepack_model
from ..modeling import Qwen2ForCausalLM, base_model
from ..tasks import EMBED, task_of
from .paged_attention import PagedAttentionBatch, PagedKVCache, SeqSlice
from .sampling import Sampler, SamplingParams, SequenceSamplingState, TokenLogprob, make_generator, token_logprobs
from .structured_output import GrammarBackend, GrammarBatch

logger = logging.getLogger(__name__)


@dataclass
class SeqStep:
    """One sequence's share of a step."""
    seq_id: int
    token_ids: list[int]  # the new tokens to run: a prompt chunk, or the last sampled token
    start_pos: int  # position of token_ids[0]
    block_table: list[int]
    sample: bool  # sample a token after this step
    params: SamplingParams | None = None  # set when sample
    seed: int | None = None
    # Token history, sent only when the sampler needs it (penalties, min_tokens).
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None
    num_output_tokens: int = 0
    # Prompt logprobs: rows token_ids[offset:offset + len(targets)] predict `prompt_targets`.
    prompt_logprobs: int | None = None  # top-k to return with each
    prompt_targets: list[int] | None = None
    prompt_targets_offset: int = 0
    lora_slot: int = -1  # the LoRA adapter slot its rows use (-1: the base model)


@dataclass
class StepInput:
    seqs: list[SeqStep]
    finished_seq_ids: list[int] = field(default_factory=list)  # forget their generators


@dataclass
class StepOutput:
    sampled: dict[int, tuple[int, TokenLogprob | None]]  # seq_id -> (token id, logprobs)
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # seq_id -> this step's
    grammar_done: set[int] = field(default_factory=set)  # seq ids whose grammar completed (or broke) this step


@dataclass
class PooledInput:
    """A padded batch for the non-generative heads: one forward, no KV cache."""
    task: str  # "classify" | "classify_tokens" | "answer" | "embed"
    token_ids: list[list[int]]
    pooling: str = "last"  # embeddings: "last" | "mean"
    normalize: bool = True


class ModelRunner:
    """linear_kernel: "auto" (oneDNN-packed weights on CPU for fp32/bf16, kernels.py), "packed" or "plain"."""

    def __init__(self, model: torch.nn.Module, eos_token_ids: list[int], num_kv_blocks: int = 0,
                 block_size: int = 16, is_sampler: bool = True, grammar: GrammarBackend | None = None,
                 linear_kernel: str | None = "auto"):
        self.model = model
        self.decoder = base_model(model)
        self.device = self.decoder.embed_tokens.weight.device
        self.linear_kernel = choose_linear_kernel(linear_kernel, self.device, self.decoder.dtype)
        if self.linear_kernel == "packed":
            packed = prepack_model(model)
            logger.info("linear kernel: oneDNN-packed weights (%d layers)", packed)
        self.eos_token_ids = eos_token_ids
        self.is_sampler = is_sampler
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}
        # Structured output, on the sampling rank: per-sequence matchers and the mask pool.
        self.grammar_backend = grammar
        self.grammars = GrammarBatch(grammar) if grammar is not None and is_sampler else None
        self.num_kv_blocks = num_kv_blocks
        self.cache = None
        self.lora = None  # LoraSlots, made on the first load_lora
        if num_kv_blocks and isinstance(model, Qwen2ForCausalLM):
            attn = self.decoder.layers[0].self_attn
            self.cache = PagedKVCache(len(self.decoder.layers), num_kv_blocks, block_size, attn.num_kv_heads,
                                      attn.head_dim, self.decoder.dtype, self.device)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        for seq_id in step.finished_seq_ids:
            self.generators.pop(seq_id, None)
            if self.grammars is not None:
                self.grammars.forget(seq_id)
        if not step.seqs:
            return StepOutput({})
        if self.grammars is not None:
            # Masks for this step's constrained rows are computed in a pool while the forward runs.
            self.grammars.start([(s.seq_id, s.params.structured) for s in step.seqs
                                 if s.sample and s.params.structured is not None])
        token_ids, positions, slices, sample_rows, prompt_rows = [], [], [], [], []
        for s in step.seqs:
            start = len(token_ids)
            token_ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + len(s.token_ids)))
            slices.append(SeqSlice(start, len(s.token_ids), s.start_pos + len(s.token_ids), s.block_table))
            if s.sample:
                sample_rows.append(len(token_ids) - 1)
            if s.prompt_targets:
                first = start + s.prompt_targets_offset
                prompt_rows.extend(range(first, first + len(s.prompt_targets)))
        batch = PagedAttentionBatch(self.cache, slices, self.device)
        with self._lora_rows(step.seqs, slices):
            hidden = self.decoder.forward_tokens(torch.tensor(token_ids, device=self.device),
                                                 torch.tensor(positions, device=self.device), batch)  # [T, E]
        if not sample_rows and not prompt_rows:
            return StepOutput({})
        # [N + P, V] on all ranks (all-gather inside): sampled rows, then prompt-logprob rows
        logits = self.model.compute_logits(hidden[sample_rows + prompt_rows])
        if not self.is_sampler:
            return StepOutput({})
        out = self._sample(logits[:len(sample_rows)], [s for s in step.seqs if s.sample])
        out.prompt_logprobs = self._prompt_logprobs(logits[len(sample_rows):], step.seqs)
        return out

    def _lora_rows(self, seqs: list[SeqStep], slices: list[SeqSlice]):
        """Which rows use which adapter slot during the forward (nothing to do without adapters)."""
        if self.lora is None or all(s.lora_slot < 0 for s in seqs):
            return contextlib.nullcontext()
        return self.lora.rows([(s.lora_slot, sl.start, sl.count) for s, sl in zip(seqs, slices)])

    def load_lora(self, slot: int, path: str, max_loras: int, max_rank: int, name: str | None = None) -> None:
        """Load an adapter (this rank's slices) into `slot`; the slots are made on first use."""
        from ..lora import LoraSlots, read_adapter

        spec = read_adapter(path, self.decoder.config, max_rank)
        if self.lora is None:
            self.lora = LoraSlots(self.decoder, max_loras, max_rank)
        self.lora.load(slot, spec, name)

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, seqs: list[SeqStep]) -> dict[int, list[TokenLogprob]]:
        """logits [P, V] of every prompt-logprob row, in step order -> each sequence's entries."""
        found, row = {}, 0
        for s in seqs:
            if s.prompt_targets:
                n = len(s.prompt_targets)
                found[s.seq_id] = token_logprobs(logits[row:row + n], s.prompt_targets, [s.prompt_logprobs] * n)
                row += n
        return found

    def _sample(self, logits: torch.Tensor, seqs: list[SeqStep]) -> StepOutput:
        states = []
        for s in seqs:
            if s.seed is not None and s.seq_id not in self.generators:
                self.generators[s.seq_id] = make_generator(s.seed, self.device)
            states.append(SequenceSamplingState(s.params, s.prompt_token_ids or [], s.output_token_ids or [],
                                                self.eos_token_ids, self.generators.get(s.seq_id),
                                                num_output_tokens=s.num_output_tokens))
        if self.grammars is not None:
            masks = self.grammars.masks()  # waits for the pool: seq id -> bitmask [W]
            for s, st in zip(seqs, states):
                st.allowed_mask = masks.get(s.seq_id)
        result = self.sampler(logits, states)
        out = StepOutput({s.seq_id: (tok, lp) for s, tok, lp in zip(seqs, result.token_ids, result.logprobs)})
        if self.grammars is not None:
            out.grammar_done = {s.seq_id for s, tok in zip(seqs, result.token_ids)
                                if s.params.structured is not None and self.grammars.advance(s.seq_id, tok)}
        return out

    # --- one-shot heads -----------------------------------------------------------------------

    @torch.inference_mode()
    def run_pooled(self, req: PooledInput) -> list:
        """Right-padded batch -> per-input results as plain lists (the head's own `pooled`)."""
        lengths = [len(ids) for ids in req.token_ids]
        ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long, device=self.device)  # [B, S]
        mask = torch.zeros_like(ids)
        for i, row in enumerate(req.token_ids):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        if req.task == EMBED:  # every head sits on the decoder
            return self.decoder.pooled(ids, mask, pooling=req.pooling, normalize=req.normalize)
        if req.task != task_of(type(self.model).__name__):
            raise ValueError(f"a {type(self.model).__name__} cannot run the pooled task {req.task!r}")
        return self.model.pooled(ids, mask)
