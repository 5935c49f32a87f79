"""The request logic both ingresses share: resolve the model, tokenize, call the Router, detokenize.

The HTTP routes (http_ingress.py) and the gRPC servicer (grpc_ingress.py) are thin shells over a
`Frontend`: they parse their wire format, call these methods, and format the answer. So validation,
tokenization, stop strings, deadlines and error mapping behave the same on both.

Generation: `generate_stream` streams one Router call per prompt. Each choice has its own
incremental detokenizer; stop strings are matched on the detokenized text across token boundaries
and never emitted (a tail that could still become a stop string is held back until it cannot).
When a stop string ends a choice, the choice is aborted on the Router so its KV blocks are freed
at once. Leaving the stream early (client disconnect, deadline) cancels the Router call, which
aborts the request in the engine.

Every error leaves as a `ServeError` (deployments/errors.py); exceptions coming back from a Router
replica (wrapped by Ray) are unwrapped to the ServeError they carry.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from deployments import metrics
from deployments.protocol import (
    DEFAULT_LIMITS,
    InternalError,
    InvalidRequestError,
    Limits,
    ModelNotFoundError,
    finite_logprob,
    QueueFullError,
    RequestTimeoutError,
    ServeError,
    UnavailableError,
    new_id,
    normalize_inputs,
    resolve_max_tokens,
)
from deployments.tool_calls import ParsedToolCall, ToolCallSplitter, finish_reason_with_calls, tail_prefix_length

TASK_BY_ARCHITECTURE = {
    "Qwen2ForCausalLM": "generate",
    "Qwen2ForSequenceClassification": "classify",
    "Qwen2ForTokenClassification": "classify_tokens",
    "Qwen2ForQuestionAnswering": "answer",
    "Qwen2Model": "embed",
}
ANSWER_MAX_SPAN_TOKENS = 30
# How long a Router's "queue full" answers for it (< Retry-After's 1 s); 0 turns the view off.
QUEUE_FULL_HOLD_S = float(os.environ.get("QWEN2_SERVE_QUEUE_FULL_HOLD_S", "0.1"))


@dataclass
class ModelEntry:
    name: str
    path: str
    task: str  # "generate" | "classify" | "classify_tokens" | "answer" | "embed"
    tokenizer: Any  # Qwen2Tokenizer
    router: Any  # DeploymentHandle of the model's Router deployment
    max_model_len: int
    id2label: dict[int, str] = field(default_factory=dict)
    vocab_size: int = 0  # the model's (config.json); 0: unknown, the tokenizer's size is used

    @property
    def num_token_ids(self) -> int:
        """Token ids below this are valid input (the LM head may be padded past the tokenizer)."""
        return max(self.vocab_size, len(self.tokenizer))

    def can(self, task: str | None) -> bool:
        # Every head sits on the decoder, so every model can embed.
        return task is None or task == self.task or task == "embed"


@dataclass
class GenerationDelta:
    index: int
    text: str
    token_ids: list[int]
    # [{token_id, token, logprob, top_logprobs: [{token_id, token, logprob}]}] per token, or None
    logprobs: list[dict] | None
    finish_reason: str | None  # "tool_calls" when the choice stopped after calling tools
    tool_calls: list[ParsedToolCall] = field(default_factory=list)  # finished in this delta; not in `text`


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None
    finish_reason: str | None
    tool_calls: list[ParsedToolCall] = field(default_factory=list)


def to_serve_error(exc: BaseException) -> ServeError:
    """Whatever a Router call raised -> the ServeError to show the client."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:  # RayTaskError(cause=...) chains
        if isinstance(cur, ServeError):
            # Ray's dual-class wrapper is a ServeError too; prefer the plain cause if there is one.
            cause = getattr(cur, "cause", None)
            return cause if isinstance(cause, ServeError) else cur
        cur = getattr(cur, "cause", None) or cur.__cause__
        seen += 1
    name = type(exc).__name__
    try:
        from ray import exceptions as rex
        from ray.serve import exceptions as sex
        if isinstance(exc, sex.BackPressureError):
            return QueueFullError(f"The server is busy ({exc}); retry later", retry_after=1.0)
        if isinstance(exc, (rex.RayActorError, rex.ActorDiedError, rex.ActorUnavailableError)):
            return UnavailableError(f"The model replica is not available: {name}")
        if isinstance(exc, sex.DeploymentUnavailableError):
            return UnavailableError(str(exc))
        if isinstance(exc, (rex.TaskCancelledError,)):
            return UnavailableError("The request was cancelled")
    except ImportError:
        pass
    if isinstance(exc, asyncio.TimeoutError):
        return RequestTimeoutError("The request timed out")
    return InternalError(f"Internal error: {name}: {exc}")


class _Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self.seconds = seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError(f"The request did not finish within {self.seconds:g} seconds")
        return left

    async def run(self, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self.remaining())
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"The request did not finish within {self.seconds:g} seconds") from None


class _ChoiceState:
    """Detokenization and stop-string matching for one choice."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], parse_tool_calls: bool = False):
        from qwen2_model.tokenizer import IncrementalDetokenizer

        # Special tokens (EOS, <|im_end|>) are not part of the text, as in vLLM and OpenAI.
        # (<tool_call> is an added, non-special token in Qwen's vocabulary: it stays in the text.)
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=True)
        self.stop = stop
        self.tool_calls = ToolCallSplitter() if parse_tool_calls else None
        self.echoed = False  # echo: the prompt went out with the choice's first delta
        self.held = ""  # decoded text not yet emitted: it may be the start of a stop string
        self.finished = False
        self.num_output_tokens = 0

    def feed(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        """New token ids -> (text to emit, stopped by a stop string)."""
        text = self.detok.add(token_ids) if token_ids else ""
        if final:
            text += self.detok.flush()
        buf = self.held + text
        if not self.stop:
            self.held = ""
            return buf, False
        hit = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.held = ""
            return buf[:hit], True
        if final:
            self.held = ""
            return buf, False
        keep = max(tail_prefix_length(buf, s) for s in self.stop)  # could still become a stop string
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def split_tool_calls(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        """Emitted text -> (content, finished tool calls); a no-op unless tools are parsed."""
        if self.tool_calls is None:
            return text, []
        events = self.tool_calls.feed(text) + (self.tool_calls.finish() if final else [])
        return "".join(e for e in events if isinstance(e, str)), [e for e in events if not isinstance(e, str)]


def top_label(entry: ModelEntry, probs: list[float]) -> tuple[str, float]:
    """The most probable label of a probability row, and its probability."""
    best = max(range(len(probs)), key=probs.__getitem__)
    return entry.id2label.get(best, f"LABEL_{best}"), float(probs[best])


class Frontend:
    def __init__(self, models: list[ModelEntry], limits: Limits = DEFAULT_LIMITS, request_timeout_s: float = 600):
        if not models:
            raise ValueError("Frontend needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        self.models = list(models)
        self.by_name = {m.name: m for m in models}
        self.limits = limits
        self.request_timeout_s = float(request_timeout_s)
        # Admission view (issue 16): after a Router answered "queue full", new generations for that
        # model are refused here for QUEUE_FULL_HOLD_S without the round trip to the busy replica,
        # so a 429 costs what the ingress costs. Any admitted request's first output clears it.
        self._queue_full_until: dict[str, float] = {}

    # --- models --------------------------------------------------------------------------------

    def resolve(self, model: str | None, task: str | None = None) -> ModelEntry:
        if not model:
            for m in self.models:  # a model whose own task it is, then any that can
                if task is None or m.task == task:
                    metrics.set_request_model(m.name)
                    return m
            for m in self.models:
                if m.can(task):
                    metrics.set_request_model(m.name)
                    return m
            raise InvalidRequestError(f"No served model can do {task!r}; served: "
                                      f"{', '.join(f'{m.name} ({m.task})' for m in self.models)}", param="model")
        entry = self.by_name.get(model)
        if entry is None:
            raise ModelNotFoundError(model, available=list(self.by_name))
        metrics.set_request_model(entry.name)  # the `model` label of this request's error, if any
        if not entry.can(task):
            raise InvalidRequestError(f"The model '{model}' is a {entry.task} model and cannot do {task!r}",
                                      param="model")
        return entry

    def list_models(self) -> list[dict]:
        return [{"id": m.name, "task": m.task, "max_model_len": m.max_model_len, "owned_by": "qwen2-serve",
                 "root": m.path} for m in self.models]

    # --- text ----------------------------------------------------------------------------------

    def render_chat(self, model: str, messages: list[dict], tools=None, add_generation_prompt: bool = True,
                    **template_kwargs) -> str:
        entry = self.resolve(model, "generate")
        template_kwargs.pop("chat_template", None)  # only the model's own template ever runs
        try:
            return entry.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                       tools=tools, **template_kwargs)
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid value for 'messages': {exc}", param="messages") from None

    def tokenize(self, model: str, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.resolve(model).tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, model: str, token_ids: list[int]) -> str:
        entry = self.resolve(model)
        vocab = len(entry.tokenizer)
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"Invalid value for 'tokens': token id {bad[0]} is outside the vocabulary "
                                      f"[0, {vocab})", param="tokens")
        return entry.tokenizer.decode(token_ids)

    def _logprob_entries(self, tokenizer, raw: list[dict | None] | None) -> list[dict] | None:
        if raw is None:
            return None
        out = []
        for lp in raw:
            if lp is None:
                out.append(None)
                continue
            out.append({
                "token_id": lp["token_id"], "token": self._token_text(tokenizer, lp["token_id"]),
                "logprob": finite_logprob(lp["logprob"]),
                "top_logprobs": [{"token_id": t, "token": self._token_text(tokenizer, t), "logprob": finite_logprob(v)}
                                 for t, v in lp.get("top", [])],
            })
        return out

    def _prompt_logprob_entries(self, tokenizer, ids: list[int], raw: list[dict] | None) -> list[dict]:
        """The prompt's tokens as logprob entries: the first has none (nothing predicts it)."""
        first = {"token_id": ids[0], "token": self._token_text(tokenizer, ids[0]), "logprob": None,
                 "top_logprobs": []}
        return [first] + (self._logprob_entries(tokenizer, raw) or [])

    @staticmethod
    def _token_text(tokenizer, token_id: int) -> str:
        # The decoded text of the token (readable, unlike byte-level 'Ġx' forms); ids past the
        # tokenizer's vocabulary (a padded LM head) have no text.
        try:
            return tokenizer.decode([token_id])
        except Exception:
            return ""

    # --- generation ----------------------------------------------------------------------------

    def _prompt_ids(self, entry: ModelEntry, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("Invalid value for 'prompt': must not be empty", param="prompt")
            return entry.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("Invalid value for 'prompt': must not be an empty list", param="prompt")
        # Checked here, before anything uses them: the detokenizer takes 32-bit ids (OverflowError).
        bound = entry.num_token_ids
        bad = next((t for t in ids if not 0 <= t < bound), None)
        if bad is not None:
            raise InvalidRequestError(f"Invalid value for 'prompt': token id {bad} is outside the vocabulary "
                                      f"[0, {bound})", param="prompt")
        return ids

    async def generate_stream(self, model: str, prompt: str | list[int], sampling: dict,
                              request_id: str | None = None, timeout_s: float | None = None,
                              parse_tool_calls: bool = False) -> AsyncIterator[GenerationDelta | Usage]:
        """Deltas for every choice as they come, then one Usage.

        `sampling` is `to_sampling_fields()` output (with "stop"; max_tokens may be None = the rest
        of the context). `timeout_s` (e.g. a gRPC deadline) can only shorten the server's timeout.
        `parse_tool_calls` (chat with tools): <tool_call> blocks leave the text as `tool_calls`.
        `sampling["echo"]` (completions): each choice's first delta starts with the prompt (its text,
        token ids and, with logprobs, the prompt tokens' logprobs, the first one None).
        """
        start = time.monotonic()
        entry = self.resolve(model, "generate")
        if start < self._queue_full_until.get(entry.name, 0.0):
            raise QueueFullError("The server is busy (the model's queue is full); retry later", retry_after=1.0)
        params = dict(sampling)
        stop = list(params.pop("stop", None) or [])
        echo = bool(params.pop("echo", False))
        ids = self._prompt_ids(entry, prompt)
        echo_text = (prompt if isinstance(prompt, str) else entry.tokenizer.decode(ids)) if echo else ""
        params["max_tokens"] = resolve_max_tokens(params.get("max_tokens"), len(ids), entry.max_model_len)
        n = int(params.get("n") or 1)
        request_id = request_id or new_id("req")
        seconds = self.request_timeout_s if timeout_s is None else min(self.request_timeout_s, max(timeout_s, 0.0))
        deadline = _Deadline(seconds)
        states = [_ChoiceState(entry.tokenizer, ids, stop, parse_tool_calls) for _ in range(n)]
        engine_done = [False] * n  # the engine reported a finish_reason for the choice
        remaining = n
        rm = metrics.GenerationMetrics(entry.name, len(ids), start)
        stream = entry.router.options(stream=True).generate.remote(request_id, ids, params)
        try:
            while remaining:
                try:
                    out = await deadline.run(stream.__anext__())
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    err = to_serve_error(exc)
                    if isinstance(err, QueueFullError):
                        self._queue_full_until[entry.name] = time.monotonic() + QUEUE_FULL_HOLD_S
                    if err is exc:
                        raise
                    raise err from None
                if self._queue_full_until:
                    self._queue_full_until.pop(entry.name, None)  # admitted: the queue has room again
                st = states[out["index"]]
                if out["finish_reason"] is not None:
                    engine_done[out["index"]] = True
                if st.finished:
                    continue  # outputs after our own abort (stop string)
                rm.on_output(out["index"], len(out["token_ids"]))
                reason = out["finish_reason"]
                st.num_output_tokens = out["num_output_tokens"]
                text, stopped = st.feed(out["token_ids"], final=reason is not None)
                if stopped:
                    reason = "stop"
                    if out["finish_reason"] is None and remaining > 1:
                        # Other choices go on: abort this one (best effort: with several Router
                        # replicas the call may reach one that does not hold it; the finally below
                        # cancels the stream itself, which always reaches the right replica).
                        await entry.router.abort.remote(request_id, out["index"])
                elif reason == "abort":
                    reason = "stop"
                if reason is not None:
                    st.finished = True
                    remaining -= 1
                    rm.on_choice_end(reason)
                text, calls = st.split_tool_calls(text, final=reason is not None)
                if st.tool_calls is not None:
                    reason = finish_reason_with_calls(reason, st.tool_calls.num_calls)
                token_ids = list(out["token_ids"])
                logprobs = self._logprob_entries(entry.tokenizer, out.get("logprobs"))
                if echo and not st.echoed:
                    st.echoed = True
                    text = echo_text + text
                    token_ids = ids + token_ids
                    if logprobs is not None:
                        logprobs = self._prompt_logprob_entries(entry.tokenizer, ids, out.get("prompt_logprobs")) \
                            + logprobs
                yield GenerationDelta(out["index"], text, token_ids, logprobs, reason, calls)
        finally:
            if not all(engine_done):
                # Left early (disconnect, deadline, error) or ended by a stop string while the engine
                # still generates: cancelling the stream cancels the router's generator on the replica
                # that runs it, which aborts the request there and frees its KV blocks at once.
                try:
                    stream.cancel()
                    entry.router.abort.remote(request_id)  # and by id, in case the cancel is lost
                except Exception:
                    pass
            if remaining:
                for st in states:
                    if not st.finished:
                        rm.on_choice_end("abort")
            rm.on_request_end(completed=not remaining)
        completion = sum(s.num_output_tokens for s in states)
        yield Usage(len(ids), completion, len(ids) + completion)

    async def generate(self, model: str, prompt: str | list[int], sampling: dict, request_id: str | None = None,
                       timeout_s: float | None = None, parse_tool_calls: bool = False) -> tuple[list[Choice], Usage]:
        n = int(sampling.get("n") or 1)
        choices = [Choice(i, "", [], None, None) for i in range(n)]
        texts: list[list[str]] = [[] for _ in range(n)]
        usage = Usage(0, 0, 0)
        agen = self.generate_stream(model, prompt, sampling, request_id, timeout_s, parse_tool_calls)
        try:
            async for item in agen:
                if isinstance(item, Usage):
                    usage = item
                    continue
                c = choices[item.index]
                texts[item.index].append(item.text)
                c.token_ids.extend(item.token_ids)
                c.tool_calls.extend(item.tool_calls)
                if item.logprobs is not None:
                    c.logprobs = (c.logprobs or []) + item.logprobs
                if item.finish_reason is not None:
                    c.finish_reason = item.finish_reason
        finally:
            await agen.aclose()
        for c, t in zip(choices, texts):
            c.text = "".join(t)
        return choices, usage

    # --- one-shot heads ------------------------------------------------------------------------

    async def _pooled(self, entry: ModelEntry, task: str, token_ids: list[list[int]], start: float | None = None,
                      **kw) -> list:
        # Input checks (empty, too long, ids outside the vocabulary) are the Router's, per request.
        deadline = _Deadline(self.request_timeout_s)
        try:
            result = await deadline.run(entry.router.pooled.remote(task, token_ids, **kw))
            metrics.record_pooled(entry.name, sum(len(x) for x in token_ids),
                                  time.monotonic() if start is None else start)
            return result
        except Exception as exc:
            raise to_serve_error(exc) from None

    async def classify(self, model: str, inputs: list[str]) -> tuple[list[dict], Usage]:
        start = time.monotonic()
        entry = self.resolve(model, "classify")
        texts = normalize_inputs(inputs, "input", self.limits)
        ids = [t if isinstance(t, list) else entry.tokenizer.encode(t) for t in texts]
        probs = await self._pooled(entry, "classify", ids, start)
        data = [{"index": i, "label": top_label(entry, p)[0], "probs": p, "num_classes": len(p)}
                for i, p in enumerate(probs)]
        total = sum(len(x) for x in ids)
        return data, Usage(total, 0, total)

    async def classify_tokens(self, model: str, text: str, aggregation: str = "none") -> tuple[list[dict], list[dict]]:
        start = time.monotonic()
        entry = self.resolve(model, "classify_tokens")
        if not text:
            raise InvalidRequestError("Invalid value for 'input': must not be empty", param="input")
        if aggregation not in ("none", "simple"):
            raise InvalidRequestError("Invalid value for 'aggregation': must be 'none' or 'simple'",
                                      param="aggregation")
        ids, offsets = entry.tokenizer.encode_with_offsets(text)
        if not ids:
            raise InvalidRequestError("Invalid value for 'input': no tokens", param="input")
        [probs] = await self._pooled(entry, "classify_tokens", [ids], start)
        tokens = []
        for (first, last), p in zip(offsets, probs):
            label, score = top_label(entry, p)
            tokens.append({"token": text[first:last], "label": label, "score": score, "start": int(first),
                           "end": int(last)})
        entities = group_entities(tokens, text) if aggregation == "simple" else []
        return tokens, entities

    async def answer(self, model: str, question: str, context: str) -> dict:
        start = time.monotonic()
        entry = self.resolve(model, "answer")
        if not question:
            raise InvalidRequestError("Invalid value for 'question': must not be empty", param="question")
        if not context:
            raise InvalidRequestError("Invalid value for 'context': must not be empty", param="context")
        q_ids = entry.tokenizer.encode(question)
        c_ids, c_offsets = entry.tokenizer.encode_with_offsets(context)
        room = entry.max_model_len - len(q_ids)
        if room < 1 or not c_ids:
            raise InvalidRequestError("Invalid value for 'question': leaves no room for the context",
                                      param="question")
        c_ids, c_offsets = c_ids[:room], c_offsets[:room]  # truncate the context, never the question
        [(start_logits, end_logits)] = await self._pooled(entry, "answer", [q_ids + c_ids], start)
        q = len(q_ids)
        s, e = start_logits[q:], end_logits[q:]  # context positions only
        return best_span(s, e, c_offsets, context)

    async def embed(self, model: str, inputs: list[str] | list[list[int]], pooling: str = "last",
                    normalize: bool = True) -> tuple[list[list[float]], Usage]:
        start = time.monotonic()
        entry = self.resolve(model, "embed")
        if pooling not in ("last", "mean"):
            raise InvalidRequestError("Invalid value for 'pooling': must be 'last' or 'mean'", param="pooling")
        batch = normalize_inputs(inputs, "input", self.limits)
        ids = [t if isinstance(t, list) else entry.tokenizer.encode(t) for t in batch]
        vectors = await self._pooled(entry, "embed", ids, start, pooling=pooling, normalize=bool(normalize))
        total = sum(len(x) for x in ids)
        return vectors, Usage(total, 0, total)


# ---------------------------------------------------------------------------------------------
# Post-processing of the one-shot heads


def _split_tag(label: str) -> tuple[str, str]:
    # HF's TokenClassificationPipeline.get_tag: "B-X" / "I-X" -> (bi, X); a bare label is an I-.
    if label.startswith("B-") or label.startswith("I-"):
        return label[0], label[2:]
    return "I", label


def group_entities(tokens: list[dict], text: str) -> list[dict]:
    """HF pipeline's aggregation_strategy="simple": B-/I- runs of one type -> entities; "O" dropped."""
    groups: list[list[dict]] = []
    tags: list[str] = []
    for tok in tokens:
        bi, tag = _split_tag(tok["label"])
        if groups and bi != "B" and tag == tags[-1]:
            groups[-1].append(tok)
        else:
            groups.append([tok])
            tags.append(tag)
    out = []
    for group, tag in zip(groups, tags):
        if tag == "O" or group[0]["label"] == "O":
            continue
        start, end = group[0]["start"], group[-1]["end"]
        out.append({"entity_group": tag, "score": sum(t["score"] for t in group) / len(group),
                    "word": text[start:end].strip(), "start": start, "end": end})
    return out


def best_span(start_logits: list[float], end_logits: list[float], offsets: list[tuple[int, int]], context: str,
              max_len: int = ANSWER_MAX_SPAN_TOKENS) -> dict:
    """The span start <= end < start + max_len maximizing p_start * p_end (softmax over the context)."""
    def softmax(xs: list[float]) -> list[float]:
        m = max(xs)
        ex = [math.exp(x - m) for x in xs]
        z = sum(ex)
        return [x / z for x in ex]

    ps, pe = softmax(start_logits), softmax(end_logits)
    best, bi, bj = -1.0, 0, 0
    for i in range(len(ps)):
        for j in range(i, min(len(pe), i + max_len)):
            score = ps[i] * pe[j]
            if score > best:
                best, bi, bj = score, i, j
    start, end = offsets[bi][0], offsets[bj][1]
    return {"answer": context[start:end], "score": float(best), "start": int(start), "end": int(end)}
