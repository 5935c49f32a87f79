"""Request/response schemas and validation shared by the HTTP and gRPC ingresses.

- Pydantic v2 models for the HTTP API. Where OpenAI has the route the shapes are OpenAI's (so the
  official `openai` client works), plus vLLM's sampling extras; where vLLM has the route
  (classify, tokenize, detokenize) the shapes are vLLM's. Unknown request fields are ignored,
  because OpenAI clients send fields we have no use for.
- `to_sampling_fields(req)`: the one place that turns a request, HTTP model or gRPC
  `GenerateRequest`, into engine `SamplingParams` keyword arguments, applying one set of defaults
  and the `Limits`, so the two ingresses cannot disagree.
- Small helpers the ingresses need around that: `normalize_inputs`, `resolve_max_tokens`,
  `check_body_size`, `encode_embedding`, `new_id`.
- Checks on hostile input that pydantic and protobuf let through: `check_json_value` (nesting depth
  and lone UTF-16 surrogates in any parsed JSON: a whole HTTP body, gRPC `tools_json`),
  `parse_request_timeout` (strict decimal seconds), `finite_logprob` (logprobs always finite, so
  the answer is valid JSON).

The error contract lives in deployments/errors.py and is re-exported here.
"""

from __future__ import annotations

import base64
import math
import re
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Sequence

from google.protobuf.message import Message as ProtoMessage
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    create_model,
    field_validator,
)

from deployments.errors import (  # noqa: F401  (re-exported: one import for the ingresses)
    ERROR_CLASSES,
    BodyTooLargeError,
    ContextLengthExceededError,
    ErrorCode,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    RequestTimeoutError,
    ServeError,
    UnauthenticatedError,
    UnavailableError,
    check_api_key,
    validation_error_to_serve_error,
)

# ---------------------------------------------------------------------------------------------
# Limits


@dataclass(frozen=True)
class Limits:
    """Hard caps applied identically to HTTP and gRPC requests."""

    max_n: int = 16
    max_tokens_cap: int = 32768  # per request; the context length is checked separately
    max_logprobs: int = 20  # completions `logprobs` and chat `top_logprobs` (vLLM's cap)
    max_body_bytes: int = 1 << 20  # 1 MiB; HTTP body / gRPC message
    max_batch_inputs: int = 64  # prompts per completion, inputs per classify/embed
    max_stop_strings: int = 8
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_logit_bias: int = 1024  # entries of logit_bias
    # Nesting of any JSON a client sends (the HTTP body, gRPC tools_json): a tool's JSON schema
    # nests about two levels per schema level. Deeper input is refused before it reaches the chat
    # template, whose rendering recurses once per level (a RecursionError at a few hundred).
    max_json_depth: int = 64


DEFAULT_LIMITS = Limits()

# Engine defaults for every sampling knob a client left unset. max_tokens is absent on purpose:
# it defaults to 16 for completions (OpenAI) and to "the rest of the context" for chat.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "min_tokens": 0,
    "temperature": 1.0,
    "top_k": 0,  # 0 = disabled (-1 is accepted as vLLM's old spelling of the same)
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "seed": None,
    "stop_token_ids": [],
    "ignore_eos": False,
    "logprobs": None,  # None: no logprobs; k: the sampled token's plus the top k
    "logit_bias": {},  # token id -> bias in [-100, 100]
    "echo": False,  # ingress only (completions): the prompt goes out before the completion
    "stop": [],
}
COMPLETION_DEFAULT_MAX_TOKENS = 16


# ---------------------------------------------------------------------------------------------
# Request models


class _Request(BaseModel):
    # extra="ignore": OpenAI clients send fields we do not use (e.g. `parallel_tool_calls`).
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def _shape_error(description: str) -> WrapValidator:
    """Replace pydantic's per-union-member errors with one message saying what is accepted."""

    def wrap(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {description}") from None

    return WrapValidator(wrap)


PromptInput = Annotated[
    str | list[str] | list[int] | list[list[int]],
    _shape_error("a string, a list of strings, a list of token ids or a list of lists of token ids"),
]
TextInput = Annotated[str | list[str], _shape_error("a string or a list of strings")]
StopInput = Annotated[str | list[str] | None, _shape_error("a string or a list of strings")]


class StreamOptions(_Request):
    include_usage: bool = False


def _unset(v: Any) -> bool:
    return v is None or v is False or v == "" or v == [] or v == {}


# Fields that OpenAI or vLLM clients send, that change what comes back, and that this server does not
# do. Ignoring them would answer another question than the one asked, so a request that sets one to
# anything but its neutral value is refused with 400, naming the field.
_NO_CONSTRAINED_DECODING = "needs constrained (guided) decoding, which this server does not do"
UNSUPPORTED_FIELDS: dict[str, tuple[Any, str]] = {
    "suffix": (_unset, "suffix (insertion) is not supported"),
    "best_of": (lambda v: v in (None, 1), "best_of is not supported; use n"),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
                        f"only {{'type': 'text'}} is supported: JSON or schema output {_NO_CONSTRAINED_DECODING}"),
    **{name: (_unset, _NO_CONSTRAINED_DECODING)
       for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")},
    "functions": (_unset, "the legacy `functions` field is not supported; send `tools`"),
    "function_call": (_unset, "the legacy `function_call` field is not supported; send `tool_choice`"),
    "use_beam_search": (_unset, "beam search is not supported"),
    "length_penalty": (lambda v: v in (None, 1, 1.0), "length_penalty applies to beam search, which is not supported"),
    "prompt_logprobs": (lambda v: v is None, "vLLM's prompt_logprobs field is not supported; on /v1/completions "
                                             "echo=true with logprobs gives the prompt tokens' logprobs"),
    "allowed_token_ids": (lambda v: v is None, "is not supported; logit_bias can favour or ban tokens"),
    "bad_words": (_unset, "is not supported; logit_bias can ban single tokens"),
    "include_stop_str_in_output": (_unset, "is not supported: stop strings are never part of the output"),
    "skip_special_tokens": (lambda v: v in (None, True), "special tokens are always skipped in the output"),
    "truncate_prompt_tokens": (lambda v: v is None, "is not supported: a prompt over the context is refused"),
    "continue_final_message": (_unset, "is not supported"),
}


def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
    neutral, why = UNSUPPORTED_FIELDS[info.field_name]
    if not neutral(value):
        raise ValueError(why)
    return value


# Every UNSUPPORTED_FIELDS name declared as a field (so pydantic names it in the error instead of
# dropping it as an unknown field), with the check above; built from the table so the two never drift.
_RefusedFields = create_model(
    "_RefusedFields", __base__=_Request,
    __validators__={"refuse_unsupported": field_validator(*UNSUPPORTED_FIELDS)(_refuse_unsupported)},
    **{name: (Any, None) for name in UNSUPPORTED_FIELDS},
)


class _SamplingRequest(_RefusedFields):
    """Sampling fields common to completions and chat (OpenAI's, then vLLM's extras).

    None means "the default" everywhere; the defaults live in SAMPLING_DEFAULTS.
    """

    n: int | None = 1
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    stop: StopInput = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a JSON key) -> bias


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    model: str | None = None  # None: the served model
    prompt: PromptInput
    max_tokens: int | None = COMPLETION_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt tokens' too)


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns answering a call

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        # Say plainly that images/audio are unsupported instead of a union error on `type`.
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported (got type {kind!r})")
        return v

    def text(self) -> str:
        """The content as one string (text parts concatenated, as OpenAI does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    # Passed to the chat template (Qwen2's template renders tools into the prompt); with tools and
    # tool_choice "auto" (the default) the answer's <tool_call> blocks become `tool_calls`.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # vLLM extras for the template
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    echo: bool = False  # vLLM's chat echo (of the last message) is not supported

    @field_validator("echo")
    @classmethod
    def _no_chat_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is supported by /v1/completions only")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_we_can_honour(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        check_tool_choice(value)
        return value

    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Extra variables for the model's own template. A template from the client is refused: it
        # would run client code (sandboxed, but unbounded in time) on the ingress.
        reserved = sorted(set(value or {}) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {reserved}: the chat template is the model's "
                             f"own, and messages, tools and add_generation_prompt are request fields")
        return value


def check_tool_choice(value: Any) -> None:
    """tool_choice: None/"auto" (the model decides; calls are parsed) or "none" (text as written).

    "required" and a named function need constrained decoding to be guaranteed; refusing them is
    better than answering with text the client was promised would be a call. Raises ValueError.
    """
    if value is None or value in ("auto", "none"):
        return
    raise ValueError(f"{value!r} is not supported: use 'auto' (the model decides, calls are parsed) or 'none' "
                     f"(no calls are parsed); 'required' and named functions need constrained decoding, "
                     f"which this server does not do")


RESERVED_TEMPLATE_KWARGS = {"chat_template", "messages", "tools", "add_generation_prompt", "tokenize",
                            "documents", "continue_final_message"}


class ClassifyRequest(_Request):
    """POST /v1/classify (vLLM's shape)."""

    model: str | None = None
    input: TextInput


class TokenClassifyRequest(_Request):
    """POST /v1/classify/tokens."""

    model: str | None = None
    input: str = Field(min_length=1)
    # "none": one label per token; "simple": also group B-/I- runs into entities (HF pipeline's).
    aggregation: Literal["none", "simple"] = "none"


class AnswerRequest(_Request):
    """POST /v1/answer: extractive QA; offsets are character offsets into `context`."""

    model: str | None = None
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)


class EmbeddingRequest(_Request):
    """POST /v1/embeddings (OpenAI's shape, plus pooling/normalize extras)."""

    model: str | None = None
    input: PromptInput
    # The openai client asks for base64 unless told otherwise (and decodes it), so both are served.
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    pooling: Literal["last", "mean"] = "last"
    normalize: bool = True

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("dimensions is not supported: embeddings have the model's hidden size")
        return v


class TokenizeRequest(_Request):
    """POST /tokenize (vLLM's shape)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ---------------------------------------------------------------------------------------------
# Response models


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


def new_id(prefix: str) -> str:
    """A request id in OpenAI's style, e.g. new_id("cmpl") -> "cmpl-3f2a...". """
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Response):
    """OpenAI's legacy completions logprobs: parallel lists, one entry per generated token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None  # None only in stream chunks


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk of a streamed completion; `usage` only on the final chunk when asked for."""


class ChatTopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(_Response):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Response):
    id: str = Field(default_factory=lambda: new_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


ChatFinishReason = Literal["stop", "length", "tool_calls"]


class ChatCompletionChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: ChatFinishReason


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None  # set on each choice's first chunk
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionStreamResponse(_Response):
    """One SSE chunk; with stream_options.include_usage the last chunk has `choices: []` + usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "qwen2-serve"
    root: str | None = None  # checkpoint path or hub name the model was loaded from
    max_model_len: int | None = None
    task: str | None = None  # "generate" | "classify" | "classify_tokens" | "answer" | "embed"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ClassificationData(_Response):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("classify"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


class TokenLabel(_Response):
    token: str
    label: str
    score: float
    start: int  # character offsets into `input`
    end: int


class EntitySpan(_Response):
    entity_group: str
    score: float
    word: str
    start: int
    end: int


class TokenClassifyResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("tokcls"))
    object: Literal["token_classification"] = "token_classification"
    created: int = Field(default_factory=_now)
    model: str
    tokens: list[TokenLabel]
    entities: list[EntitySpan] = Field(default_factory=list)  # aggregation="simple" only
    usage: UsageInfo


class AnswerResponse(_Response):
    answer: str  # == context[start:end]
    score: float
    start: int
    end: int


class EmbeddingData(_Response):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI


class EmbeddingResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("embd"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str


# ---------------------------------------------------------------------------------------------
# Sampling: one mapping for HTTP and gRPC


def _invalid(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid value for '{param}': {message}", param=param)


def _raw_from_proto(req: ProtoMessage) -> tuple[dict[str, Any], dict[str, str]]:
    def opt(name: str) -> Any:
        return getattr(req, name) if req.HasField(name) else None

    chat_style = len(req.messages) > 0
    max_tokens = opt("max_tokens")
    if max_tokens is None and not chat_style:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    raw = {
        "n": opt("n"),
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "temperature": opt("temperature"),
        "top_k": opt("top_k"),
        "top_p": opt("top_p"),
        "min_p": req.min_p,
        "repetition_penalty": opt("repetition_penalty"),
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "seed": opt("seed"),
        "stop_token_ids": list(req.stop_token_ids),
        "ignore_eos": req.ignore_eos,
        "logprobs": opt("logprobs"),
        "logit_bias": dict(req.logit_bias),
        "echo": req.echo,
        "stop": list(req.stop),
    }
    if req.echo and chat_style:
        raise _invalid("echo", "is supported with 'prompt' or 'prompt_token_ids' only, not with 'messages'")
    return raw, {}


def _raw_from_http(req: _SamplingRequest) -> tuple[dict[str, Any], dict[str, str]]:
    raw = {name: getattr(req, name, None) for name in SAMPLING_DEFAULTS if name not in ("logprobs",)}
    params: dict[str, str] = {}  # field -> the request field a client actually sent
    if isinstance(req, ChatCompletionRequest):
        if req.max_completion_tokens is not None:
            raw["max_tokens"] = req.max_completion_tokens
            params["max_tokens"] = "max_completion_tokens"
        else:
            raw["max_tokens"] = req.max_tokens
        if req.logprobs:
            raw["logprobs"] = req.top_logprobs or 0
            params["logprobs"] = "top_logprobs"
        elif req.top_logprobs:
            raise _invalid("top_logprobs", "requires logprobs=true")
        else:
            raw["logprobs"] = None
    else:
        raw["max_tokens"] = req.max_tokens
        raw["logprobs"] = req.logprobs
    if isinstance(raw["stop"], str):
        raw["stop"] = [raw["stop"]]
    return raw, params


def to_sampling_fields(req: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """A CompletionRequest, ChatCompletionRequest or gRPC GenerateRequest -> engine kwargs.

    Returns n, max_tokens, min_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
    presence_penalty, frequency_penalty, seed, stop_token_ids, ignore_eos, logprobs, logit_bias,
    prompt_logprobs (the keyword arguments of SamplingParams) plus `echo` and `stop` (list[str]),
    which the ingress keeps, since stop strings are matched on text after detokenization:

        fields = to_sampling_fields(req); stop = fields.pop("stop"); echo = fields.pop("echo")
        SamplingParams(**fields)

    `max_tokens` is None when the client left it unset in chat style; resolve it with
    `resolve_max_tokens` once the prompt length is known. Raises InvalidRequestError naming the
    field on any value outside the limits.
    """
    if isinstance(req, ProtoMessage):
        raw, params = _raw_from_proto(req)
    elif isinstance(req, _SamplingRequest):
        raw, params = _raw_from_http(req)
    else:
        raise TypeError(f"to_sampling_fields: unsupported request type {type(req).__name__}")

    out = {k: (SAMPLING_DEFAULTS[k] if raw.get(k) is None else raw[k]) for k in SAMPLING_DEFAULTS}
    out["max_tokens"] = raw["max_tokens"]
    P = lambda name: params.get(name, name)  # noqa: E731  (the client's name for a field)

    n = out["n"]
    if not 1 <= n <= limits.max_n:
        raise _invalid("n", f"must be between 1 and {limits.max_n}, got {n}")

    max_tokens = out["max_tokens"]
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens_cap:
        raise _invalid(P("max_tokens"), f"must be between 1 and {limits.max_tokens_cap}, got {max_tokens}")
    min_tokens = out["min_tokens"]
    if min_tokens < 0:
        raise _invalid("min_tokens", f"must be at least 0, got {min_tokens}")
    if max_tokens is not None and min_tokens > max_tokens:
        raise _invalid("min_tokens", f"must not exceed max_tokens ({max_tokens}), got {min_tokens}")

    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        out[name] = float(out[name])
        if not math.isfinite(out[name]):
            raise _invalid(name, f"must be a finite number, got {out[name]}")
    if out["temperature"] < 0:
        raise _invalid("temperature", f"must be at least 0, got {out['temperature']}")
    if not 0.0 < out["top_p"] <= 1.0:
        raise _invalid("top_p", f"must be in (0, 1], got {out['top_p']}")
    if not 0.0 <= out["min_p"] <= 1.0:
        raise _invalid("min_p", f"must be in [0, 1], got {out['min_p']}")
    if out["repetition_penalty"] <= 0:
        raise _invalid("repetition_penalty", f"must be greater than 0, got {out['repetition_penalty']}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= out[name] <= 2.0:
            raise _invalid(name, f"must be in [-2, 2], got {out[name]}")

    top_k = int(out["top_k"])
    if top_k < -1:
        raise _invalid("top_k", f"must be -1, 0 (disabled) or positive, got {top_k}")
    out["top_k"] = max(top_k, 0)

    seed = out["seed"]
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise _invalid("seed", "must fit in a signed 64-bit integer")

    stop = list(out["stop"])
    if len(stop) > limits.max_stop_strings:
        raise _invalid("stop", f"at most {limits.max_stop_strings} stop strings, got {len(stop)}")
    for s in stop:
        if not s:
            raise _invalid("stop", "stop strings must not be empty")
        if len(s) > limits.max_stop_string_chars:
            raise _invalid("stop", f"each stop string must be at most {limits.max_stop_string_chars} characters")
    out["stop"] = stop

    stop_ids = [int(t) for t in out["stop_token_ids"]]
    if len(stop_ids) > limits.max_stop_token_ids:
        raise _invalid("stop_token_ids", f"at most {limits.max_stop_token_ids} ids, got {len(stop_ids)}")
    if any(t < 0 for t in stop_ids):
        raise _invalid("stop_token_ids", "token ids must be non-negative")
    out["stop_token_ids"] = stop_ids

    logprobs = out["logprobs"]
    if logprobs is not None and not 0 <= logprobs <= limits.max_logprobs:
        raise _invalid(P("logprobs"), f"must be between 0 and {limits.max_logprobs}, got {logprobs}")

    out["logit_bias"] = _logit_bias(out["logit_bias"], limits)
    out["ignore_eos"] = bool(out["ignore_eos"])
    out["echo"] = bool(out["echo"])
    # Echo with logprobs shows the prompt tokens' logprobs too: the engine computes them.
    out["prompt_logprobs"] = logprobs if out["echo"] else None
    # Fixed key order: the SamplingParams signature, then the ingress's own `echo` and `stop`.
    order = ("n", "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "seed", "stop_token_ids", "ignore_eos", "logprobs",
             "logit_bias", "prompt_logprobs", "echo", "stop")
    return {k: out[k] for k in order}


def _logit_bias(value: dict, limits: Limits) -> dict[int, float]:
    """{"token id" or id: bias} -> {id: bias}; ids are checked against the vocabulary by the engine."""
    if len(value) > limits.max_logit_bias:
        raise _invalid("logit_bias", f"at most {limits.max_logit_bias} entries, got {len(value)}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _invalid("logit_bias", f"keys must be token ids, got {key!r}") from None
        if token < 0:
            raise _invalid("logit_bias", f"keys must be non-negative token ids, got {key!r}")
        bias = float(bias)
        if not -100.0 <= bias <= 100.0:  # also false for nan
            raise _invalid("logit_bias", f"values must be in [-100, 100], got {bias} for token {token}")
        out[token] = bias
    return out


def resolve_max_tokens(
    max_tokens: int | None, prompt_tokens: int, max_model_len: int, *, prompt_param: str = "prompt"
) -> int:
    """The generation budget for one prompt, or ContextLengthExceededError.

    None (chat without max_tokens) means "the rest of the context", as OpenAI and vLLM do.
    """
    if prompt_tokens >= max_model_len:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_tokens} tokens, leaving no room to generate. Please shorten the prompt.",
            param=prompt_param,
        )
    if max_tokens is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return max_tokens


# ---------------------------------------------------------------------------------------------
# Inputs, body size, embeddings


def normalize_inputs(
    value: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    param: str,
    limits: Limits = DEFAULT_LIMITS,
) -> list[str] | list[list[int]]:
    """Any accepted prompt/input shape -> a batch list (strings or token id lists), checked.

    "a" -> ["a"]; [1, 2] -> [[1, 2]]; lists of either pass through. Rejects empty batches,
    empty items, negative token ids and batches over limits.max_batch_inputs.
    """
    if isinstance(value, str):
        batch: list = [value]
    else:
        batch = list(value)
        if batch and all(isinstance(t, int) for t in batch):
            batch = [batch]  # one tokenized prompt
    if not batch:
        raise _invalid(param, "must not be empty")
    if len(batch) > limits.max_batch_inputs:
        raise _invalid(param, f"at most {limits.max_batch_inputs} inputs per request, got {len(batch)}")
    for i, item in enumerate(batch):
        if isinstance(item, str):
            if not item:
                raise _invalid(f"{param}.{i}" if len(batch) > 1 else param, "must not be an empty string")
        else:
            item = list(item)
            batch[i] = item
            if not item:
                raise _invalid(f"{param}.{i}", "must not be an empty list of token ids")
            if any(t < 0 for t in item):
                raise _invalid(f"{param}.{i}", "token ids must be non-negative")
    return batch


_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def parse_request_timeout(value: str | None, name: str, kind: str = "header") -> float | None:
    """A client's `x-request-timeout` (HTTP header or gRPC metadata) in seconds; None when absent.

    Strict: a plain decimal number of seconds (`5`, `2.5`, `1e3`), finite and > 0, with at most
    spaces or tabs around it (HTTP's optional whitespace). Python's `float` would also take
    "inf", "nan", "1_0" and other spellings; those are refused with a 400 naming the header.
    """
    if value is None:
        return None
    text = value.strip(" \t")
    if not _DECIMAL.fullmatch(text):
        raise InvalidRequestError(f"Invalid value for {kind} '{name}': {value[:40]!r} is not a number of seconds "
                                  f"(e.g. '30' or '2.5')", param=name)
    seconds = float(text)
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidRequestError(f"Invalid value for {kind} '{name}': must be a finite number > 0, got {text[:40]}",
                                  param=name)
    return seconds


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: str, param: str) -> None:
    """Refuse a string with a lone UTF-16 surrogate (JSON's "\\ud800"): it is not text, it cannot
    be encoded as UTF-8, and the tokenizer and every encoder downstream would fail on it."""
    if not value.isascii() and _SURROGATE.search(value):
        raise _invalid(param, "contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid "
                              "Unicode text; send the character itself or a valid surrogate pair")


def check_json_value(value: Any, param: str | None, limits: Limits = DEFAULT_LIMITS) -> None:
    """Walk parsed JSON (iteratively): nesting at most limits.max_json_depth, strings and keys
    without lone surrogates. Raises InvalidRequestError naming the dotted path of the problem."""
    stack: list[tuple[Any, str | None, int]] = [(value, param, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            check_text(item, path or "body")
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > limits.max_json_depth:
            where = ".".join((path or "body").split(".")[:3])  # the field, not a path hundreds deep
            raise _invalid(where, f"JSON nested deeper than {limits.max_json_depth} levels")
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            child_path = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                check_text(key, child_path)
            stack.append((child, child_path, depth + 1))


def finite_logprob(value: float | None) -> float | None:
    """Logprobs go out finite: -inf and NaN (an extreme penalty or temperature can make the whole
    distribution degenerate) become -9999.0, vLLM's stand-in for -inf; +inf becomes 0.0."""
    if value is None or math.isfinite(value):
        return value
    return 0.0 if value > 0 else -9999.0


def check_body_size(num_bytes: int, limits: Limits = DEFAULT_LIMITS) -> None:
    if num_bytes > limits.max_body_bytes:
        raise BodyTooLargeError(
            f"Request body is {num_bytes} bytes; the limit is {limits.max_body_bytes} bytes"
        )


def encode_embedding(values: Sequence[float], encoding_format: str = "float") -> list[float] | str:
    """Embedding values in the wire form the client asked for (OpenAI: base64 = float32 LE)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return [float(v) for v in values]
