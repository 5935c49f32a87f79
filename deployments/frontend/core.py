"""The request logic both ingresses share: resolve the model, tokenize, call the Router, detokenize.

The HTTP app (deployments/http_api) and the gRPC servicer (deployments/grpc_api) are thin shells
over a `Frontend`: they parse their wire format into `GenerationOptions` / plain arguments, call
these methods with the `ModelEntry` they resolved once, and map the typed results
(deployments/frontend/results.py) onto their responses. So validation, tokenization, stop strings,
deadlines and error mapping behave the same on both.

Generation: `generate_stream` makes one Router call per prompt: `SamplingParams` go in, the
engine's `RequestOutput`s come back, on that call or, when the ingress's shared token stream to the
Router is up, on that stream (deployments/token_streams.py: one message per engine step for all of
this ingress's requests). Each choice has its own incremental detokenizer and stop-string
matcher (frontend/text.py). When a stop string ends a choice, the choice is aborted on the Router so
its KV blocks are freed at once. Leaving the stream early (client disconnect, deadline) cancels the
Router call, which aborts the request in the engine. The context length is the engine's rule: a
prompt that leaves no room comes back from the Router as a ContextLengthExceededError.

Every error leaves as a `ServeError` (deployments/errors.py); exceptions coming back from a Router
replica (wrapped by Ray) are unwrapped to the ServeError they carry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from deployments import metrics
from deployments.errors import (
    QUEUE_FULL_MESSAGE,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    RequestTimeoutError,
    to_serve_error,
)
from deployments.frontend.postprocess import best_span, group_entities, top_label
from deployments.frontend.requests import (
    DEFAULT_LIMITS,
    GenerationOptions,
    Limits,
    finite_logprob,
    invalid,
    new_id,
    normalize_inputs,
)
from deployments.frontend.results import (
    Answer,
    Choice,
    Classification,
    GenerationDelta,
    LogprobEntry,
    ModelCard,
    TokenClassification,
    TokenLabel,
    TopLogprob,
    Usage,
)
from deployments.frontend.reasoning import THINK_END
from deployments.frontend.structured import TOOL_CALL_START, StructuredFieldError, structured_from_fields, tool_call_spec
from deployments.frontend.text import ChoiceText
from deployments.lora_adapters import AdapterCatalog, resolve_adapter
from deployments.token_streams import RouterOutputs, SharedStream
from deployments.frontend.tool_calls import finish_reason_with_calls
from qwen2_model.tasks import ANSWER, CLASSIFY, CLASSIFY_TOKENS, EMBED, GENERATE, REWARD, can_run

READY_TIMEOUT_S = 10.0
# How the token stream comes from the Router (the app arg `router_stream`). "grpc", the default: over
# the inter-deployment gRPC server Serve starts on every replica (`_by_reference=False`), so a streamed
# message skips Ray's object hand-off through both core workers; at 32 streams the Ingress's CPU fell
# ~25% and the model threads' preempted share ~1 point (docs/architecture.md, "The Router's stream
# over gRPC"). "ray": Serve's default, Ray's streaming generator, for clusters whose nodes reach each
# other only on Ray's own ports (Serve's gRPC server listens on a random port).
ROUTER_STREAMS = {"grpc": {"stream": True, "_by_reference": False}, "ray": {"stream": True}}
DEFAULT_ROUTER_STREAM = "grpc"


def check_router_stream(name: str) -> str:
    if name not in ROUTER_STREAMS:
        raise ValueError(f"router_stream must be one of {sorted(ROUTER_STREAMS)}, got {name!r}")
    return name


# How long a Router's "queue full" answers for it (< Retry-After's 1 s); 0 turns the view off.
QUEUE_FULL_HOLD_S = float(os.environ.get("QWEN2_SERVE_QUEUE_FULL_HOLD_S", "0.1"))


@dataclass
class ModelEntry:
    name: str
    path: str
    architecture: str
    task: str  # qwen2_model.tasks: the model's own task
    tokenizer: Any  # Qwen2Tokenizer
    router: Any  # DeploymentHandle of the model's Router deployment
    max_model_len: int
    id2label: dict[int, str] = field(default_factory=dict)
    vocab_size: int = 0  # the model's (config.json); 0: unknown, the tokenizer's size is used
    # generation_config.json's temperature / top_p / top_k / repetition_penalty, for requests that
    # leave them unset (vLLM's generation_config="auto").
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    reasoning_parser: str | None = None  # "deepseek_r1": chat answers' <think> part -> reasoning_content
    # what the Router's model computes in and why ({"dtype", "reason"}): learned from its info()
    compute_dtype: dict | None = None
    step_tag_id: int | None = None  # a process reward model's step tag (qwen2_model/reward.py); else None

    # A LoRA adapter of a base model (deployments/lora_adapters.py): `name` is what the request said,
    # `router` the base's handle with Serve's multiplexed model id set to `lora`, `parent` the base.
    lora: str | None = None
    parent: str | None = None

    @property
    def base_name(self) -> str:
        """The served base model (metrics label, queue-full view): adapters count under their base."""
        return self.parent or self.name

    def __post_init__(self):
        # Structured output after the reasoning: the constraint starts after the `</think>` token.
        token_id = getattr(self.tokenizer, "token_to_id", lambda token: None)
        self.end_think_id = token_id(THINK_END) if self.reasoning_parser else None
        if self.reasoning_parser and self.end_think_id is None:
            raise ValueError(f"model {self.name!r}: reasoning_parser {self.reasoning_parser!r} needs {THINK_END} "
                             f"to be one token of the vocabulary")
        # Forced tool calls ask for the <tool_call> token where the vocabulary has one (Qwen's).
        self.tool_call_token = token_id(TOOL_CALL_START) is not None

    @property
    def num_token_ids(self) -> int:
        """Token ids below this are valid input (the LM head may be padded past the tokenizer)."""
        return max(self.vocab_size, len(self.tokenizer))

    def can(self, task: str | None) -> bool:
        return task is None or can_run(self.architecture, task)


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
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the awaited result when it
        # completes in the same loop iteration as a cancel of the caller, swallowing the cancel (a
        # client's cancelled stream then ran on to max_tokens). It also spares a task per token.
        try:
            async with asyncio.timeout(self.remaining()):
                return await awaitable
        except TimeoutError:
            raise RequestTimeoutError(f"The request did not finish within {self.seconds:g} seconds") from None


def _token_text(tokenizer, token_id: int) -> str:
    # The decoded text of the token (readable, unlike byte-level 'Ġx' forms); ids past the
    # tokenizer's vocabulary (a padded LM head) have no text.
    try:
        return tokenizer.decode([token_id])
    except Exception:
        return ""


def logprob_entries(tokenizer, raw: list) -> list[LogprobEntry | None]:
    """The engine's TokenLogprobs -> entries with the tokens' text."""
    return [None if lp is None else LogprobEntry(
        token_id=lp.token_id, token=_token_text(tokenizer, lp.token_id), logprob=finite_logprob(lp.logprob),
        top_logprobs=[TopLogprob(t, _token_text(tokenizer, t), finite_logprob(v)) for t, v in lp.top]) for lp in raw]


class Frontend:
    def __init__(self, models: list[ModelEntry], limits: Limits = DEFAULT_LIMITS, request_timeout_s: float = 600,
                 adapters: dict[str, AdapterCatalog] | None = None, router_stream: str = DEFAULT_ROUTER_STREAM,
                 shared_stream: bool = False):
        self._stream_options = ROUTER_STREAMS[check_router_stream(router_stream)]  # for the Router handle's generate
        # One token stream per Router deployment for all of this ingress's requests
        # (deployments/token_streams.py); base model name -> its SharedStream, opened on first use.
        self.shared_stream = bool(shared_stream)
        self._shared: dict[str, SharedStream] = {}
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
        self.adapters = {k: v for k, v in (adapters or {}).items() if v.enabled}  # base name -> its LoRA adapters
        self._adapter_entries: dict[tuple[str, str], ModelEntry] = {}

    # --- models --------------------------------------------------------------------------------

    def resolve(self, model: str | None, task: str | None = None) -> ModelEntry:
        """The served model a request names (None: the first whose own task it is, then any that
        can do it); sets the `model` label of this request's metrics."""
        if not model:
            candidates = [m for m in self.models if task is None or m.task == task] or \
                         [m for m in self.models if m.can(task)]
            if not candidates:
                raise InvalidRequestError(f"No served model can do {task!r}; served: "
                                          f"{', '.join(f'{m.name} ({m.task})' for m in self.models)}", param="model")
            entry = candidates[0]
        else:
            entry = self.by_name.get(model) or self._adapter_entry(model)
            if entry is None:
                raise ModelNotFoundError(model, available=[c.id for c in self.list_models()])
            if entry.lora is not None and task not in (None, GENERATE):
                raise InvalidRequestError(f"The model '{model}' is a LoRA adapter: adapters apply to generation "
                                          f"only, not {task!r}", param="model")
        metrics.set_request_model(entry.base_name)  # the `model` label of this request's error, if any
        if not entry.can(task):
            raise InvalidRequestError(f"The model '{entry.name}' is a {entry.task} model and cannot do {task!r}",
                                      param="model")
        return entry

    def _adapter_entry(self, model: str) -> ModelEntry | None:
        """`adapter` or `base:adapter` -> the base's entry for that adapter; None if it names none."""
        hit = resolve_adapter(model, self.adapters)
        if hit is None:
            return None
        base, adapter = hit
        key = (model, adapter)
        if key not in self._adapter_entries:
            b = self.by_name[base]
            self._adapter_entries[key] = dataclasses.replace(
                b, name=model, path=self.adapters[base].path_of(adapter), lora=adapter, parent=base,
                router=b.router.options(multiplexed_model_id=adapter))  # Serve routes to a replica holding it
        return self._adapter_entries[key]

    def list_models(self) -> list[ModelCard]:
        cards = [self.model_card(m) for m in self.models]
        for base, catalog in self.adapters.items():
            b = self.by_name[base]
            cards += [ModelCard(id=name, task=b.task, max_model_len=b.max_model_len, root=catalog.path_of(name),
                                parent=base) for name in catalog.names()]
        return cards

    @staticmethod
    def model_card(m: ModelEntry) -> ModelCard:
        return ModelCard(id=m.name, task=m.task, max_model_len=m.max_model_len, root=m.path,
                         sampling_defaults=dict(m.sampling_defaults), reasoning_parser=m.reasoning_parser,
                         parent=m.parent, compute_dtype=m.compute_dtype)

    async def ready(self) -> dict[str, dict]:
        """Every Router's info (the readiness probe of /ready and grpc.health.v1); raises when one
        does not answer or its engine died."""
        infos = {}
        for m in self.models:
            async with asyncio.timeout(READY_TIMEOUT_S):  # not wait_for: see _Deadline.run
                infos[m.name] = await m.router.info.remote()
            m.compute_dtype = infos[m.name].get("compute_dtype")
        return infos

    async def learn_compute_dtypes(self) -> None:
        """Ask each Router whose compute dtype is not known yet (for /v1/models); one that does not
        answer in time stays unknown and is asked again next time."""
        for m in self.models:
            if m.compute_dtype is None:
                try:
                    async with asyncio.timeout(READY_TIMEOUT_S):
                        info = await m.router.info.remote()
                except Exception:  # noqa: BLE001 - an unready Router: the card says null, /ready says why
                    continue
                m.compute_dtype = info.get("compute_dtype")

    def _shared_stream(self, entry: ModelEntry) -> SharedStream | None:
        if not self.shared_stream:
            return None
        shared = self._shared.get(entry.base_name)
        if shared is None:  # on the base's handle: adapters' requests reach the same replicas
            shared = self._shared[entry.base_name] = SharedStream(self.by_name[entry.base_name].router,
                                                                  self._stream_options)
        return shared

    # --- text ----------------------------------------------------------------------------------

    def render_chat(self, entry: ModelEntry, messages: list[dict], tools=None, add_generation_prompt: bool = True,
                    **template_kwargs) -> str:
        template_kwargs.pop("chat_template", None)  # only the model's own template ever runs
        try:
            return entry.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                       tools=tools, **template_kwargs)
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid value for 'messages': {exc}", param="messages") from None

    def tokenize(self, entry: ModelEntry, text: str, add_special_tokens: bool = False) -> list[int]:
        return entry.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, entry: ModelEntry, token_ids: list[int], param: str = "tokens") -> str:
        vocab = len(entry.tokenizer)
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise invalid(param, f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return entry.tokenizer.decode(token_ids)

    # --- generation ----------------------------------------------------------------------------

    def _prompt_ids(self, entry: ModelEntry, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise invalid("prompt", "must not be empty")
            return entry.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise invalid("prompt", "must not be an empty list")
        # Checked here, before anything uses them: the detokenizer takes 32-bit ids (OverflowError).
        bound = entry.num_token_ids
        bad = next((t for t in ids if not 0 <= t < bound), None)
        if bad is not None:
            raise invalid("prompt", f"token id {bad} is outside the vocabulary [0, {bound})")
        return ids

    def _with_model_options(self, entry: ModelEntry, options: GenerationOptions,
                            parse_reasoning: bool) -> GenerationOptions:
        """The model's sampling defaults for the fields the client left unset, and the request's
        output constraint (checked here: 400 naming the field) on `options.sampling`."""
        sampling = options.sampling
        if entry.sampling_defaults and options.explicit is not None:
            unset = {k: v for k, v in entry.sampling_defaults.items() if k not in options.explicit}
            if unset:
                sampling = dataclasses.replace(sampling, **unset)
        sr = options.structured
        if sr is not None:
            try:
                tool_spec = tool_call_spec(sr.tools, sr.tool_choice, entry.tool_call_token)
                found = structured_from_fields(sr.response_format, sr.structured_outputs, sr.guided, tool_spec,
                                               start_after_token=entry.end_think_id if parse_reasoning else None)
            except StructuredFieldError as exc:
                raise invalid(exc.param, str(exc).split(": ", 1)[1]) from None
            if found is not None:
                sampling = dataclasses.replace(sampling, structured=found[1])
        if sampling is options.sampling:
            return options
        return dataclasses.replace(options, sampling=sampling)

    async def generate_stream(self, entry: ModelEntry, prompt: str | list[int], options: GenerationOptions,
                              request_id: str | None = None, timeout_s: float | None = None,
                              parse_tool_calls: bool = False,
                              parse_reasoning: bool = False) -> AsyncIterator[GenerationDelta | Usage]:
        """Deltas for every choice as they come, then one Usage.

        `timeout_s` (e.g. a gRPC deadline) can only shorten the server's timeout. `parse_tool_calls`
        (chat with tools): <tool_call> blocks leave the text as `tool_calls`. `options.echo`
        (completions): each choice's first delta starts with the prompt (its text, token ids and,
        with logprobs, the prompt tokens' logprobs, the first one None).
        """
        start = time.monotonic()
        if start < self._queue_full_until.get(entry.base_name, 0.0):
            raise QueueFullError(QUEUE_FULL_MESSAGE, retry_after=1.0)
        parse_reasoning = parse_reasoning and entry.reasoning_parser is not None
        options = self._with_model_options(entry, options, parse_reasoning)
        options.validate(self.limits)
        sampling = options.sampling
        ids = self._prompt_ids(entry, prompt)
        echo_text = (prompt if isinstance(prompt, str) else entry.tokenizer.decode(ids)) if options.echo else ""
        n = sampling.n
        request_id = request_id or new_id("req")
        seconds = self.request_timeout_s if timeout_s is None else min(self.request_timeout_s, max(timeout_s, 0.0))
        deadline = _Deadline(seconds)
        states = [ChoiceText(entry.tokenizer, ids, options.stop, parse_tool_calls, parse_reasoning) for _ in range(n)]
        engine_done = [False] * n  # the engine reported a finish_reason for the choice
        remaining = n
        rm = metrics.GenerationMetrics(entry.base_name, len(ids), start)
        shared = self._shared_stream(entry)
        via = shared.via(request_id) if shared is not None else None
        try:
            stream = entry.router.options(**self._stream_options).generate.remote(
                request_id, ids, sampling, **({"via": via} if via else {}))
        except BaseException:
            if via:
                shared.release(request_id)
            raise
        outputs = RouterOutputs(stream, shared, request_id)
        try:
            while remaining:
                try:
                    out = await deadline.run(outputs.next())
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    err = to_serve_error(exc)
                    if isinstance(err, QueueFullError):
                        self._queue_full_until[entry.base_name] = time.monotonic() + QUEUE_FULL_HOLD_S
                    if err is exc:
                        raise
                    raise err from None
                if self._queue_full_until:
                    self._queue_full_until.pop(entry.base_name, None)  # admitted: the queue has room again
                st = states[out.index]
                if out.finish_reason is not None:
                    engine_done[out.index] = True
                if st.finished:
                    continue  # outputs after our own abort (stop string)
                rm.on_output(out.index, len(out.new_token_ids))
                reason = out.finish_reason
                st.num_output_tokens = out.num_output_tokens
                text, stopped = st.feed(out.new_token_ids, final=reason is not None)
                if stopped:
                    reason = "stop"
                    if out.finish_reason is None and remaining > 1:
                        # Other choices go on: abort this one (best effort: with several Router
                        # replicas the call may reach one that does not hold it; the finally below
                        # cancels the stream itself, which always reaches the right replica).
                        await entry.router.abort.remote(request_id, out.index)
                elif reason == "abort":
                    reason = "stop"
                if reason is not None:
                    st.finished = True
                    remaining -= 1
                    rm.on_choice_end(reason)
                reasoning, text = st.split_reasoning(text, final=reason is not None)
                text, calls = st.split_tool_calls(text, final=reason is not None)
                if st.tool_calls is not None:
                    reason = finish_reason_with_calls(reason, st.tool_calls.num_calls)
                token_ids = list(out.new_token_ids)
                logprobs = None
                if sampling.logprobs is not None:
                    logprobs = logprob_entries(entry.tokenizer, out.new_logprobs)
                if options.echo and not st.echoed:
                    st.echoed = True
                    text = echo_text + text
                    token_ids = ids + token_ids
                    if logprobs is not None:
                        first = LogprobEntry(ids[0], _token_text(entry.tokenizer, ids[0]), None)
                        logprobs = [first] + logprob_entries(entry.tokenizer, out.prompt_logprobs or []) + logprobs
                yield GenerationDelta(out.index, text, token_ids, logprobs, reason, calls, reasoning)
        finally:
            outputs.close(cancel=not all(engine_done))
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

    async def generate(self, entry: ModelEntry, prompt: str | list[int], options: GenerationOptions,
                       request_id: str | None = None, timeout_s: float | None = None,
                       parse_tool_calls: bool = False, parse_reasoning: bool = False) -> tuple[list[Choice], Usage]:
        n = options.sampling.n
        choices = [Choice(i, "", [], None, None) for i in range(n)]
        texts: list[list[str]] = [[] for _ in range(n)]
        thoughts: list[list[str]] = [[] for _ in range(n)]
        usage = Usage(0, 0, 0)
        agen = self.generate_stream(entry, prompt, options, request_id, timeout_s, parse_tool_calls, parse_reasoning)
        try:
            async for item in agen:
                if isinstance(item, Usage):
                    usage = item
                    continue
                c = choices[item.index]
                texts[item.index].append(item.text)
                thoughts[item.index].append(item.reasoning)
                c.token_ids.extend(item.token_ids)
                c.tool_calls.extend(item.tool_calls)
                if item.logprobs is not None:
                    c.logprobs = (c.logprobs or []) + item.logprobs
                if item.finish_reason is not None:
                    c.finish_reason = item.finish_reason
        finally:
            await agen.aclose()
        for c, t, r in zip(choices, texts, thoughts):
            c.text = "".join(t)
            c.reasoning_content = "".join(r) or None
        return choices, usage

    # --- one-shot heads ------------------------------------------------------------------------

    async def _pooled(self, entry: ModelEntry, task: str, token_ids: list[list[int]], start: float, **kw) -> list:
        # Input checks (empty, too long, ids outside the vocabulary) are the Router's, per request.
        deadline = _Deadline(self.request_timeout_s)
        try:
            result = await deadline.run(entry.router.pooled.remote(task, token_ids, **kw))
        except Exception as exc:
            raise to_serve_error(exc) from None
        metrics.record_pooled(entry.base_name, sum(len(x) for x in token_ids), start)
        return result

    def _input_ids(self, entry: ModelEntry, inputs) -> list[list[int]]:
        batch = normalize_inputs(inputs, "input", self.limits)
        return [t if isinstance(t, list) else entry.tokenizer.encode(t) for t in batch]

    async def classify(self, entry: ModelEntry, inputs) -> tuple[list[Classification], Usage]:
        start = time.monotonic()
        ids = self._input_ids(entry, inputs)
        probs = await self._pooled(entry, CLASSIFY, ids, start)
        data = [Classification(i, top_label(entry.id2label, p)[0], p, len(p)) for i, p in enumerate(probs)]
        total = sum(len(x) for x in ids)
        return data, Usage(total, 0, total)

    async def classify_tokens(self, entry: ModelEntry, text: str, aggregation: str = "none") -> TokenClassification:
        start = time.monotonic()
        if not text:
            raise invalid("input", "must not be empty")
        if aggregation not in ("none", "simple"):
            raise invalid("aggregation", "must be 'none' or 'simple'")
        ids, offsets = entry.tokenizer.encode_with_offsets(text)
        if not ids:
            raise invalid("input", "no tokens")
        [probs] = await self._pooled(entry, CLASSIFY_TOKENS, [ids], start)
        tokens = []
        for (first, last), p in zip(offsets, probs):
            label, score = top_label(entry.id2label, p)
            tokens.append(TokenLabel(text[first:last], label, score, int(first), int(last)))
        entities = group_entities(tokens, text) if aggregation == "simple" else []
        return TokenClassification(tokens, entities, Usage(len(tokens), 0, len(tokens)))

    async def answer(self, entry: ModelEntry, question: str, context: str) -> Answer:
        start = time.monotonic()
        if not question:
            raise invalid("question", "must not be empty")
        if not context:
            raise invalid("context", "must not be empty")
        q_ids = entry.tokenizer.encode(question)
        c_ids, c_offsets = entry.tokenizer.encode_with_offsets(context)
        room = entry.max_model_len - len(q_ids)
        if room < 1 or not c_ids:
            raise invalid("question", "leaves no room for the context")
        c_ids, c_offsets = c_ids[:room], c_offsets[:room]  # truncate the context, never the question
        [(start_logits, end_logits)] = await self._pooled(entry, ANSWER, [q_ids + c_ids], start)
        q = len(q_ids)
        return best_span(start_logits[q:], end_logits[q:], c_offsets, context)  # context positions only

    async def embed(self, entry: ModelEntry, inputs, pooling: str = "last",
                    normalize: bool = True) -> tuple[list[list[float]], Usage]:
        start = time.monotonic()
        if pooling not in ("last", "mean"):
            raise invalid("pooling", "must be 'last' or 'mean'")
        ids = self._input_ids(entry, inputs)
        vectors = await self._pooled(entry, EMBED, ids, start, pooling=pooling, normalize=bool(normalize))
        total = sum(len(x) for x in ids)
        return vectors, Usage(total, 0, total)

    async def reward(self, entry: ModelEntry, inputs) -> tuple[list[list[list[float]]], Usage]:
        """Reward models (vLLM's /pooling): per input, a reward per token ([S, 1], Qwen2ForRewardModel)
        or the label probabilities at each step tag ([steps, 2], Qwen2ForProcessRewardModel). An input
        of a process reward model without its step tag has nothing to score: 400 naming it."""
        start = time.monotonic()
        ids = self._input_ids(entry, inputs)
        tag = entry.step_tag_id
        if tag is not None:
            missing = next((i for i, row in enumerate(ids) if tag not in row), None)
            if missing is not None:
                raise invalid(f"input.{missing}" if len(ids) > 1 else "input",
                              f"has no step tag: a process reward model scores each step ending with token "
                              f"{tag} ({_token_text(entry.tokenizer, tag)!r})")
        rows = await self._pooled(entry, REWARD, ids, start)
        total = sum(len(x) for x in ids)
        return rows, Usage(total, 0, total)
