"""The HTTP app: the OpenAI-compatible FastAPI app served by the Ingress deployment (deployments/app.py).

Routes: POST /v1/completions, /v1/chat/completions (both with `stream`: SSE `data: {...}` chunks,
ending `data: [DONE]`), GET /v1/models, POST /v1/classify, /v1/classify/tokens, /v1/answer,
/v1/embeddings, /pooling (vLLM's: reward models), /tokenize, /detokenize, GET /v1/models/{model}, GET /health (live), GET /ready
(every Router answers).

Each route is a thin shell over `Frontend` (deployments/frontend), shared with the gRPC servicer:
it resolves the model once, renames the request's fields (schemas.py) and maps the typed result
onto its response schema.
Errors: every ServeError and every pydantic validation error becomes OpenAI's error body with the
status of DESIGN.md's table (429 carries Retry-After). Before any route runs, one ASGI middleware
checks the API key (when one is set; /health and /ready are open), caps the body size, from
Content-Length and from the bytes actually received, and screens the JSON body for what pydantic
would pass on to code that breaks on it (`screen_json_body`: lone UTF-16 surrogates anywhere,
nesting deeper than `Limits.max_json_depth`). A streamed response whose client goes away
is cancelled, which cancels the Router call and frees the request's KV blocks.

`create_app()` builds the FastAPI app (nothing is built at import time); the routes live on a
module-level APIRouter, so Serve's copy of the app in each replica reaches the Frontend that the
replica installs with `bind(frontend, api_key=...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import metrics
from deployments.errors import (
    BodyTooLargeError,
    InvalidRequestError,
    ServeError,
    UnavailableError,
    check_api_key,
    to_serve_error,
    validation_error_to_serve_error,
)
from deployments.frontend.core import Frontend, ModelEntry
from deployments.frontend.requests import (
    GenerationOptions,
    Limits,
    check_json_value,
    new_id,
    normalize_inputs,
    parse_request_timeout,
)
from deployments.frontend.results import LogprobEntry, Usage
from deployments.http_api.schemas import (
    AnswerRequest,
    AnswerResponse,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ClassifyRequest,
    ClassifyResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    FunctionCall,
    ModelCard,
    ModelList,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    TokenClassifyRequest,
    TokenClassifyResponse,
    TokenizeRequest,
    TokenizeResponse,
    ToolCall,
    UsageInfo,
    encode_embedding,
    encode_pooling,
    generation_options,
)
from qwen2_model.tasks import ANSWER, CLASSIFY, CLASSIFY_TOKENS, EMBED, GENERATE, REWARD

# With an API key, every other route needs it: /docs and /openapi.json too (they list the API).
OPEN_PATHS = {"/health", "/ready"}
TIMEOUT_HEADER = "x-request-timeout"  # seconds; may only shorten the server's request timeout

_STATE: dict[str, Any] = {"frontend": None, "api_key": None}


def bind(frontend: Frontend, api_key: str | None = None) -> None:
    """Install the Frontend these routes use (called in the Ingress replica's __init__)."""
    _STATE["frontend"] = frontend
    _STATE["api_key"] = api_key or None


def _frontend() -> Frontend:
    fe = _STATE["frontend"]
    if fe is None:
        raise UnavailableError("The server is starting")
    return fe


def error_response(err: ServeError) -> JSONResponse:
    """The HTTP answer to a failed request; counts it once in qwen2_errors (deployments/metrics.py)."""
    metrics.count_error(err.code.value)
    status, body, headers = err.to_http()
    return JSONResponse(body, status_code=status, headers=headers)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's \ud800..\udfff


def screen_json_body(body: bytes, limits: Limits) -> None:
    """Refuse a JSON body with a lone surrogate anywhere or nested too deeply (InvalidRequestError).

    A cheap look first: only a body with a surrogate escape, or with more brackets than the depth
    limit, is parsed and walked (valid surrogate pairs, i.e. emoji, pass). A body that is not JSON
    is left to FastAPI, which reports it.
    """
    if not body:
        return
    if not (_SURROGATE_ESCAPE.search(body) or body.count(b"[") + body.count(b"{") > limits.max_json_depth):
        return
    try:
        value = json.loads(body)
    except RecursionError:
        raise InvalidRequestError(f"Request body is JSON nested deeper than {limits.max_json_depth} levels") from None
    except ValueError:
        return
    check_json_value(value, None, limits)


class GuardMiddleware:
    """API key + body size cap, before FastAPI reads anything (pure ASGI, so streaming is untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        fe: Frontend | None = _STATE["frontend"]
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if path not in OPEN_PATHS:
                check_api_key(headers.get("authorization"), _STATE["api_key"])
            limit = fe.limits.max_body_bytes if fe else 1 << 20
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > limit:
                raise BodyTooLargeError(f"Request body is {length} bytes; the limit is {limit} bytes")
            if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
                return await self.app(scope, receive, send)
            body, more = b"", True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                if len(body) > limit:
                    raise BodyTooLargeError(f"Request body is over the limit of {limit} bytes")
                more = msg.get("more_body", False)
            screen_json_body(body, fe.limits if fe else Limits())
        except ServeError as err:
            return await error_response(err)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the real channel, so disconnects are still seen

        return await self.app(scope, replay, send)


routes = APIRouter()


def create_app() -> FastAPI:
    """The FastAPI app: guard middleware, the error contract's handlers, the routes."""
    app = FastAPI(title="qwen2-serve", description="Qwen2 on Ray Serve: OpenAI-compatible HTTP API")
    app.add_middleware(GuardMiddleware)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _any_error)
    app.include_router(routes)
    return app


async def _serve_error(request: Request, exc: ServeError):
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError):
    return error_response(validation_error_to_serve_error(exc))


async def _http_error(request: Request, exc: StarletteHTTPException):
    """Unknown route (404) or method (405), or a body Starlette could not parse (400): the same
    OpenAI error body as every other error, `code` a string as everywhere."""
    if exc.status_code == 400:
        return error_response(InvalidRequestError(f"Request body could not be parsed: {exc.detail}"))
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    body = {"error": {"message": f"{request.method} {request.url.path}: {exc.detail}", "type": kind,
                      "param": None, "code": code}}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _any_error(request: Request, exc: Exception):
    return error_response(to_serve_error(exc))


def _timeout(request: Request) -> float | None:
    return parse_request_timeout(request.headers.get(TIMEOUT_HEADER), TIMEOUT_HEADER, "header")


def _usage(u: Usage) -> UsageInfo:
    return UsageInfo.model_validate(u)


def _sse(obj: dict | BaseModel) -> str:
    body = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj, ensure_ascii=False)
    return f"data: {body}\n\n"


# ---------------------------------------------------------------------------------------------
# Generation plumbing


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's position."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, it):
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer)
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()


def _streams(fe: Frontend, entry: ModelEntry, prompts: list, options: GenerationOptions, timeout_s: float | None,
             rid: str):
    return [fe.generate_stream(entry, p, options, request_id=f"{rid}-{i}", timeout_s=timeout_s)
            for i, p in enumerate(prompts)]


async def _prime(agen: AsyncIterator) -> AsyncIterator:
    """Start a stream before the response does, so errors before the first chunk get a real status."""
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = None

    async def chained():
        try:
            if first is not None:
                yield first
            async for item in agen:
                yield item
        finally:
            await agen.aclose()

    return chained()


async def _sse_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
    except ServeError as err:  # after the headers: the error goes in the stream
        metrics.count_error(err.code.value)
        yield _sse(err.to_http()[1])
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:  # noqa: BLE001
        err = to_serve_error(exc)
        metrics.count_error(err.code.value)
        yield _sse(err.to_http()[1])
    finally:
        with contextlib.suppress(BaseException):
            await chunks.aclose()
    yield "data: [DONE]\n\n"


def _completion_logprobs(entries: list[LogprobEntry | None], start_offset: int) -> dict:
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    offset = start_offset
    for e in entries:
        if e is None:
            continue
        out["text_offset"].append(offset)
        out["tokens"].append(e.token)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({t.token: t.logprob for t in e.top_logprobs} or None)
        offset += len(e.token)
    return out


def _chat_logprobs(entries: list[LogprobEntry | None]) -> dict:
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode("utf-8")),
         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode("utf-8"))}
                          for t in e.top_logprobs]}
        for e in entries if e is not None]}


# ---------------------------------------------------------------------------------------------
# Routes


@routes.get("/health")
async def health():
    return {"status": "ok"}


@routes.get("/ready")
async def ready():
    try:
        infos = await _frontend().ready()
    except Exception as exc:  # noqa: BLE001
        return JSONResponse({"status": "not_ready", "error": to_serve_error(exc).message}, status_code=503)
    return {"status": "ready", "models": {
        name: {"architecture": i["architecture"], "max_model_len": i["max_model_len"],
               "num_kv_blocks": i["num_kv_blocks"], "config": i.get("config")} for name, i in infos.items()}}


@routes.get("/v1/models")
async def list_models():
    await _frontend().learn_compute_dtypes()
    return ModelList(data=[ModelCard.model_validate(m) for m in _frontend().list_models()])


@routes.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str):
    """OpenAI's GET /v1/models/{model} (`client.models.retrieve`); 404 with the served names otherwise."""
    fe = _frontend()
    entry = fe.resolve(model_id)
    await fe.learn_compute_dtypes()
    return ModelCard.model_validate(fe.model_card(entry))


@routes.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    fe = _frontend()
    entry = fe.resolve(req.model, GENERATE)
    options = generation_options(req)
    options.validate(fe.limits)  # before any prompt is tokenized
    prompts = normalize_inputs(req.prompt, "prompt", fe.limits)
    timeout_s = _timeout(request)
    rid = new_id("cmpl")
    n = options.sampling.n
    created = int(time.time())

    if not req.stream:
        results = await asyncio.gather(*[
            fe.generate(entry, p, options, request_id=f"{rid}-{i}", timeout_s=timeout_s)
            for i, p in enumerate(prompts)])
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (cs, usage) in enumerate(results):
            prompt_tokens += usage.prompt_tokens
            completion_tokens += usage.completion_tokens
            for c in cs:
                choices.append(CompletionChoice(
                    index=i * n + c.index, text=c.text, finish_reason=c.finish_reason,
                    logprobs=_completion_logprobs(c.logprobs, 0) if c.logprobs is not None else None))
        return CompletionResponse(id=rid, created=created, model=entry.name, choices=choices,
                                  usage=_usage(Usage(prompt_tokens, completion_tokens,
                                                     prompt_tokens + completion_tokens)))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    source = await _prime(_merged(_streams(fe, entry, prompts, options, timeout_s, rid)))

    async def chunks():
        offsets: dict[int, int] = {}
        prompt_tokens = completion_tokens = 0
        async for i, item in source:
            if isinstance(item, Usage):
                prompt_tokens += item.prompt_tokens
                completion_tokens += item.completion_tokens
                continue
            index = i * n + item.index
            logprobs = None
            if item.logprobs is not None:
                logprobs = _completion_logprobs(item.logprobs, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(item.text)
            choice = CompletionChoice(index=index, text=item.text, finish_reason=item.finish_reason, logprobs=logprobs)
            yield _sse(CompletionStreamResponse(id=rid, created=created, model=entry.name, choices=[choice]))
        if include_usage:
            yield _sse(CompletionStreamResponse(
                id=rid, created=created, model=entry.name, choices=[],
                usage=_usage(Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens))))

    return StreamingResponse(_sse_stream(chunks()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _message_dict(m) -> dict:
    d: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name:
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = m.tool_calls
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    return d


def _chat_choice(c) -> ChatCompletionChoice:
    """A finished choice -> its chat answer (the text around tool calls, if any, trimmed)."""
    message = ChatResponseMessage(content=c.text, reasoning_content=c.reasoning_content)
    if c.tool_calls:
        message = ChatResponseMessage(content=c.text.strip() or None, reasoning_content=c.reasoning_content, tool_calls=[
            ToolCall(function=FunctionCall(name=call.name, arguments=call.arguments)) for call in c.tool_calls])
    return ChatCompletionChoice(index=c.index, message=message, finish_reason=c.finish_reason,
                                logprobs=_chat_logprobs(c.logprobs) if c.logprobs is not None else None)


@routes.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    fe = _frontend()
    entry = fe.resolve(req.model, GENERATE)
    options = generation_options(req)
    options.validate(fe.limits)
    prompt = fe.render_chat(entry, [_message_dict(m) for m in req.messages], tools=req.tools,
                            add_generation_prompt=req.add_generation_prompt, **(req.chat_template_kwargs or {}))
    prompt_ids = fe.tokenize(entry, prompt)
    timeout_s = _timeout(request)
    rid = new_id("chatcmpl")
    created = int(time.time())

    parse_tools = req.parses_tool_calls()

    if not req.stream:
        choices, usage = await fe.generate(entry, prompt_ids, options, request_id=rid, timeout_s=timeout_s,
                                           parse_tool_calls=parse_tools, parse_reasoning=True)
        return ChatCompletionResponse(
            id=rid, created=created, model=entry.name, usage=_usage(usage),
            choices=[_chat_choice(c) for c in choices])

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    source = await _prime(fe.generate_stream(entry, prompt_ids, options, request_id=rid, timeout_s=timeout_s,
                                             parse_tool_calls=parse_tools, parse_reasoning=True))

    def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
        return _sse(ChatCompletionStreamResponse(id=rid, created=created, model=entry.name, choices=choices,
                                                 usage=usage))

    async def chunks():
        started: set[int] = set()
        calls_sent: dict[int, int] = {}  # choice index -> tool calls streamed so far (DeltaToolCall.index)
        async for item in source:
            if isinstance(item, Usage):
                if include_usage:
                    yield chunk([], _usage(item))
                continue
            delta = DeltaMessage(content=item.text, role=None if item.index in started else "assistant")
            if item.reasoning:  # reasoning models: the <think> part streams in its own field
                delta.reasoning_content, delta.content = item.reasoning, item.text or None
            started.add(item.index)
            if item.tool_calls:
                first = calls_sent.get(item.index, 0)
                calls_sent[item.index] = first + len(item.tool_calls)
                delta.content = item.text or None
                delta.tool_calls = [DeltaToolCall(index=first + k, id=new_id("call"), type="function",
                                                  function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
                                    for k, c in enumerate(item.tool_calls)]
            yield chunk([ChatCompletionStreamChoice(
                index=item.index, delta=delta, finish_reason=item.finish_reason,
                logprobs=_chat_logprobs(item.logprobs) if item.logprobs is not None else None)])

    return StreamingResponse(_sse_stream(chunks()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@routes.post("/v1/classify")
async def classify(req: ClassifyRequest):
    fe = _frontend()
    entry = fe.resolve(req.model, CLASSIFY)
    data, usage = await fe.classify(entry, req.input)
    return ClassifyResponse(model=entry.name, data=data, usage=_usage(usage))


@routes.post("/v1/classify/tokens")
async def classify_tokens(req: TokenClassifyRequest):
    fe = _frontend()
    entry = fe.resolve(req.model, CLASSIFY_TOKENS)
    result = await fe.classify_tokens(entry, req.input, req.aggregation)
    return TokenClassifyResponse(model=entry.name, tokens=result.tokens, entities=result.entities,
                                 usage=_usage(result.usage))


@routes.post("/v1/answer")
async def answer(req: AnswerRequest):
    fe = _frontend()
    entry = fe.resolve(req.model, ANSWER)
    return AnswerResponse.model_validate(await fe.answer(entry, req.question, req.context))


@routes.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest):
    fe = _frontend()
    entry = fe.resolve(req.model, EMBED)
    vectors, usage = await fe.embed(entry, req.input, pooling=req.pooling, normalize=req.normalize)
    return EmbeddingResponse(model=entry.name, usage=_usage(usage),
                             data=[EmbeddingData(index=i, embedding=encode_embedding(v, req.encoding_format))
                                   for i, v in enumerate(vectors)])


@routes.post("/pooling")
async def pooling(req: PoolingRequest):
    """vLLM's pooling API, for the reward models (qwen2_model/reward.py): per input, rewards per token
    or step probabilities. Other models answer 400 naming their task."""
    fe = _frontend()
    if (req.input is None) == (req.messages is None):
        raise InvalidRequestError("Exactly one of 'input' and 'messages' must be given", param="input")
    entry = fe.resolve(req.model, REWARD)
    inputs = req.input
    if req.messages is not None:
        inputs = fe.render_chat(entry, [_message_dict(m) for m in req.messages],
                                add_generation_prompt=req.add_generation_prompt, **(req.chat_template_kwargs or {}))
    rows, usage = await fe.reward(entry, inputs)
    return PoolingResponse(model=entry.name, usage=_usage(usage),
                           data=[PoolingData(index=i, data=encode_pooling(r, req.encoding_format))
                                 for i, r in enumerate(rows)])


@routes.post("/tokenize")
async def tokenize(req: TokenizeRequest):
    fe = _frontend()
    entry = fe.resolve(req.model)
    tokens = fe.tokenize(entry, req.prompt, add_special_tokens=req.add_special_tokens)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=entry.max_model_len)


@routes.post("/detokenize")
async def detokenize(req: DetokenizeRequest):
    fe = _frontend()
    entry = fe.resolve(req.model)
    return DetokenizeResponse(prompt=fe.detokenize(entry, req.tokens))
