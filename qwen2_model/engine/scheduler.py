"""Continuous (iteration-level) batching: which sequences run in the next model step, and how many tokens each.

Every step: running sequences that decode go first (one token each, oldest first), then the
prompt chunks of running sequences still prefilling, then waiting sequences are admitted in arrival
order while the token budget (`max_num_batched_tokens`) and `max_num_seqs` allow, their prompts
chunked. When KV blocks run out, the newest running sequence is preempted: its blocks are freed and
it goes back to the front of the queue to be recomputed later (its prompt plus what it generated so
far), so nothing fails and the oldest requests keep making progress.

Bounded token latency: a step that decodes is also the wait for every running stream's next token,
so while anything decodes, the prompt tokens of a step are capped (the *prefill budget*): at most
`max_prefill_tokens` when set, and, with `prefill_step_ratio` r, at most what keeps the step within
r times a decode-only step, by a cost model fitted online to the measured step times
(`StepCostModel`: seconds = a + b * tokens). A step with no decodes uses the whole token budget (no
stream waits on it).

A crowd of prompts lifts the adaptive cap (not `max_prefill_tokens`, the operator's hard cap): when
more requests wait for their prompts than streams decode, a step may carry 1/`prefill_drain_steps`
of the prompt tokens pending (of the sequences that could run now), so a burst is prefilled in a
few big chunks instead of trickling in at the decodes' pace. Why: on a CPU a prompt token costs
about as much as a decode, so the ratio cap alone admits only ~(r - 1) x decodes prompt tokens
per step; with 31 requests queued behind one stream, that keeps 31 users waiting (and the batch
small) to spare one stream a longer gap. The decoding streams wait for the same prefill work
whatever the chunk size (the chunk size only spreads it), so while the waiting outnumber them,
big chunks (fewer steps: throughput and TTFT) win; once they do not (the steady state, or one long
prompt arriving while others decode) the ratio holds and inter-token latency stays smooth.

Why adaptive: the cost of a prompt token relative to a decode step differs by
orders of magnitude between a 2-core CPU (compute-bound: every token costs) and a GPU (a decode step
is bound by reading the weights, so a few hundred prompt tokens ride along almost free); a ratio of
measured times means the same thing on both, a fixed token count does not.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .block_manager import BlockManager, NoFreeBlocks
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One generated continuation (a request with n > 1 has n of them)."""
    request_id: str
    index: int  # choice index within the request
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # sha256 keys of full blocks (block_hash)
    wait_for: "Sequence | None" = None  # n > 1: children wait until the parent's prompt is cached
    first_scheduled_time: float | None = None
    finish_reason: str | None = None
    # params.prompt_logprobs: entry j is prompt token j+1's (computed once, kept across preemption)
    prompt_logprobs: list = field(default_factory=list)
    lora: Any = None  # the LoRA adapter (engine.LoraRef) or None for the base model

    @property
    def cache_salt(self):
        """The root of its prefix-cache hash chain: K/V computed under an adapter are that adapter's."""
        return None if self.lora is None else self.lora.salt

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without building the whole concatenation."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet (the prompt then skips the prefix cache)."""
        return self.params.prompt_logprobs is not None and \
            len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1

    @property
    def prefilling(self) -> bool:
        return self.num_tokens - self.num_computed > 1


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens, so a new token gets sampled."""
        return self.seq.num_computed + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    # Below this many free blocks no new request is admitted, so running ones can grow.
    watermark_blocks: int = 1
    # Prefill budget while sequences decode (module docstring). A fixed cap in prompt tokens per step
    # (None: none), and the adaptive one: a step with prompt tokens takes at most this many times a
    # decode-only step of the same decodes (None: off). Never below `min_prefill_tokens`, so
    # prompts keep moving however slow the step is.
    max_prefill_tokens: int | None = None
    prefill_step_ratio: float | None = 2.0
    min_prefill_tokens: int = 16
    # ... but while more prompts wait than sequences decode, a step may carry 1/this of them (None: never).
    prefill_drain_steps: int | None = 4


class StepCostModel:
    """seconds ~= a + b * tokens, fitted by exponentially weighted least squares over recent steps.

    `a` is the per-step cost (reading the weights, Python, the LM head of few rows), `b` the cost of
    one more token. Old steps fade with `decay` per step, so the fit follows a machine whose load
    changes. Until steps of different sizes have been seen, `ready` is False (no cap is applied).
    """

    def __init__(self, decay: float = 0.95, min_steps: int = 4):
        self.decay, self.min_steps = decay, min_steps
        self.s0 = self.s1 = self.s2 = self.sy = self.sxy = 0.0
        self.steps = 0
        self.a, self.b = 0.0, 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d, x, y = self.decay, float(tokens), float(seconds)
        self.s0, self.s1, self.s2 = d * self.s0 + 1, d * self.s1 + x, d * self.s2 + x * x
        self.sy, self.sxy = d * self.sy + y, d * self.sxy + x * y
        self.steps += 1
        det = self.s0 * self.s2 - self.s1 * self.s1
        b = (self.s0 * self.sxy - self.s1 * self.sy) / det if det > 1e-9 * max(self.s0 * self.s2, 1.0) else 0.0
        if b <= 0:  # one step size so far, or noise: a cost proportional to tokens
            self.a, self.b = 0.0, self.sy / self.s1 if self.s1 else 0.0
        else:
            self.a, self.b = max(0.0, (self.sy - b * self.s1) / self.s0), b

    @property
    def ready(self) -> bool:
        return self.steps >= self.min_steps and self.b > 0

    def seconds(self, tokens: int) -> float:
        return self.a + self.b * tokens

    def prefill_budget(self, decodes: int, ratio: float) -> int:
        """Prompt tokens that keep a step with `decodes` decodes within `ratio` x its decode-only time."""
        return int((ratio - 1.0) * self.seconds(decodes) / self.b)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # False keeps a waiting sequence out for now (the engine: its LoRA adapter has no slot yet)
        self.can_admit: Callable[[Sequence], bool] = lambda seq: True
        self.cost = StepCostModel()
        self.clock = time.perf_counter  # tests drive a fake one
        self._step_started: float | None = None
        self.last_prefill_budget: int | None = None  # the cap of the last step (None: uncapped)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and free its blocks at once (abort, stop, length)."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.blocks.release(seq.block_table)
        seq.block_hashes.clear()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.block_hashes.clear()
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _unmatch(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        """Make room for `num_new` tokens of `seq`, preempting newer sequences if needed."""
        while True:
            try:
                self.blocks.grow(seq.block_table, seq.num_computed + num_new)
                return True
            except NoFreeBlocks:
                victim = self.running[-1]  # newest
                self._preempt(victim)
                if victim is seq:
                    return False

    def pending_prompts(self) -> list[Sequence]:
        """The sequences with prompt (or recompute) work pending that could run now: the running ones
        mid-prompt and the waiting ones that fit in `max_num_seqs`."""
        slots = max(self.config.max_num_seqs - len(self.running), 0)
        return [s for s in self.running if s.prefilling] + list(itertools.islice(self.waiting, slots))

    def prefill_budget(self, decodes: int) -> int | None:
        """The cap on prompt tokens in a step that carries `decodes` decodes (None: no cap)."""
        if not decodes:
            return None
        cfg = self.config
        caps = []
        if cfg.max_prefill_tokens is not None:  # the operator's hard cap
            caps.append(cfg.max_prefill_tokens)
        if cfg.prefill_step_ratio is not None and self.cost.ready:
            ratio_cap = self.cost.prefill_budget(decodes, cfg.prefill_step_ratio)
            if cfg.prefill_drain_steps:  # a crowd waiting lifts the adaptive cap (module docstring)
                pending = self.pending_prompts()
                if len(pending) > decodes:  # tokens summed only then
                    pending_tokens = sum(s.num_tokens - s.num_computed for s in pending)
                    ratio_cap = max(ratio_cap, -(-pending_tokens // cfg.prefill_drain_steps))
            caps.append(ratio_cap)
        if not caps:
            return None
        return max(min(caps), cfg.min_prefill_tokens)

    def schedule(self) -> list[ScheduledSeq]:
        max_tokens = self.config.max_num_batched_tokens
        # 1. running decodes, oldest first: one token each (the one sampled last step)
        decodes: list[ScheduledSeq] = []
        for seq in [s for s in self.running if not s.prefilling]:
            num_new = seq.num_tokens - seq.num_computed  # 1 (0 only if a caller skipped sampling)
            if len(decodes) < max_tokens and seq in self.running and self._grow(seq, num_new):
                decodes.append(ScheduledSeq(seq, num_new))
        decodes = [s for s in decodes if s.seq in self.running]  # a later grow may preempt an earlier one
        # Prompt tokens this step may carry: the token budget left, capped while anything decodes.
        cap = self.last_prefill_budget = self.prefill_budget(len(decodes))
        budget = max_tokens - len(decodes) if cap is None else min(max_tokens - len(decodes), cap)
        # 2. running prefills (a chunked prompt, or a recompute after preemption), oldest first
        prefills: list[ScheduledSeq] = []
        for seq in [s for s in self.running if s.prefilling]:
            if budget <= 0 or seq not in self.running:
                continue
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if self._grow(seq, num_new):
                prefills.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        scheduled = [s for s in decodes + prefills if s.seq in self.running]
        budget = min(budget, max_tokens - sum(s.num_new_tokens for s in scheduled))
        # 3. admit waiting sequences in arrival order (no skipping ahead: no starvation)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.wait_for is not None and seq.wait_for.status != Status.FINISHED and \
                    seq.wait_for.num_computed < len(seq.wait_for.prompt_token_ids):
                break
            if not self.can_admit(seq):
                break
            lookup = None  # (tokens, blocks found) of a prefix-cache match made for this admission
            if not seq.block_table and not seq.wants_prompt_logprobs:  # cached positions give no logits
                cached, hashes = self.blocks.match_prefix(seq.all_token_ids, seq.cache_salt)
                lookup = (seq.num_tokens, len(cached))
                # keep at least one token to compute, so the step produces logits
                while cached and len(cached) * self.blocks.block_size >= seq.num_tokens:
                    self.blocks.release([cached.pop()])
                    hashes.pop()
                seq.block_table, seq.block_hashes = cached, hashes
                seq.num_computed = len(cached) * self.blocks.block_size
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            needed = self.blocks.blocks_needed(seq.num_computed + num_new) - len(seq.block_table)
            if needed > self.blocks.num_free - (self.config.watermark_blocks if self.running else 0):
                fit = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed
                if self.running or fit <= 0:
                    # Not admitted: give back the cached blocks it matched. A waiting sequence must
                    # hold no blocks, or two of them could each hold what the other needs, forever.
                    self._unmatch(seq)
                    break
                num_new = min(num_new, fit)  # nothing will free blocks for it: shrink the chunk to what fits
            self.blocks.grow(seq.block_table, seq.num_computed + num_new)
            if lookup is not None:
                self.blocks.record_lookup(*lookup)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self._step_started = self.clock() if scheduled else None
        return scheduled

    def after_step(self, scheduled: list[ScheduledSeq]) -> None:
        """Advance computed counts and publish newly full blocks to the prefix cache; the time since
        `schedule` returned (the model step) feeds the cost model."""
        if self._step_started is not None and scheduled:
            self.cost.observe(sum(i.num_new_tokens for i in scheduled), self.clock() - self._step_started)
            self._step_started = None
        for item in scheduled:
            seq = item.seq
            seq.num_computed += item.num_new_tokens
            # Only when a block just filled up: most decode steps fill none.
            if self.blocks.enable_prefix_caching and \
                    seq.num_computed // self.blocks.block_size > len(seq.block_hashes):
                self.blocks.register_full_blocks(seq.block_table, seq.block_hashes, seq.all_token_ids,
                                                 seq.num_computed, seq.cache_salt)
