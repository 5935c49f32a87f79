"""Constrained decoding (JSON schema, regex, choice, Lark grammar) on llguidance.

The engine speaks token ids only, so everything here works on ids and on an `llguidance.LLTokenizer`
built once from the checkpoint's `tokenizer.json` (the token -> bytes table the masks need).

- `StructuredOutput` is the per-request spec carried on `SamplingParams.structured`: a kind
  ("json", "json_object", "regex", "choice", "grammar") and its text, plus `start_after_token`
  for reasoning models (the constraint starts once that token, `</think>`, was generated).
  `to_grammar()` turns it into llguidance's grammar string; `StructuredOutputError` names the
  problem (the ingress maps it onto the request field it came from).
- `GrammarBackend` owns the LLTokenizer, compiles and validates grammars (an LRU of compiled,
  pristine matchers: a request's n choices and repeated schemas compile once; each sequence gets a
  `deep_copy`) and a one-thread pool in which masks are computed.
- `GrammarBatch` is the sampling rank's per-sequence state: one matcher per sequence (so n > 1 has
  one per choice), advanced with each sampled token. `start(seqs)` submits this step's mask
  computation to the pool *before* the forward runs (llguidance releases the GIL, and fans the
  rows out over its own threads), `masks(...)` waits for it after the forward, `advance(...)`
  consumes the sampled tokens. The state lives as long as the sequence: preemption (recompute)
  does not touch it, since a recomputed sequence keeps its generated tokens.

Masks are int32 bitmasks `[R, ceil(V / 32)]` over the *model's* vocabulary `V` (Qwen pads its LM
head past the tokenizer: 151936 vs 151665 ids); ids without bytes (the padding) are never allowed.
EOS is allowed exactly when the grammar is in an accepting state; a grammar that completes
(`is_stopped`) ends its sequence with finish_reason "stop" at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# A schema / regex / grammar text over this many characters is refused (the ingress has its own
# body-size cap; this bounds compile time and memory per request).
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 1024
# JSON the way Qwen (and Python's json.dumps) writes it: ", " and ": ", no free whitespace. Free
# whitespace lets a weak model pad forever; a schema may still ask for it with "x-guidance".
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(ValueError):
    """A spec that cannot be used: bad JSON, bad regex / grammar / schema, too large."""


@dataclass(frozen=True)
class StructuredOutput:
    """What one request's output must match. `value`: a JSON schema (as JSON text) for "json",
    a regex, a JSON list of strings for "choice", a Lark grammar for "grammar"; unused for
    "json_object" (any JSON object)."""
    kind: str
    value: str = ""
    start_after_token: int | None = None  # reasoning models: constrain after this token (</think>)

    def to_grammar(self) -> str:
        """llguidance's grammar string (not yet checked against a tokenizer: see GrammarBackend)."""
        import llguidance

        if self.kind not in KINDS:
            raise StructuredOutputError(f"unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if len(self.value) > MAX_SPEC_CHARS:
            raise StructuredOutputError(f"is {len(self.value)} characters, over the limit of {MAX_SPEC_CHARS}")
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
        if self.kind == "json":
            try:
                schema = json.loads(self.value)
            except json.JSONDecodeError as exc:
                raise StructuredOutputError(f"is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise StructuredOutputError(f"must be a JSON object (a JSON schema), got {type(schema).__name__}")
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
            except (ValueError, TypeError) as exc:
                raise StructuredOutputError(f"is not a usable JSON schema: {exc}") from None
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            try:
                choices = json.loads(self.value)
            except json.JSONDecodeError as exc:
                raise StructuredOutputError(f"is not a JSON list of strings: {exc}") from None
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise StructuredOutputError("must be a non-empty list of non-empty strings")
            if len(choices) > MAX_CHOICES:
                raise StructuredOutputError(f"has {len(choices)} choices, over the limit of {MAX_CHOICES}")
            # json.dumps gives a valid Lark string literal (quotes and backslashes escaped).
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        return llguidance.LLMatcher.grammar_from_lark(self.value)


class GrammarBackend:
    """The LLTokenizer for one model, compiled grammars, and the pool that computes masks.

    `tokenizer_json`: the `tokenizers` JSON text (e.g. `Qwen2Tokenizer.backend.to_str()`, so added
    tokens from tokenizer_config.json are included). `vocab_size`: the model's (LM head) width.
    `eos_token_ids`: what the engine stops on; a grammar in an accepting state allows all of them.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], cache_size: int = 64):
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words per mask row
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids) or None)
        self._compiled: OrderedDict[str, object] = OrderedDict()  # grammar -> pristine LLMatcher
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # One Python thread calls llguidance's own parallel executor (which fans rows out).
        self.executor = llguidance.LLExecutor()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")

    @classmethod
    def from_pretrained(cls, tokenizer_path: str | Path, vocab_size: int, eos_token_ids: list[int]) -> "GrammarBackend":
        """From a checkpoint's tokenizer files (tokenizer_config.json's added tokens included)."""
        from ..tokenizer import Qwen2Tokenizer

        return cls(Qwen2Tokenizer.from_pretrained(tokenizer_path).backend.to_str(), vocab_size, eos_token_ids)

    @classmethod
    def maybe_from_pretrained(cls, tokenizer_path: str | Path, vocab_size: int,
                              eos_token_ids: list[int]) -> "GrammarBackend | None":
        """As from_pretrained, or None (logged) when the checkpoint has no tokenizer: no structured output."""
        path = Path(tokenizer_path)
        if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            log.warning("no tokenizer in %s: structured output is off for this model", path)
            return None
        return cls.from_pretrained(path, vocab_size, eos_token_ids)

    def compile(self, spec: StructuredOutput) -> object:
        """A fresh matcher for `spec` (compiled once, then copied); StructuredOutputError if bad."""
        grammar = spec.to_grammar()
        with self._lock:
            pristine = self._compiled.get(grammar)
            if pristine is not None:
                self._compiled.move_to_end(grammar)
                return pristine.deep_copy()
        # Compiling drops the GIL (it can take 100s of ms for a huge grammar): not under the lock.
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(_clean(matcher.get_error()))
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return matcher.deep_copy()

    def validate(self, spec: StructuredOutput) -> None:
        """Raise StructuredOutputError naming what is wrong (compiles and caches the grammar)."""
        self.compile(spec)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _clean(message: str) -> str:
    return " ".join(message.split())[:500]


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """In place: logits[rows[j], t] = -inf where bit t of bitmask[j] is 0. logits [B, V], bitmask [R, W]."""
    V = logits.shape[-1]
    bitmask = bitmask.to(logits.device, non_blocking=True)  # ship the packed words, unpack where the logits are
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [R, W, 32]
    allowed = bits.view(len(rows), -1)[:, :V].bool()  # [R, V]
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


class _SeqGrammar:
    __slots__ = ("matcher", "start_after", "armed", "error")

    def __init__(self, matcher, start_after: int | None):
        self.matcher, self.start_after = matcher, start_after
        self.armed = start_after is None  # reasoning: constrained only after the end-of-reasoning token
        self.error = None if matcher is not None else "the grammar failed to compile"


class GrammarBatch:
    """Per-sequence matchers on the sampling rank, and this step's masks (see the module doc)."""

    def __init__(self, backend: GrammarBackend):
        self.backend = backend
        self.seqs: dict[int, _SeqGrammar] = {}
        self._pending: tuple[list[int], Future] | None = None  # this step's constrained seq ids, mask job
        self.mask_seconds = 0.0  # time spent computing masks (in the pool), cumulative
        self.wait_seconds = 0.0  # time the step waited for them after the forward, cumulative

    def forget(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def start(self, sampled: list[tuple[int, StructuredOutput]]) -> None:
        """Before the forward: submit the masks for this step's constrained sampled sequences."""
        rows: list[int] = []
        for seq_id, spec in sampled:
            state = self.seqs.get(seq_id)
            if state is None:
                # The spec was validated at admission; compiling again hits the backend's cache.
                try:
                    matcher = self.backend.compile(spec)
                except StructuredOutputError as exc:
                    matcher = None
                    log.warning("grammar of sequence %d failed to compile: %s", seq_id, exc)
                state = self.seqs[seq_id] = _SeqGrammar(matcher, spec.start_after_token)
            if state.armed and state.matcher is not None:
                rows.append(seq_id)
        self._pending = None
        if rows:
            matchers = [(self.seqs[s].matcher, j) for j, s in enumerate(rows)]
            self._pending = (rows, self.backend.pool.submit(self._fill, matchers))

    def _fill(self, matchers: list[tuple[object, int]]) -> torch.Tensor:
        t0 = time.perf_counter()
        bitmask = torch.empty(len(matchers), self.backend.words, dtype=torch.int32)  # [R, W]
        self.backend.executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), self.backend.words * 4,
                                                      len(matchers))
        self.mask_seconds += time.perf_counter() - t0
        return bitmask

    def masks(self) -> dict[int, torch.Tensor]:
        """After the forward: seq id -> its mask row [W] (only sequences whose constraint is active)."""
        if self._pending is None:
            return {}
        rows, future = self._pending
        self._pending = None
        t0 = time.perf_counter()
        bitmask = future.result()
        self.wait_seconds += time.perf_counter() - t0
        return {seq_id: bitmask[j] for j, seq_id in enumerate(rows)}

    def advance(self, seq_id: int, token: int) -> bool:
        """Consume a sampled token; True when the sequence must end here (grammar complete or broken)."""
        state = self.seqs.get(seq_id)
        if state is None:
            return False
        if state.error is not None:
            return True
        if not state.armed:
            state.armed = token == state.start_after
            return False
        m = state.matcher
        if not m.consume_token(token):
            state.error = _clean(m.get_error())
            log.warning("sequence %d left its grammar: %s", seq_id, state.error)
            return True
        return m.is_stopped()
