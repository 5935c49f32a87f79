"""Continuous (iteration-level) batching: which sequences run in the next model step, and how many tokens each.

Every step: running sequences go first (first-come-first-served), one token for a decode or a
chunk of the prompt for a prefill still in progress; then waiting sequences are admitted while the
token budget (`max_num_batched_tokens`) and `max_num_seqs` allow, their prompts chunked so a long
prompt never stalls the decodes. When KV blocks run out, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the queue to be recomputed later (its prompt
plus what it generated so far), so nothing fails and the oldest requests keep making progress.
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
    block_hashes: list[int] = field(default_factory=list)
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


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # False keeps a waiting sequence out for now (the engine: its LoRA adapter has no slot yet)
        self.can_admit: Callable[[Sequence], bool] = lambda seq: True

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

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        # 1. running sequences, oldest first
        for seq in list(self.running):
            if budget == 0 or seq not in self.running:
                continue
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, num_new):
                continue
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        scheduled = [s for s in scheduled if s.seq in self.running]  # a later grow may preempt an earlier one
        budget = self.config.max_num_batched_tokens - sum(s.num_new_tokens for s in scheduled)
        # 2. admit waiting sequences in arrival order (no skipping ahead: no starvation)
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
        return scheduled

    def after_step(self, scheduled: list[ScheduledSeq]) -> None:
        """Advance computed counts and publish newly full blocks to the prefix cache."""
        for item in scheduled:
            seq = item.seq
            seq.num_computed += item.num_new_tokens
            # Only when a block just filled up: most decode steps fill none.
            if self.blocks.enable_prefix_caching and \
                    seq.num_computed // self.blocks.block_size > len(seq.block_hashes):
                self.blocks.register_full_blocks(seq.block_table, seq.block_hashes, seq.all_token_ids,
                                                 seq.num_computed, seq.cache_salt)
