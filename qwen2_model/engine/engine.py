"""The serving engine: token ids in, token ids out, continuously batched over a paged KV cache.

`Engine.add_request(request_id, prompt_token_ids, params)`, `abort(request_id)` (frees its blocks at
once), `step() -> list[RequestOutput]`. `AsyncEngine` runs the step loop in a background thread and
hands each request an async stream of outputs. The model runs behind an Executor (executor.py), so
the same engine drives one process or a tensor-parallel Ray worker group. No tokenizer here: stop
strings and detokenization belong to the ingress.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from .executor import Executor
from .block_manager import BlockManager
from .model_runner import PooledInput, SeqStep, StepInput
from ..tasks import is_generative
from .sampling import DEFAULT_SAMPLING_LIMITS, SamplingLimits, SamplingParams, TokenLogprob
from .scheduler import ScheduledSeq, Scheduler, SchedulerConfig, Sequence, Status


class EngineError(ValueError):
    """A request the engine refuses; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param, self.code = param, code


class QueueFull(RuntimeError):
    pass


class EngineDead(RuntimeError):
    """The executor failed (e.g. a worker died); in-flight requests fail with this."""


@dataclass
class EngineConfig:
    max_model_len: int | None = None  # default: the model's context (max_position_embeddings x rope scaling)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    # Prefill budget while sequences decode (scheduler.py): a fixed cap in prompt tokens per step,
    # and the adaptive one, a step with prompt tokens within this many times a decode-only step.
    max_prefill_tokens: int | None = None
    prefill_step_ratio: float | None = 2.0
    prefill_drain_steps: int | None = 4  # while more prompts wait than decode, a step may carry 1/this of them
    max_waiting: int = 1024  # queued requests beyond this are refused (429)
    # Tokens a stream's message carries (vLLM's stream_interval): 1 sends every token as it comes;
    # k > 1 sends a choice's first token at once, then every k tokens and at its end, so the
    # serving layers (Serve's streaming, the ingress, the proxy) handle 1/k of the messages.
    stream_interval: int = 1
    enable_prefix_caching: bool = True
    # What one request may ask for (n, max_tokens, logprobs, ...): the ingress checks the same object.
    limits: SamplingLimits = DEFAULT_SAMPLING_LIMITS
    # Pooled (classify / embed / QA) forwards are padded batches: cap their size in padded tokens.
    max_pooled_batch_tokens: int = 16384
    # LoRA: adapter slots on the model (distinct adapters in one step; LRU-evicted when not used by a
    # running sequence) and the largest rank they hold. Slots are allocated on the first adapter used.
    max_loras: int = 4
    max_lora_rank: int = 16


@dataclass(frozen=True)
class LoraRef:
    """A registered LoRA adapter: its name (what requests ask for) and directory."""
    name: str
    path: str

    @property
    def salt(self) -> bytes:
        """The root of its sequences' prefix-cache hash chain (a base-model chain starts from b"")."""
        return hashlib.sha256(f"lora\0{self.name}\0{self.path}".encode()).digest()


def context_length(config: EngineConfig, model_config) -> int:
    """The served context length: `max_model_len` if set (refused when over what the RoPE scaling
    supports), else the model's (max_position_embeddings x rope scaling). The one place it is
    computed: the engine and the ingress (deployments/checkpoints.py) both call this."""
    return int(model_config.check_max_model_len(config.max_model_len))


@dataclass
class RequestOutput:
    request_id: str
    index: int  # choice index (n > 1)
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob | None]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    num_prompt_tokens: int
    num_output_tokens: int
    # params.prompt_logprobs: on the choice's first output, prompt tokens 1.. (the first has none)
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one choice as one (the tokens of both, the later state)."""
    return dataclasses.replace(then, new_token_ids=first.new_token_ids + then.new_token_ids,
                               new_logprobs=first.new_logprobs + then.new_logprobs,
                               prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None
                               else then.prompt_logprobs)


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    num_kv_blocks: int = 0
    free_kv_blocks: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    lora_loads: int = 0  # adapters loaded into a slot (first use, or again after eviction)
    lora_evictions: int = 0
    steps: int = 0
    max_batch_seqs: int = 0  # largest number of sequences in one step so far
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


@dataclass
class StepRecord:
    """What one model step did, handed to `Engine.step_observers` (metrics; no Ray here)."""
    seconds: float  # wall time of the step (schedule + model + bookkeeping)
    num_seqs: int  # sequences in the batch
    num_tokens: int  # tokens computed (prefill chunks + decodes)
    prefill_tokens: int  # of which prompt (or recompute) tokens
    decode_seqs: int  # sequences that only decoded one token
    queue_times: list[float]  # seconds waited, for each sequence scheduled for the first time this step


class Engine:
    def __init__(self, executor: Executor, config: EngineConfig | None = None):
        self.executor = executor
        self.config = config or EngineConfig()
        model_config = executor.config
        # The context the RoPE scaling supports (YaRN: original x factor); a larger max_model_len is refused.
        self.max_model_len = context_length(self.config, model_config)
        self.eos_token_ids = model_config.eos_token_ids
        self.vocab_size = model_config.vocab_size
        self.generative = is_generative(executor.architecture)
        # Structured output: the executor's GrammarBackend (None: the model has no tokenizer for it).
        self.grammar = getattr(executor, "grammar", None)
        self.blocks = BlockManager(max(executor.num_kv_blocks, 1), executor.block_size,
                                   self.config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                                   max_prefill_tokens=self.config.max_prefill_tokens,
                                                   prefill_step_ratio=self.config.prefill_step_ratio,
                                                   prefill_drain_steps=self.config.prefill_drain_steps),
                                   self.blocks)
        self.requests: dict[str, list[Sequence]] = {}
        # LoRA: registered adapters by name, and those in a model slot (LRU first).
        self.loras: dict[str, LoraRef] = {}
        self.lora_slots: OrderedDict[LoraRef, int] = OrderedDict()
        self.request_errors: list[tuple[str, Exception]] = []  # requests failed inside a step (adapter load)
        self.scheduler.can_admit = lambda seq: seq.lora is None or seq.lora in self.lora_slots
        self._finished_seq_ids: list[int] = []
        self.stats = EngineStats(num_kv_blocks=self.blocks.num_blocks)
        self.last_step: StepRecord | None = None
        # Called with a StepRecord at the end of every step that ran the model (in the step thread,
        # under AsyncEngine's lock: keep them cheap). An observer that raises is logged and skipped.
        self.step_observers: list[Callable[[StepRecord], None]] = []

    # --- requests ------------------------------------------------------------------------------

    def _check_ids(self, ids, param: str, what: str) -> None:
        bad = [t for t in ids if not (0 <= t < self.vocab_size)]
        if bad:  # the model (and the sampler's indexing) would read another row
            raise EngineError(f"{what} {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param=param)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Check a request; returns the params to run (max_tokens None -> the rest of the context)."""
        if not self.generative:
            raise EngineError(f"this model is a {self.executor.architecture}, not a causal LM: it cannot generate",
                              param="model")
        try:
            params.validate(self.config.limits)
        except ValueError as exc:
            raise EngineError(str(exc), param=getattr(exc, "param", None)) from exc
        if not prompt_token_ids:
            raise EngineError("prompt must contain at least one token", param="prompt")
        self._check_ids(prompt_token_ids, "prompt", "prompt token id")
        self._check_ids(params.stop_token_ids, "stop_token_ids", "stop_token_ids: token id")
        self._check_ids(params.logit_bias, "logit_bias", "logit_bias: token id")
        if params.structured is not None:
            if self.grammar is None:
                raise EngineError("structured output is not available for this model (no tokenizer for it)",
                                  param="structured_outputs")
            from .structured_output import StructuredOutputError
            try:
                self.grammar.validate(params.structured)
            except StructuredOutputError as exc:
                raise EngineError(f"structured_outputs: {exc}", param="structured_outputs") from exc
        prompt, limit = len(prompt_token_ids), self.max_model_len
        if prompt >= limit:
            raise EngineError(f"This model's maximum context length is {limit} tokens, but the prompt has {prompt} "
                              f"tokens, leaving no room to generate. Please shorten the prompt.",
                              param="prompt", code="context_length_exceeded")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=limit - prompt)
        total = prompt + params.max_tokens
        if total > limit:
            raise EngineError(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{total} tokens ({prompt} in the prompt, {params.max_tokens} for the completion). "
                              f"Please reduce the prompt or max_tokens.",
                              param="max_tokens", code="context_length_exceeded")
        if self.blocks.blocks_needed(total) > self.blocks.num_blocks:
            raise EngineError(f"prompt + max_tokens = {total} tokens needs more KV cache than the whole cache holds "
                              f"({self.blocks.num_blocks * self.blocks.block_size} tokens)", param="max_tokens",
                              code="context_length_exceeded")
        return params

    # --- LoRA adapters ------------------------------------------------------------------------

    def add_lora(self, name: str, path: str) -> LoraRef:
        """Register an adapter under `name`, checked against the base model (LoraError otherwise).
        It is loaded into a slot when a request first needs it."""
        from ..lora import read_adapter

        if self.config.max_loras < 1:
            raise EngineError("LoRA adapters are disabled (max_loras is 0)", param="model")
        read_adapter(path, self.executor.config, self.config.max_lora_rank)
        ref = LoraRef(name, str(path))
        self.loras[name] = ref
        return ref

    def remove_lora(self, name: str, ref: LoraRef | None = None) -> None:
        """Forget an adapter (only if still registered as `ref`, when given): new requests cannot ask
        for it; requests in flight finish with it. A dict pop: safe from any thread without the lock."""
        if ref is None or self.loras.get(name) is ref:
            self.loras.pop(name, None)

    def lora_ref(self, name: "str | LoraRef | None") -> LoraRef | None:
        """A registered adapter by name (a LoraRef passes through: a request holds its adapter even if
        the name is unregistered meanwhile)."""
        if name is None or isinstance(name, LoraRef):
            return name
        ref = self.loras.get(name)
        if ref is None:
            raise EngineError(f"LoRA adapter {name!r} is not loaded", param="model", code="model_not_found")
        return ref

    def _free_lora_slot(self, needed: set[LoraRef]) -> int | None:
        used = set(self.lora_slots.values())
        for slot in range(self.config.max_loras):
            if slot not in used:
                return slot
        for ref in self.lora_slots:  # least recently used first
            if ref not in needed:
                self.stats.lora_evictions += 1
                return self.lora_slots.pop(ref)
        return None

    def _prepare_loras(self) -> None:
        """Before scheduling: give the waiting sequences' adapters slots, in queue order, evicting
        adapters no running (or earlier waiting) sequence uses; stop at the first that finds none."""
        needed = {s.lora for s in self.scheduler.running if s.lora is not None}
        for ref in needed:
            self.lora_slots.move_to_end(ref)
        for seq in itertools.islice(self.scheduler.waiting, self.config.max_num_seqs):
            ref = seq.lora
            if ref is None or ref in needed:
                continue
            if ref in self.lora_slots:
                self.lora_slots.move_to_end(ref)
                needed.add(ref)
                continue
            slot = self._free_lora_slot(needed)
            if slot is None:
                return
            try:
                self.executor.load_lora(slot, ref.path, self.config.max_loras, self.config.max_lora_rank, ref.name)
            except Exception as exc:  # e.g. the directory changed since it was registered: fail its requests
                logging.getLogger(__name__).warning("LoRA adapter %r failed to load: %s", ref.name, exc)
                if self.loras.get(ref.name) == ref:
                    del self.loras[ref.name]
                error = EngineError(f"LoRA adapter {ref.name!r} failed to load: {exc}", param="model")
                for s in [s for s in self.scheduler.waiting if s.lora == ref]:
                    if s.status != Status.FINISHED:
                        self._finish(s, "abort")
                        self.request_errors.append((s.request_id, error))
                return
            self.lora_slots[ref] = slot
            self.stats.lora_loads += 1
            needed.add(ref)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    lora: str | None = None) -> None:
        if request_id in self.requests:
            raise EngineError(f"request id {request_id!r} is already in use", param="request_id")
        params = self.validate(prompt_token_ids, params)
        lora_ref = self.lora_ref(lora)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"the queue is full ({self.config.max_waiting} waiting requests)")
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(request_id, i, list(prompt_token_ids), params, seed)
            seq.lora = lora_ref
            if i > 0 and self.config.enable_prefix_caching and params.prompt_logprobs is None:
                seq.wait_for = seqs[0]  # share the parent's prompt blocks through the prefix cache
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.stats.prompt_tokens += len(prompt_token_ids)

    def abort(self, request_id: str, index: int | None = None) -> list[RequestOutput]:
        """Stop a request (or one choice of it, `index`) and free its KV blocks at once."""
        outputs = []
        for seq in list(self.requests.get(request_id, [])):
            if seq.status != Status.FINISHED and index in (None, seq.index):
                self._finish(seq, "abort")
                outputs.append(self._output(seq, [], []))
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- the step ------------------------------------------------------------------------------

    def _seq_step(self, item: ScheduledSeq) -> SeqStep:
        seq, n = item.seq, item.num_new_tokens
        tokens = seq.token_slice(seq.num_computed, seq.num_computed + n)
        step = SeqStep(seq.seq_id, tokens, seq.num_computed, list(seq.block_table), item.samples)
        if seq.lora is not None:
            step.lora_slot = self.lora_slots[seq.lora]  # a running sequence's adapter is never evicted
        if seq.wants_prompt_logprobs:
            # The row at position q predicts prompt token q+1: rows from the first not yet computed
            # (a recompute after preemption skips those already kept) up to the prompt's second-last.
            first = max(seq.num_computed, len(seq.prompt_logprobs))
            last = min(seq.num_computed + n, len(seq.prompt_token_ids) - 1)  # exclusive
            if first < last:
                step.prompt_logprobs = seq.params.prompt_logprobs
                step.prompt_targets = seq.prompt_token_ids[first + 1:last + 1]
                step.prompt_targets_offset = first - seq.num_computed
        if item.samples:
            p = seq.params
            step.params, step.seed = p, seq.seed
            step.num_output_tokens = len(seq.output_token_ids)
            if p.uses_repetition_penalty:
                step.prompt_token_ids = seq.prompt_token_ids
            if p.uses_repetition_penalty or p.uses_output_penalties:
                step.output_token_ids = seq.output_token_ids
        return step

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        start_mono = time.monotonic()  # the scheduler stamps first_scheduled_time with monotonic()
        if self.loras or self.lora_slots:
            self._prepare_loras()
        scheduled = self.scheduler.schedule()
        # decode = the one new token after a generated one (judged before the step advances counts)
        decodes = [i.num_new_tokens == 1 and i.samples and bool(i.seq.output_token_ids) for i in scheduled]
        seq_steps = [self._seq_step(item) for item in scheduled]
        if self.lora_slots:  # rows of one adapter next to each other: one slice per adapter in the LoRA matmuls
            seq_steps.sort(key=lambda s: s.lora_slot)
        step_input = StepInput(seq_steps, self._finished_seq_ids)
        self._finished_seq_ids = []
        if not scheduled:
            return []
        try:
            result = self.executor.execute(step_input)
        except Exception as exc:
            raise EngineDead(f"model step failed: {exc}") from exc
        self.scheduler.after_step(scheduled)
        outputs = []
        for item in scheduled:
            seq = item.seq
            seq.prompt_logprobs.extend(result.prompt_logprobs.get(seq.seq_id, ()))
            if seq.seq_id not in result.sampled:
                continue
            token, logprob = result.sampled[seq.seq_id]
            seq.output_token_ids.append(token)
            self.stats.generated_tokens += 1
            # A grammar that completed ends its choice as a stop, even on the last allowed token.
            reason = "stop" if seq.seq_id in result.grammar_done else self._finish_reason(seq, token)
            if reason:
                self._finish(seq, reason)
            outputs.append(self._output(seq, [token], [logprob]))
        self._record(StepRecord(
            seconds=time.perf_counter() - start, num_seqs=len(scheduled),
            num_tokens=sum(i.num_new_tokens for i in scheduled),
            prefill_tokens=sum(i.num_new_tokens for i, d in zip(scheduled, decodes) if not d),
            decode_seqs=sum(decodes),
            queue_times=[i.seq.first_scheduled_time - i.seq.arrival_time for i in scheduled
                         if i.seq.first_scheduled_time is not None and i.seq.first_scheduled_time >= start_mono]))
        return outputs

    def _record(self, record: StepRecord) -> None:
        self.last_step = record
        self.stats.steps += 1
        self.stats.max_batch_seqs = max(self.stats.max_batch_seqs, record.num_seqs)
        self.refresh_stats()
        for observer in list(self.step_observers):
            try:
                observer(record)
            except Exception:  # a metrics bug must never stop the engine
                logging.getLogger(__name__).exception("step observer %r failed", observer)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if len(seq.output_token_ids) >= p.min_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._finished_seq_ids.append(seq.seq_id)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        seqs = self.requests.get(seq.request_id, [])
        if seqs and all(s.status == Status.FINISHED for s in seqs):
            del self.requests[seq.request_id]

    def _output(self, seq: Sequence, tokens: list[int], logprobs: list) -> RequestOutput:
        first = bool(tokens) and len(seq.output_token_ids) == 1
        prompt_logprobs = list(seq.prompt_logprobs) if first and seq.params.prompt_logprobs is not None else None
        return RequestOutput(seq.request_id, seq.index, tokens, logprobs, seq.finish_reason,
                             len(seq.prompt_token_ids), len(seq.output_token_ids), prompt_logprobs)

    def refresh_stats(self) -> EngineStats:
        s = self.stats
        s.running, s.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.kv_usage, s.free_kv_blocks = self.blocks.usage, self.blocks.num_free
        s.prefix_queries, s.prefix_hits = self.blocks.prefix_queries, self.blocks.prefix_hits
        s.preemptions = self.scheduler.num_preemptions
        return s

    # --- one-shot heads ------------------------------------------------------------------------

    def validate_pooled(self, token_ids: list[list[int]]) -> None:
        """Checks one pooled request's inputs (before it joins a batch with others)."""
        for ids in token_ids:
            if not ids:
                raise EngineError("input must contain at least one token", param="input")
            if len(ids) > self.max_model_len:
                raise EngineError(f"input of {len(ids)} tokens is over the model's context length "
                                  f"{self.max_model_len}", param="input", code="context_length_exceeded")
            self._check_ids(ids, "input", "token id")

    def run_pooled(self, req: PooledInput) -> list:
        """One padded forward per sub-batch of at most `max_pooled_batch_tokens` padded tokens
        (inputs sorted by length so little is padding); results in input order."""
        self.validate_pooled(req.token_ids)
        order = sorted(range(len(req.token_ids)), key=lambda i: len(req.token_ids[i]))
        results: list = [None] * len(order)
        chunk: list[int] = []
        for i in order + [None]:
            longest = len(req.token_ids[i]) if i is not None else 0  # ascending: the newcomer is the longest
            if chunk and (i is None or longest * (len(chunk) + 1) > self.config.max_pooled_batch_tokens):
                sub = dataclasses.replace(req, token_ids=[req.token_ids[j] for j in chunk])
                for j, out in zip(chunk, self.executor.run_pooled(sub)):
                    results[j] = out
                chunk = []
            if i is not None:
                chunk.append(i)
        return results

    def generate_all(self, prompts: dict[str, list[int]], params: SamplingParams | dict[str, SamplingParams],
                     loras: dict[str, str | None] | None = None) -> dict[str, list[list[int]]]:
        """Offline helper: run requests to completion; request id -> token ids per choice.
        `loras`: request id -> adapter name (absent: the base model)."""
        for rid, ids in prompts.items():
            self.add_request(rid, ids, params[rid] if isinstance(params, dict) else params,
                             lora=(loras or {}).get(rid))
        results: dict[str, dict[int, list[int]]] = {rid: {} for rid in prompts}
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].setdefault(out.index, []).extend(out.new_token_ids)
        return {rid: [r[i] for i in sorted(r)] for rid, r in results.items()}


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)


class AsyncEngine:
    """Runs `Engine.step` in a background thread; each request gets an asyncio stream of outputs.

    The event loop never waits for a model step: new requests and aborts go through an inbox that
    the step thread drains between steps. What can be checked at once (field ranges, context
    length, queue capacity, a duplicate id) is checked in `generate`, so the caller gets the error.

    All of the model's torch work runs on the step thread: building the engine (when given a
    function), steps, pooled forwards and adapter loads (`call`). The reason is libgomp, torch's
    CPU thread pool: every thread that runs a parallel region gets a pool of its own, and once the
    pools' threads outnumber the CPUs libgomp cuts the spin of an idle worker to ~100 iterations,
    so the step's worker sleeps between the hundreds of small regions of a decode step and must be
    woken for each. Measured on 2 cores, 32 streams: in a served Router with the model loaded on the
    replica's thread the worker slept 1,354 times a second, with it built on the step thread 0; the
    Router driven in-process went from 52.4 to 56.9 tok/s (the engine alone: 57.9-60.5).
    """

    def __init__(self, engine: "Engine | Callable[[], Engine]"):
        """`engine`: an Engine, or a function that builds one; a function runs on the step thread
        and this call waits for it (re-raising what it raised)."""
        build = (lambda: engine) if isinstance(engine, Engine) else engine
        self.engine: Engine = None  # type: ignore[assignment]  # set by the step thread before it steps
        self._lock = threading.Lock()  # held by the step thread around drain + step
        self._wake = threading.Event()
        # ("add", id, ids, params, lora) | ("abort", id, index) | ("call", fn, future)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_adds = 0
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.error: BaseException | None = None
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._loop, args=(build, built), name="engine-step-loop", daemon=True)
        self._thread.start()
        self.engine = built.result()

    def _drain(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "call":
                _, fn, future = command
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except BaseException as exc:  # the caller's error, not the step loop's
                        future.set_exception(exc)
            elif command[0] == "add":
                _, request_id, prompt_token_ids, params, lora = command
                self._pending_adds -= 1
                try:
                    self.engine.add_request(request_id, prompt_token_ids, params, lora)
                except Exception as exc:  # raced past the checks in generate(): fail that stream only
                    self._deliver(request_id, exc)
            else:
                _, request_id, index = command
                for out in self.engine.abort(request_id, index):  # the stream sees finish_reason "abort"
                    self._deliver(request_id, out)

    def _loop(self, build: Callable[[], Engine], built: concurrent.futures.Future) -> None:
        try:
            self.engine = build()
            built.set_result(self.engine)
        except BaseException as exc:
            built.set_exception(exc)
            return
        while not self._stopped:
            self._wake.clear()
            outputs: list = []
            with self._lock:
                self._drain()
                busy = self.engine.has_unfinished()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except Exception as exc:  # the executor died: fail everything in flight
                        self._fail_all(exc)
                        continue
            self._deliver_all([(out.request_id, out) for out in outputs])
            while self.engine.request_errors:
                self._deliver(*self.engine.request_errors.pop(0))
            if not busy and self._inbox.empty():
                self._wake.wait(0.05)

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, Any]]) -> None:
        """Hand (request id, output or error) pairs to their streams: one wake-up of each event loop
        for a whole step's outputs, not one per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _fail_all(self, exc: BaseException) -> None:
        self.error = exc
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self._deliver(rid, exc if isinstance(exc, EngineDead) else EngineDead(str(exc)))

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       lora: str | None = None):
        """Yields RequestOutputs until every choice finished; aborts on cancellation. `lora`: a
        registered adapter's name (None: the base model)."""
        if self.error is not None:
            raise EngineDead(f"the engine failed earlier: {self.error}")
        if request_id in self._streams or request_id in self.engine.requests:
            raise EngineError(f"request id {request_id!r} is already in use", param="request_id")
        params = self.engine.validate(prompt_token_ids, params)  # static checks: no lock needed
        self.engine.lora_ref(lora)  # unknown adapter: refused now
        if len(self.engine.scheduler.waiting) + self._pending_adds >= self.engine.config.max_waiting:
            raise QueueFull(f"the queue is full ({self.engine.config.max_waiting} waiting requests)")
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        self._pending_adds += 1
        self._inbox.put(("add", request_id, list(prompt_token_ids), params, lora))
        self._wake.set()
        remaining = params.n
        held = None  # taken from the queue while coalescing, but another choice's (or an error)
        interval = max(1, int(self.engine.config.stream_interval))
        started: set[int] = set()  # choices whose first output went out
        holding: dict[int, RequestOutput] = {}  # stream_interval > 1: a choice's outputs not sent yet
        try:
            while remaining:
                item, held = (held, None) if held is not None else (await stream.get(), None)
                if isinstance(item, BaseException):
                    remaining = 0  # nothing of it is left in the engine
                    raise item
                # Coalesce: when the consumer fell behind, this choice's outputs already queued go
                # out as one (one message through Serve and one SSE/gRPC write instead of several).
                while not item.finished and not stream.empty():
                    nxt = stream.get_nowait()
                    if isinstance(nxt, RequestOutput) and nxt.index == item.index:
                        item = merge_outputs(item, nxt)
                    else:
                        held = nxt
                        break
                before = holding.pop(item.index, None)
                if before is not None:
                    item = merge_outputs(before, item)
                if not item.finished and item.index in started and len(item.new_token_ids) < interval:
                    holding[item.index] = item  # stream_interval: wait for the rest of the k tokens
                    continue
                started.add(item.index)
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or one choice); its blocks are freed before the next step."""
        self._inbox.put(("abort", request_id, index))
        self._wake.set()

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the step thread between two steps; its result (or error) on the future."""
        if self._stopped or not self._thread.is_alive():
            raise EngineDead("the engine's step loop has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, future))
        self._wake.set()
        return future

    async def add_lora(self, name: str, path: str) -> LoraRef:
        """Register an adapter (checked against the base model, on the step thread)."""
        return await asyncio.wrap_future(self.call(lambda engine: engine.add_lora(name, path)))

    def remove_lora(self, name: str, ref: LoraRef | None = None) -> None:
        self.engine.remove_lora(name, ref)

    @property
    def alive(self) -> bool:
        """The step loop runs and no step has failed."""
        return self.error is None and self._thread.is_alive()

    def reconfigure(self, change: Callable[[Engine], None]) -> None:
        """Apply `change(engine)` between steps, so a step never sees half a change."""
        with self._lock:
            change(self.engine)

    async def run_pooled(self, req: PooledInput) -> list:
        return await asyncio.wrap_future(self.call(lambda engine: engine.run_pooled(req)))

    def stats(self) -> EngineStats:
        """A snapshot, taken without waiting for the step in progress (counts may be one step old)."""
        for _ in range(3):
            try:
                current = self.engine.refresh_stats()
                return dataclasses.replace(current, finished=dict(current.finished))
            except RuntimeError:  # `finished` grew while being copied: take it again
                continue
        with self._lock:
            current = self.engine.refresh_stats()
            return dataclasses.replace(current, finished=dict(current.finished))

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        while True:  # calls the loop did not take: their callers must not wait forever
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command[0] == "call" and command[2].set_running_or_notify_cancel():
                command[2].set_exception(EngineDead("the engine was shut down"))
        self.engine.executor.shutdown()
