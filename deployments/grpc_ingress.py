"""gRPC ingress: the Qwen2Serve service's methods on the ingress deployment, behind Serve's gRPC proxy.

Serve's gRPC proxy (configured with `grpc_servicer_functions`) receives the call, deserializes the
request with the generated stubs and calls the ingress deployment's method named like the RPC,
passing the request proto and, because the parameter is called `grpc_context`, a
`RayServegRPCContext` (metadata in, code / details / trailing metadata out). `GrpcIngressMixin`
holds those methods; deployments/app.py mixes it into the one ingress deployment next to the
FastAPI app, so HTTP and gRPC share `self.frontend` (validation, tokenization, the router handle).

Contract (DESIGN.md, "Wire contract"):
- Same fields, defaults and limits as HTTP: sampling goes through `protocol.to_sampling_fields`,
  inputs through `protocol.normalize_inputs`, the message size through `check_body_size`.
- `GenerateRequest` takes exactly one of `prompt`, `prompt_token_ids`, `messages`; `messages`
  means chat style (the chat template is applied, max_tokens defaults to the rest of the context;
  `tools_json` reaches the template and the model's calls come back in `tool_calls`), the others
  completion style (`echo` puts the prompt first).
- Every `ServeError` becomes its gRPC status with details naming the field (`grpc_details()`),
  plus `retry-after` trailing metadata for a full queue. Unary RPCs set the code on the context and
  return an empty message (so trailing metadata travels too); the streaming RPC sets the code and
  raises, which Serve turns into that status (Serve drops trailing metadata on that path).
- API key: `authorization: Bearer <key>` in the call metadata -> UNAUTHENTICATED otherwise.
- `x-request-timeout: <seconds>` call metadata shortens the server's generation timeout, as the
  HTTP header does (-> DEADLINE_EXCEEDED).
- Client cancellation of GenerateStream: Serve cancels this generator; we close the frontend
  stream, which aborts the request on the router and frees its KV blocks.
- `grpc.health.v1.Health/Check` (and a one-shot `Watch`) when the proxy is given
  `grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server` too.

Request bytes: with the servicer function of deployments/grpc_raw.py (what the CLI, the tests and
serve_config.yaml use) Serve's proxy hands the methods the raw request bytes, which are decoded here
(`decode_request`): bytes that do not decode are INVALID_ARGUMENT. With the generated
`add_Qwen2ServeServicer_to_server` the methods get the parsed message, and such bytes fail in the
proxy with UNKNOWN before reaching us.

The conversion helpers are module-level functions so tests/unit/test_grpc_mapping.py can check
them without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from deployments import metrics
from deployments.errors import (
    InvalidRequestError,
    ServeError,
    check_api_key,
)
from deployments.frontend import to_serve_error  # the one mapping of router / Ray failures, as over HTTP
from deployments.protocol import (
    DEFAULT_LIMITS,
    Limits,
    check_body_size,
    check_json_value,
    check_tool_choice,
    new_id,
    normalize_inputs,
    parse_request_timeout,
    to_sampling_fields,
)
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb

logger = logging.getLogger("qwen2_serve.grpc")

SERVICE_NAME = "qwen2_serve.v1.Qwen2Serve"
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
AGGREGATIONS = ("none", "simple")
POOLINGS = ("last", "mean")


# ---------------------------------------------------------------------------------------------
# Errors


def apply_error(grpc_context: Any, err: ServeError) -> None:
    """Write a ServeError onto a (RayServe)gRPC context: code, details, trailing metadata.

    Every failed RPC passes here exactly once, so this is where qwen2_errors counts it."""
    metrics.count_error(err.code.value)
    if grpc_context is None:
        return
    grpc_context.set_code(err.grpc_status())
    grpc_context.set_details(err.grpc_details())
    trailing = list(err.grpc_trailing_metadata()) + [("error-code", err.code.value)]
    if err.param:
        trailing.append(("error-param", err.param))
    grpc_context.set_trailing_metadata(trailing)


TIMEOUT_METADATA = "x-request-timeout"  # seconds, as HTTP's header; may only shorten the server's timeout


def request_timeout(grpc_context: Any) -> float | None:
    """The `x-request-timeout` call metadata in seconds (None when absent), validated as over HTTP.

    (A gRPC deadline itself is not visible behind Serve's proxy; when it passes, the client
    cancels the call, which cancels the request here.)"""
    return parse_request_timeout(metadata_value(grpc_context, TIMEOUT_METADATA), TIMEOUT_METADATA, "metadata")


def metadata_value(grpc_context: Any, key: str) -> str | None:
    """The (last) value of a call metadata key, case-insensitive; None when absent."""
    if grpc_context is None:
        return None
    value = None
    for k, v in grpc_context.invocation_metadata() or ():
        if k.lower() == key:
            value = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return value


# ---------------------------------------------------------------------------------------------
# Requests -> frontend arguments


def _invalid(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid value for '{param}': {message}", param=param)


def decode_request(request: Any, message_class: type) -> Any:
    """Raw request bytes (deployments/grpc_raw.py) -> the message; a message passes through.

    Bytes that are not a valid `message_class` (corrupt wire format, a string field that is not
    UTF-8) -> InvalidRequestError, so the client gets INVALID_ARGUMENT naming the problem."""
    if isinstance(request, message_class):
        return request
    if not isinstance(request, (bytes, bytearray, memoryview)):
        raise InvalidRequestError(f"Expected a {message_class.DESCRIPTOR.full_name} message")
    try:
        return message_class.FromString(bytes(request))
    except Exception as e:  # noqa: BLE001  (DecodeError, or anything else the parser raises)
        raise InvalidRequestError(f"The request is not a valid {message_class.DESCRIPTOR.full_name} message: "
                                  f"{e}") from None


def model_arg(model: str) -> str | None:
    """Proto's empty string means "the served model" (HTTP's None)."""
    return model or None


def generate_input(request: pb.GenerateRequest) -> tuple[str, str | list[int] | list[dict[str, str]]]:
    """("prompt", str) | ("prompt_token_ids", [ids]) | ("messages", [{role, content}]).

    Exactly one of the three must be set; a oneof cannot hold repeated fields, so it is checked here.
    """
    given = [name for name, present in (
        ("prompt", bool(request.prompt)),
        ("prompt_token_ids", len(request.prompt_token_ids) > 0),
        ("messages", len(request.messages) > 0),
    ) if present]
    if len(given) != 1:
        detail = "none was set" if not given else f"got {' and '.join(given)}"
        raise InvalidRequestError(
            f"Exactly one of 'prompt', 'prompt_token_ids', 'messages' must be set; {detail}",
            param=given[-1] if given else "prompt",
        )
    kind = given[0]
    if kind == "prompt":
        return kind, request.prompt
    if kind == "prompt_token_ids":
        return kind, [int(t) for t in request.prompt_token_ids]
    messages = []
    for i, m in enumerate(request.messages):
        if m.role not in CHAT_ROLES:
            raise _invalid(f"messages.{i}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        messages.append({"role": m.role, "content": m.content})
    return kind, messages


def chat_tools(request: pb.GenerateRequest, kind: str, limits: Limits = DEFAULT_LIMITS) -> tuple[list[dict] | None, bool]:
    """`tools_json` / `tool_choice` -> (tools for the chat template, parse tool calls?), as HTTP's."""
    if not request.tools_json:
        if request.tool_choice:
            _check_tool_choice(request.tool_choice)
        return None, False
    if kind != "messages":
        raise _invalid("tools_json", "only goes with 'messages' (chat)")
    try:
        tools = json.loads(request.tools_json)
    except RecursionError:
        raise _invalid("tools_json", f"JSON nested deeper than {limits.max_json_depth} levels") from None
    except ValueError as e:
        raise _invalid("tools_json", f"is not valid JSON ({e})") from None
    check_json_value(tools, "tools_json", limits)  # nesting, lone surrogates ("\ud800" escapes)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _invalid("tools_json", "must be a JSON array of tool objects")
    _check_tool_choice(request.tool_choice)
    return tools, bool(tools) and request.tool_choice != "none"


def _check_tool_choice(value: str) -> None:
    try:
        check_tool_choice(value or None)
    except ValueError as e:
        raise _invalid("tool_choice", str(e)) from None


def sampling_fields(request: pb.GenerateRequest, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The same engine kwargs (+ `stop`) HTTP computes; raises InvalidRequestError naming the field."""
    return to_sampling_fields(request, limits)


def batch_inputs(values: Sequence[str], param: str = "input", limits: Limits = DEFAULT_LIMITS) -> list[str]:
    return normalize_inputs(list(values), param, limits)  # type: ignore[return-value]


def required_text(value: str, param: str) -> str:
    if not value:
        raise InvalidRequestError(f"Missing required field '{param}'", param=param)
    return value


def choose(value: str, allowed: Sequence[str], param: str) -> str:
    """Empty -> the first (default) choice; anything outside `allowed` -> INVALID_ARGUMENT."""
    if not value:
        return allowed[0]
    if value not in allowed:
        raise _invalid(param, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Frontend results -> response protos


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Field of a dataclass or a dict (the frontend returns both kinds)."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def usage_to_proto(usage: Any) -> pb.Usage:
    if usage is None:
        return pb.Usage()
    prompt = int(_get(usage, "prompt_tokens", 0) or 0)
    completion = int(_get(usage, "completion_tokens", 0) or 0)
    total = _get(usage, "total_tokens", None)
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=int(total) if total is not None else prompt + completion)


def logprobs_to_proto(logprobs: Iterable[Any] | None) -> list[pb.TokenLogprob]:
    out = []
    for lp in logprobs or ():
        value = _get(lp, "logprob", None)
        out.append(pb.TokenLogprob(
            token_id=int(_get(lp, "token_id", 0)),
            token=_get(lp, "token", "") or "",
            logprob=None if value is None else float(value),  # None: an echoed prompt's first token
            top_logprobs=[
                pb.TopLogprob(token_id=int(_get(t, "token_id", 0)), token=_get(t, "token", "") or "",
                              logprob=float(_get(t, "logprob", 0.0)))
                for t in (_get(lp, "top_logprobs", None) or ())
            ],
        ))
    return out


def choice_to_proto(choice: Any) -> pb.Choice:
    return pb.Choice(
        index=int(_get(choice, "index", 0)),
        text=_get(choice, "text", "") or "",
        token_ids=[int(t) for t in (_get(choice, "token_ids", None) or ())],
        finish_reason=_get(choice, "finish_reason", "") or "",
        logprobs=logprobs_to_proto(_get(choice, "logprobs", None)),
        tool_calls=tool_calls_to_proto(_get(choice, "tool_calls", None)),
    )


def tool_calls_to_proto(calls: Iterable[Any] | None) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=new_id("call"), name=c.name, arguments=c.arguments) for c in calls or ()]


def generate_response(request_id: str, model: str, choices: Iterable[Any], usage: Any) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        id=request_id, model=model, choices=[choice_to_proto(c) for c in choices], usage=usage_to_proto(usage)
    )


def delta_to_proto(request_id: str, model: str, delta: Any) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        id=request_id,
        model=model,
        index=int(_get(delta, "index", 0)),
        text=_get(delta, "text", "") or "",
        token_ids=[int(t) for t in (_get(delta, "token_ids", None) or ())],
        finish_reason=_get(delta, "finish_reason", "") or "",
        logprobs=logprobs_to_proto(_get(delta, "logprobs", None)),
        tool_calls=tool_calls_to_proto(_get(delta, "tool_calls", None)),
    )


def _is_usage(item: Any) -> bool:
    return not isinstance(item, Mapping) and hasattr(item, "prompt_tokens") and not hasattr(item, "index")


async def stream_messages(
    request_id: str, model: str, n: int, items: AsyncIterator[Any]
) -> AsyncIterator[pb.GenerateStreamResponse]:
    """Frontend deltas (then one Usage) -> stream messages, usage on the very last message.

    Messages go out as they come, except the delta that finishes the last open choice: it is
    held until the Usage (which the frontend sends right after it) and carries it. So a client
    sees each choice's last message carry its finish_reason, and the last message carry usage.
    """
    open_choices = set(range(max(n, 1)))
    held: pb.GenerateStreamResponse | None = None
    async for item in items:
        if _is_usage(item):
            if held is None:  # nothing to attach it to: a usage-only message (index 0, no text)
                held = pb.GenerateStreamResponse(id=request_id, model=model)
            held.usage.CopyFrom(usage_to_proto(item))
            yield held
            held = None
            continue
        if held is not None:  # more deltas after what looked like the end: flush in order
            yield held
            held = None
        msg = delta_to_proto(request_id, model, item)
        if msg.finish_reason:
            open_choices.discard(msg.index)
            if not open_choices:
                held = msg
                continue
        yield msg
    if held is not None:
        yield held


def classify_response(request_id: str, model: str, results: Iterable[Any], usage: Any) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        id=request_id,
        model=model,
        results=[
            pb.ClassificationResult(
                index=int(_get(r, "index", i)),
                label=str(_get(r, "label", "")),
                probs=[float(p) for p in (_get(r, "probs", None) or ())],
                num_classes=int(_get(r, "num_classes", len(_get(r, "probs", None) or ()))),
            )
            for i, r in enumerate(results)
        ],
        usage=usage_to_proto(usage),
    )


def classify_tokens_response(tokens: Iterable[Any], entities: Iterable[Any] | None) -> pb.ClassifyTokensResponse:
    return pb.ClassifyTokensResponse(
        tokens=[
            pb.TokenLabel(token=_get(t, "token", ""), label=str(_get(t, "label", "")), score=float(_get(t, "score", 0.0)),
                          start=int(_get(t, "start", 0)), end=int(_get(t, "end", 0)))
            for t in tokens
        ],
        entities=[
            pb.Entity(entity_group=str(_get(e, "entity_group", "")), score=float(_get(e, "score", 0.0)),
                      word=_get(e, "word", ""), start=int(_get(e, "start", 0)), end=int(_get(e, "end", 0)))
            for e in (entities or ())
        ],
    )


def answer_response(result: Any) -> pb.AnswerQuestionResponse:
    return pb.AnswerQuestionResponse(
        answer=_get(result, "answer", "") or "", score=float(_get(result, "score", 0.0)),
        start=int(_get(result, "start", 0)), end=int(_get(result, "end", 0)),
    )


def embed_response(model: str, vectors: Iterable[Sequence[float]], usage: Any) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        model=model,
        data=[pb.Embedding(index=i, values=[float(v) for v in vec]) for i, vec in enumerate(vectors)],
        usage=usage_to_proto(usage),
    )


def list_models_response(models: Iterable[Any]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[
        pb.ModelCard(id=str(_get(m, "id", "")), task=str(_get(m, "task", "") or ""),
                     max_model_len=int(_get(m, "max_model_len", 0) or 0),
                     owned_by=str(_get(m, "owned_by", "") or "qwen2-serve"))
        for m in models
    ])


@contextlib.contextmanager
def renamed_params(names: Mapping[str, str]) -> Iterator[None]:
    """Re-raise an InvalidRequestError whose `param` is an HTTP field name under the proto's name."""
    try:
        yield
    except InvalidRequestError as e:
        new = names.get(e.param or "")
        if new is None:
            raise
        raise InvalidRequestError(e.message.replace(f"'{e.param}'", f"'{new}'"), param=new) from None


def entry_name(entry: Any, fallback: str | None = None) -> str:
    """The served id of a frontend ModelEntry."""
    for attr in ("name", "id", "model_id", "served_name"):
        value = _get(entry, attr, None)
        if isinstance(value, str) and value:
            return value
    return fallback or ""


# ---------------------------------------------------------------------------------------------
# The mixin


class GrpcIngressMixin:
    """RPC methods named as in protos/qwen2_serve/v1/qwen2_serve.proto; they use `self.frontend`.

    Optional attributes of the host deployment: `api_key` (str | None; else `frontend.api_key`)
    and `limits` (`Limits`; else `frontend.limits`, else the defaults).
    """

    frontend: Any

    # -- plumbing -------------------------------------------------------------------------------

    def _grpc_limits(self) -> Limits:
        limits = getattr(self, "limits", None) or getattr(getattr(self, "frontend", None), "limits", None)
        return limits if isinstance(limits, Limits) else DEFAULT_LIMITS

    def _grpc_api_key(self) -> str | None:
        key = getattr(self, "api_key", None)
        if key is None:
            key = getattr(getattr(self, "frontend", None), "api_key", None)
        return key or None

    def _grpc_check(self, request: Any, grpc_context: Any, message_class: type) -> Any:
        """Auth first (an unauthenticated caller learns nothing else), then the message size, then
        the decode of raw request bytes -> the request message."""
        check_api_key(metadata_value(grpc_context, "authorization"), self._grpc_api_key())
        if isinstance(request, (bytes, bytearray, memoryview)):
            size = len(request)
        else:
            try:
                size = request.ByteSize()
            except Exception:  # pragma: no cover
                size = 0
        check_body_size(size, self._grpc_limits())
        return decode_request(request, message_class)

    async def _grpc_unary(self, request: Any, grpc_context: Any, message_class: type, empty: Any, call: Any) -> Any:
        try:
            request = self._grpc_check(request, grpc_context, message_class)
            return await call(request)
        except ServeError as e:
            apply_error(grpc_context, e)
            return empty
        except Exception as e:  # noqa: BLE001  (anything else is INTERNAL / UNAVAILABLE, never a traceback)
            err = to_serve_error(e)
            if err.code.value == "internal":
                logger.exception("gRPC %s failed", type(empty).__name__)
            apply_error(grpc_context, err)
            return empty

    @staticmethod
    def _timeout_kw(grpc_context: Any) -> dict[str, float]:
        seconds = request_timeout(grpc_context)
        return {} if seconds is None else {"timeout_s": seconds}

    def _resolve_name(self, model: str, task: str | None = None) -> str:
        entry = self.frontend.resolve(model_arg(model), task)
        return entry_name(entry, model)

    # -- generation -----------------------------------------------------------------------------

    def _generate_args(self, request: pb.GenerateRequest, grpc_context: Any) -> tuple[str, str | list[int], dict, dict]:
        """-> model, prompt, sampling, and the frontend's keyword arguments (deadline, tool-call parsing)."""
        kind, value = generate_input(request)
        tools, parse_tool_calls = chat_tools(request, kind, self._grpc_limits())
        sampling = sampling_fields(request, self._grpc_limits())
        model = self._resolve_name(request.model, "generate")
        if kind == "messages":
            prompt: str | list[int] = self.frontend.render_chat(model, value, tools=tools)
        else:
            prompt = value  # type: ignore[assignment]
        options = dict(self._timeout_kw(grpc_context), parse_tool_calls=parse_tool_calls)
        return model, prompt, sampling, options

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:
        async def call(request: Any) -> pb.GenerateResponse:
            model, prompt, sampling, options = self._generate_args(request, grpc_context)
            request_id = new_id("cmpl")
            choices, usage = await self.frontend.generate(model, prompt, sampling, request_id=request_id, **options)
            return generate_response(request_id, model, choices, usage)

        return await self._grpc_unary(request, grpc_context, pb.GenerateRequest, pb.GenerateResponse(), call)

    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        stream = None
        try:
            request = self._grpc_check(request, grpc_context, pb.GenerateRequest)
            model, prompt, sampling, options = self._generate_args(request, grpc_context)
            request_id = new_id("cmpl")
            stream = self.frontend.generate_stream(model, prompt, sampling, request_id=request_id, **options)
            async for msg in stream_messages(request_id, model, sampling["n"], stream):
                yield msg
        except ServeError as e:
            apply_error(grpc_context, e)
            raise
        except Exception as e:  # noqa: BLE001
            err = to_serve_error(e)
            apply_error(grpc_context, err)
            raise err from e
        finally:
            # On client cancellation Serve cancels this generator (CancelledError at the await
            # above); closing the frontend stream aborts the request on the router.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001  (already failing or cancelled; keep that error)
                    logger.debug("closing the frontend stream failed", exc_info=True)

    # -- one-shot tasks -------------------------------------------------------------------------

    async def Classify(self, request: pb.ClassifyRequest, grpc_context: Any = None) -> pb.ClassifyResponse:
        async def call(request: Any) -> pb.ClassifyResponse:
            inputs = batch_inputs(request.input, "input", self._grpc_limits())
            model = self._resolve_name(request.model, "classify")
            results, usage = await self.frontend.classify(model, inputs)
            return classify_response(new_id("classify"), model, results, usage)

        return await self._grpc_unary(request, grpc_context, pb.ClassifyRequest, pb.ClassifyResponse(), call)

    async def ClassifyTokens(
        self, request: pb.ClassifyTokensRequest, grpc_context: Any = None
    ) -> pb.ClassifyTokensResponse:
        async def call(request: Any) -> pb.ClassifyTokensResponse:
            text = required_text(request.input, "input")
            aggregation = choose(request.aggregation, AGGREGATIONS, "aggregation")
            model = self._resolve_name(request.model, "classify_tokens")
            tokens, entities = await self.frontend.classify_tokens(model, text, aggregation=aggregation)
            return classify_tokens_response(tokens, entities)

        return await self._grpc_unary(request, grpc_context, pb.ClassifyTokensRequest, pb.ClassifyTokensResponse(), call)

    async def AnswerQuestion(
        self, request: pb.AnswerQuestionRequest, grpc_context: Any = None
    ) -> pb.AnswerQuestionResponse:
        async def call(request: Any) -> pb.AnswerQuestionResponse:
            question = required_text(request.question, "question")
            context = required_text(request.context, "context")
            model = self._resolve_name(request.model, "answer")
            return answer_response(await self.frontend.answer(model, question, context))

        return await self._grpc_unary(request, grpc_context, pb.AnswerQuestionRequest, pb.AnswerQuestionResponse(), call)

    async def Embed(self, request: pb.EmbedRequest, grpc_context: Any = None) -> pb.EmbedResponse:
        async def call(request: Any) -> pb.EmbedResponse:
            inputs = batch_inputs(request.input, "input", self._grpc_limits())
            pooling = choose(request.pooling, POOLINGS, "pooling")
            normalize = request.normalize if request.HasField("normalize") else True
            model = self._resolve_name(request.model, "embed")
            vectors, usage = await self.frontend.embed(model, inputs, pooling=pooling, normalize=normalize)
            return embed_response(model, vectors, usage)

        return await self._grpc_unary(request, grpc_context, pb.EmbedRequest, pb.EmbedResponse(), call)

    # -- tokenizer and models -------------------------------------------------------------------

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context: Any = None) -> pb.TokenizeResponse:
        async def call(request: Any) -> pb.TokenizeResponse:
            entry = self.frontend.resolve(model_arg(request.model))
            model = entry_name(entry, request.model)
            special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = self.frontend.tokenize(model, request.text, add_special_tokens=special)
            return pb.TokenizeResponse(token_ids=ids, count=len(ids),
                                       max_model_len=int(_get(entry, "max_model_len", 0) or 0))

        return await self._grpc_unary(request, grpc_context, pb.TokenizeRequest, pb.TokenizeResponse(), call)

    async def Detokenize(self, request: pb.DetokenizeRequest, grpc_context: Any = None) -> pb.DetokenizeResponse:
        async def call(request: Any) -> pb.DetokenizeResponse:
            model = self._resolve_name(request.model)
            with renamed_params({"tokens": "token_ids"}):  # HTTP's field name -> the proto's
                return pb.DetokenizeResponse(text=self.frontend.detokenize(model, list(request.token_ids)))

        return await self._grpc_unary(request, grpc_context, pb.DetokenizeRequest, pb.DetokenizeResponse(), call)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: Any = None) -> pb.ListModelsResponse:
        async def call(request: Any) -> pb.ListModelsResponse:
            return list_models_response(self.frontend.list_models())

        return await self._grpc_unary(request, grpc_context, pb.ListModelsRequest, pb.ListModelsResponse(), call)

    # -- grpc.health.v1 -------------------------------------------------------------------------
    # Serve's proxy routes by method name, so these answer /grpc.health.v1.Health/{Check,Watch}
    # once add_HealthServicer_to_server is among the servicer functions. No API key: probes
    # (kubelet, grpc_health_probe) do not send one.

    async def _health_status(self, service: str) -> int | None:
        """SERVING when every model's Router answers (its engine alive), as HTTP /ready."""
        from grpc_health.v1 import health_pb2

        if service not in ("", SERVICE_NAME):
            return None
        try:
            for m in self.frontend.models:
                await asyncio.wait_for(m.router.info.remote(), 10)
            ready = bool(self.frontend.models)
        except Exception:  # noqa: BLE001
            ready = False
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        from grpc_health.v1 import health_pb2

        status = await self._health_status(request.service)
        if status is None:
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        """One message with the current status, then the stream ends (clients re-Watch)."""
        from grpc_health.v1 import health_pb2

        status = await self._health_status(request.service)
        if status is None:
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        yield health_pb2.HealthCheckResponse(status=status)
