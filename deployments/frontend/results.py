"""What the Frontend returns, for every task: small typed dataclasses, which the HTTP app turns
into its pydantic responses and the gRPC servicer into protos, field for field."""

from __future__ import annotations

from dataclasses import dataclass, field

from deployments.frontend.tool_calls import ParsedToolCall


@dataclass
class TopLogprob:
    token_id: int
    token: str  # the token's decoded text
    logprob: float


@dataclass
class LogprobEntry:
    token_id: int
    token: str
    logprob: float | None  # None: an echoed prompt's first token (nothing predicts it)
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class GenerationDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[LogprobEntry] | None  # one per token in this delta, when asked for
    finish_reason: str | None  # "tool_calls" when the choice stopped after calling tools
    tool_calls: list[ParsedToolCall] = field(default_factory=list)  # finished in this delta; not in `text`
    reasoning: str = ""  # reasoning models: the <think> text of this delta; not in `text`


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
    logprobs: list[LogprobEntry] | None
    finish_reason: str | None
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    reasoning_content: str | None = None  # reasoning models (the model's reasoning_parser set)


@dataclass
class Classification:
    index: int
    label: str
    probs: list[float]
    num_classes: int


@dataclass
class TokenLabel:
    token: str
    label: str
    score: float
    start: int  # character offsets into the input
    end: int


@dataclass
class Entity:
    entity_group: str
    score: float
    word: str
    start: int
    end: int


@dataclass
class TokenClassification:
    tokens: list[TokenLabel]
    entities: list[Entity]  # aggregation "simple" only
    usage: Usage


@dataclass
class Answer:
    answer: str  # == context[start:end]
    score: float
    start: int  # character offsets into the context
    end: int


@dataclass
class ModelCard:
    id: str
    task: str
    max_model_len: int
    root: str  # the checkpoint path (an adapter's directory)
    owned_by: str = "qwen2-serve"
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # generation_config.json's
    reasoning_parser: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    compute_dtype: dict | None = None  # {"dtype", "reason"}: hardware.py's choice on the Router
