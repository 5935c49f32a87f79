"""The gRPC servicer: the Qwen2Serve service's methods on the Ingress deployment, behind Serve's gRPC proxy.

Serve's gRPC proxy (configured with `grpc_servicer_functions`) receives the call, deserializes the
request with the generated stubs and calls the ingress deployment's method named like the RPC,
passing the request proto and, because the parameter is called `grpc_context`, a
`RayServegRPCContext` (metadata in, code / details / trailing metadata out). `GrpcIngressMixin`
holds those methods; deployments/app.py mixes it into the one ingress deployment next to the
FastAPI app, so HTTP and gRPC share `self.frontend` (validation, tokenization, the router handle).

Contract (DESIGN.md, "Wire contract"):
- Same fields, defaults and limits as HTTP: convert.py renames the request's fields into the
  Frontend's `GenerationOptions` (SamplingParams), which the Frontend validates with the same
  `Limits`; the message size goes through `check_body_size`.
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

Request bytes: with the servicer function of deployments/grpc_api/raw.py (what the CLI, the tests
and serve_config.yaml use) Serve's proxy hands the methods the raw request bytes, which are decoded
here (`convert.decode_request`): bytes that do not decode are INVALID_ARGUMENT. With the generated
`add_Qwen2ServeServicer_to_server` the methods get the parsed message, and such bytes fail in the
proxy with UNKNOWN before reaching us.

The conversions (deployments/grpc_api/convert.py) are plain functions over the Frontend's typed
results, so tests can check them without Ray.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from deployments import metrics
from deployments.errors import ServeError, check_api_key, to_serve_error
from deployments.frontend.core import Frontend
from deployments.frontend.requests import check_body_size, new_id, parse_request_timeout
from deployments.grpc_api import convert as C
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from qwen2_model.tasks import ANSWER, CLASSIFY, CLASSIFY_TOKENS, EMBED, GENERATE, REWARD

logger = logging.getLogger("qwen2_serve.grpc")

SERVICE_NAME = "qwen2_serve.v1.Qwen2Serve"
TIMEOUT_METADATA = "x-request-timeout"  # seconds, as HTTP's header; may only shorten the server's timeout


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


def metadata_value(grpc_context: Any, key: str) -> str | None:
    """The (last) value of a call metadata key, case-insensitive; None when absent."""
    if grpc_context is None:
        return None
    value = None
    for k, v in grpc_context.invocation_metadata() or ():
        if k.lower() == key:
            value = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return value


def request_timeout(grpc_context: Any) -> float | None:
    """The `x-request-timeout` call metadata in seconds (None when absent), validated as over HTTP.

    (A gRPC deadline itself is not visible behind Serve's proxy; when it passes, the client
    cancels the call, which cancels the request here.)"""
    return parse_request_timeout(metadata_value(grpc_context, TIMEOUT_METADATA), TIMEOUT_METADATA, "metadata")


class GrpcIngressMixin:
    """RPC methods named as in protos/qwen2_serve/v1/qwen2_serve.proto, over `self.frontend`
    (and `self.api_key`: None or the key every RPC but the health check needs)."""

    frontend: Frontend
    api_key: str | None = None

    # -- plumbing -------------------------------------------------------------------------------

    def _grpc_check(self, request: Any, grpc_context: Any, message_class: type) -> Any:
        """Auth first (an unauthenticated caller learns nothing else), then the message size, then
        the decode of raw request bytes -> the request message."""
        check_api_key(metadata_value(grpc_context, "authorization"), self.api_key)
        raw = isinstance(request, (bytes, bytearray, memoryview))
        check_body_size(len(request) if raw else request.ByteSize(), self.frontend.limits)
        return C.decode_request(request, message_class)

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

    # -- generation -----------------------------------------------------------------------------

    def _generate_args(self, request: pb.GenerateRequest, grpc_context: Any):
        """-> model entry, prompt, options, and the frontend's keyword arguments (deadline, tool calls)."""
        kind, value = C.generate_input(request)
        tools, parse_tool_calls = C.chat_tools(request, kind, self.frontend.limits)
        options = C.generation_options(request)
        options.validate(self.frontend.limits)
        entry = self.frontend.resolve(C.model_arg(request.model), GENERATE)
        prompt = self.frontend.render_chat(entry, value, tools=tools) if kind == "messages" else value
        return entry, prompt, options, {"timeout_s": request_timeout(grpc_context), "parse_tool_calls": parse_tool_calls,
                                        "parse_reasoning": kind == "messages"}

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:
        async def call(request: Any) -> pb.GenerateResponse:
            entry, prompt, options, kw = self._generate_args(request, grpc_context)
            request_id = new_id("cmpl")
            choices, usage = await self.frontend.generate(entry, prompt, options, request_id=request_id, **kw)
            return C.generate_response(request_id, entry.name, choices, usage)

        return await self._grpc_unary(request, grpc_context, pb.GenerateRequest, pb.GenerateResponse(), call)

    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        stream = None
        try:
            request = self._grpc_check(request, grpc_context, pb.GenerateRequest)
            entry, prompt, options, kw = self._generate_args(request, grpc_context)
            request_id = new_id("cmpl")
            stream = self.frontend.generate_stream(entry, prompt, options, request_id=request_id, **kw)
            async for msg in C.stream_messages(request_id, entry.name, options.sampling.n, stream):
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
            if stream is not None:
                try:
                    await stream.aclose()
                except Exception:  # noqa: BLE001  (already failing or cancelled; keep that error)
                    logger.debug("closing the frontend stream failed", exc_info=True)

    # -- one-shot tasks -------------------------------------------------------------------------

    async def Classify(self, request: pb.ClassifyRequest, grpc_context: Any = None) -> pb.ClassifyResponse:
        async def call(request: Any) -> pb.ClassifyResponse:
            entry = self.frontend.resolve(C.model_arg(request.model), CLASSIFY)
            results, usage = await self.frontend.classify(entry, list(request.input))
            return C.classify_response(new_id("classify"), entry.name, results, usage)

        return await self._grpc_unary(request, grpc_context, pb.ClassifyRequest, pb.ClassifyResponse(), call)

    async def ClassifyTokens(
        self, request: pb.ClassifyTokensRequest, grpc_context: Any = None
    ) -> pb.ClassifyTokensResponse:
        async def call(request: Any) -> pb.ClassifyTokensResponse:
            text = C.required_text(request.input, "input")
            aggregation = C.choose(request.aggregation, C.AGGREGATIONS, "aggregation")
            entry = self.frontend.resolve(C.model_arg(request.model), CLASSIFY_TOKENS)
            return C.classify_tokens_response(await self.frontend.classify_tokens(entry, text, aggregation))

        return await self._grpc_unary(request, grpc_context, pb.ClassifyTokensRequest, pb.ClassifyTokensResponse(), call)

    async def AnswerQuestion(
        self, request: pb.AnswerQuestionRequest, grpc_context: Any = None
    ) -> pb.AnswerQuestionResponse:
        async def call(request: Any) -> pb.AnswerQuestionResponse:
            question = C.required_text(request.question, "question")
            context = C.required_text(request.context, "context")
            entry = self.frontend.resolve(C.model_arg(request.model), ANSWER)
            return C.answer_response(await self.frontend.answer(entry, question, context))

        return await self._grpc_unary(request, grpc_context, pb.AnswerQuestionRequest, pb.AnswerQuestionResponse(), call)

    async def Embed(self, request: pb.EmbedRequest, grpc_context: Any = None) -> pb.EmbedResponse:
        async def call(request: Any) -> pb.EmbedResponse:
            pooling = C.choose(request.pooling, C.POOLINGS, "pooling")
            normalize = request.normalize if request.HasField("normalize") else True
            entry = self.frontend.resolve(C.model_arg(request.model), EMBED)
            vectors, usage = await self.frontend.embed(entry, list(request.input), pooling=pooling, normalize=normalize)
            return C.embed_response(entry.name, vectors, usage)

        return await self._grpc_unary(request, grpc_context, pb.EmbedRequest, pb.EmbedResponse(), call)

    async def Reward(self, request: pb.RewardRequest, grpc_context: Any = None) -> pb.RewardResponse:
        async def call(request: Any) -> pb.RewardResponse:
            kind, value = C.reward_input(request)
            entry = self.frontend.resolve(C.model_arg(request.model), REWARD)
            if kind == "messages":
                value = self.frontend.render_chat(entry, value, add_generation_prompt=request.add_generation_prompt)
            elif kind == "input_token_ids" and any(not row for row in value):
                raise C.invalid("input_token_ids", "must not hold an empty list of token ids")
            rows, usage = await self.frontend.reward(entry, value)
            return C.reward_response(entry.name, rows, usage)

        return await self._grpc_unary(request, grpc_context, pb.RewardRequest, pb.RewardResponse(), call)

    # -- tokenizer and models -------------------------------------------------------------------

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context: Any = None) -> pb.TokenizeResponse:
        async def call(request: Any) -> pb.TokenizeResponse:
            entry = self.frontend.resolve(C.model_arg(request.model))
            special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = self.frontend.tokenize(entry, request.text, add_special_tokens=special)
            return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=entry.max_model_len)

        return await self._grpc_unary(request, grpc_context, pb.TokenizeRequest, pb.TokenizeResponse(), call)

    async def Detokenize(self, request: pb.DetokenizeRequest, grpc_context: Any = None) -> pb.DetokenizeResponse:
        async def call(request: Any) -> pb.DetokenizeResponse:
            entry = self.frontend.resolve(C.model_arg(request.model))
            text = self.frontend.detokenize(entry, list(request.token_ids), param="token_ids")
            return pb.DetokenizeResponse(text=text)

        return await self._grpc_unary(request, grpc_context, pb.DetokenizeRequest, pb.DetokenizeResponse(), call)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: Any = None) -> pb.ListModelsResponse:
        async def call(request: Any) -> pb.ListModelsResponse:
            return C.list_models_response(self.frontend.list_models())

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
            await self.frontend.ready()
            ready = True
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
