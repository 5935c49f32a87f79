"""The HTTP API's request and response schemas (pydantic v2), and their mapping to the Frontend's.

Where OpenAI has the route the shapes are OpenAI's (so the official `openai` client works), plus
vLLM's sampling extras; where vLLM has the route (classify, tokenize, detokenize) the shapes are
vLLM's. Unknown request fields are ignored, because OpenAI clients send fields we have no use for;
fields that would change the answer but that we do not do are refused (`UNSUPPORTED_FIELDS`).

`generation_options(req)` only renames: a field the client left unset is left out, so the
defaults and ranges are `SamplingParams`' (qwen2_model/engine/sampling.py), the same for gRPC.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Annotated, Any, Literal, Sequence

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

from deployments.frontend.requests import GenerationOptions, StructuredRequest, invalid, new_id
from deployments.frontend.structured import GUIDED_FIELDS
from qwen2_model.engine.sampling import SamplingParams


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

    None means "the default" everywhere; the defaults are SamplingParams'.
    """

    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: StopInput = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a JSON key) -> bias
    # Structured output (frontend/structured.py checks them and names the field): OpenAI's
    # response_format, vLLM's structured_outputs and its older guided_* fields. At most one.
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    model: str | None = None  # None: the served model
    prompt: PromptInput
    max_tokens: int | None = None  # unset: SamplingParams' default (16, OpenAI's); null: the rest of the context
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
    """tool_choice: None/"auto" (the model decides; calls are parsed), "none" (text as written),
    "required" or {"type": "function", "function": {"name": ...}} (the answer is constrained to one
    call: frontend/structured.py). Raises ValueError."""
    if value is None or value in ("auto", "none", "required"):
        return
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict) \
            and isinstance(value["function"].get("name"), str) and value["function"]["name"]:
        return
    raise ValueError(f"{str(value)[:100]!r} is not a tool_choice: use 'auto', 'none', 'required' or "
                     f"{{'type': 'function', 'function': {{'name': ...}}}}")


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


class PoolingRequest(_Request):
    """POST /pooling (vLLM's shape) for reward models: `input` as /v1/embeddings' (text or token ids,
    one or many), or `messages`: one conversation rendered by the chat template (vLLM's chat-style
    pooling request; no generation prompt unless asked). Exactly one of the two."""

    model: str | None = None
    input: PromptInput | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    encoding_format: Literal["float", "base64"] = "float"


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
    # from_attributes: built straight from the Frontend's result dataclasses.
    model_config = ConfigDict(protected_namespaces=(), from_attributes=True)


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
    reasoning_content: str | None = None  # reasoning models: the <think> part (vLLM's field)
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
    reasoning_content: str | None = None
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
    # generation_config.json's temperature / top_p / top_k / repetition_penalty: used when a
    # request leaves them unset
    sampling_defaults: dict[str, float] | None = None
    reasoning_parser: str | None = None  # "deepseek_r1": chat answers carry reasoning_content
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field)
    # what the model computes in and why, e.g. {"dtype": "float32", "reason": "checkpoint bfloat16; this
    # CPU has no native bf16 ..."} (qwen2_model/hardware.py); null while the Router has not said
    compute_dtype: dict[str, str] | None = None


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


class PoolingData(_Response):
    index: int
    object: Literal["pooling"] = "pooling"
    # rows: [tokens, 1] rewards (reward model) or [steps, 2] probabilities (process reward model);
    # base64: the rows flattened, little-endian float32 (as vLLM's)
    data: list[list[float]] | str


class PoolingResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("pool"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[PoolingData]
    usage: UsageInfo


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str


# ---------------------------------------------------------------------------------------------
# Request -> GenerationOptions: renames only

# Request fields with the same name and meaning as SamplingParams'.
SAME_NAME_FIELDS = ("n", "min_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "stop_token_ids", "ignore_eos")


def token_id_keys(bias: dict) -> dict:
    """JSON object keys are strings: "42" -> 42 (anything else is left for validate() to name)."""
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            out[key] = value
    return out


def generation_options(req: CompletionRequest | ChatCompletionRequest) -> GenerationOptions:
    """The request's generation fields under the engine's names; unset fields keep SamplingParams'
    defaults. Ranges are checked later, by GenerationOptions.validate (the Frontend)."""
    kw = {name: getattr(req, name) for name in SAME_NAME_FIELDS if getattr(req, name) is not None}
    if req.logit_bias:
        kw["logit_bias"] = token_id_keys(req.logit_bias)
    names: dict[str, str] = {}  # engine field -> the field this client sent
    echo = False
    if isinstance(req, ChatCompletionRequest):
        if req.max_completion_tokens is not None:
            kw["max_tokens"] = req.max_completion_tokens
            names["max_tokens"] = "max_completion_tokens"
        else:
            kw["max_tokens"] = req.max_tokens  # None: the rest of the context
        if req.logprobs:
            kw["logprobs"] = req.top_logprobs or 0
            names["logprobs"] = "top_logprobs"
        elif req.top_logprobs:
            raise invalid("top_logprobs", "requires logprobs=true")
    else:
        if "max_tokens" in req.model_fields_set:
            kw["max_tokens"] = req.max_tokens
        if req.logprobs is not None:
            kw["logprobs"] = req.logprobs
        echo = req.echo
        # Echo with logprobs shows the prompt tokens' logprobs too: the engine computes them.
        kw["prompt_logprobs"] = req.logprobs if echo else None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    structured = StructuredRequest(req.response_format, req.structured_outputs,
                                   {name: getattr(req, name) for name in GUIDED_FIELDS},
                                   getattr(req, "tools", None), getattr(req, "tool_choice", None))
    explicit = {name for name, value in kw.items() if value is not None}
    return GenerationOptions(SamplingParams(**kw), stop=stop, echo=echo, param_names=names, structured=structured, explicit=explicit)


def encode_embedding(values: Sequence[float], encoding_format: str = "float") -> list[float] | str:
    """Embedding values in the wire form the client asked for (OpenAI: base64 = float32 LE)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return [float(v) for v in values]


def encode_pooling(rows: Sequence[Sequence[float]], encoding_format: str = "float") -> list[list[float]] | str:
    """A pooled output's rows in the wire form asked for (base64: flattened float32 LE, as vLLM's)."""
    if encoding_format == "base64":
        return encode_embedding([v for row in rows for v in row], "base64")
    return [[float(v) for v in row] for row in rows]
