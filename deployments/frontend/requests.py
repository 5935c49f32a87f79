"""What a request asks for, once parsed from its wire format, and the caps it must fit.

- `Limits`: the application's one set of caps. It extends the engine's `SamplingLimits` (n,
  max_tokens, logprobs, stop_token_ids, logit_bias: checked by `SamplingParams.validate`, in the
  ingress and again in the engine, from the same values) with what only the ingress sees (body
  size, batch size, stop strings).
- `GenerationOptions`: a generation request after the wire layer renamed its fields: engine
  `SamplingParams` (their defaults are the server's), plus the ingress's own `stop` strings and
  `echo`, and `param_names` (engine field -> the client's name, e.g. max_tokens ->
  max_completion_tokens) so an error names the field the client sent.
- Small shared helpers: `normalize_inputs`, `parse_request_timeout` (strict decimal seconds),
  `check_body_size`, `new_id`.
- Checks on hostile input that pydantic and protobuf let through: `check_json_value` (nesting depth
  and lone UTF-16 surrogates in any parsed JSON: a whole HTTP body, gRPC `tools_json`),
  `check_text`, and `finite_logprob` (logprobs always finite, so the answer is valid JSON).
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from deployments.errors import BodyTooLargeError, InvalidRequestError
from qwen2_model.engine.sampling import SamplingLimits, SamplingParams, SamplingParamsError



@dataclass(frozen=True)
class Limits(SamplingLimits):
    """Hard caps applied identically to HTTP and gRPC requests (and, for sampling, by the engine)."""

    max_body_bytes: int = 1 << 20  # 1 MiB; HTTP body / gRPC message
    max_batch_inputs: int = 64  # prompts per completion, inputs per classify/embed
    max_stop_strings: int = 8
    max_stop_string_chars: int = 256
    # Nesting of any JSON a client sends (the HTTP body, gRPC tools_json): a tool's JSON schema
    # nests about two levels per schema level. Deeper input is refused before it reaches the chat
    # template, whose rendering recurses once per level (a RecursionError at a few hundred).
    max_json_depth: int = 64


DEFAULT_LIMITS = Limits()


def invalid(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid value for '{param}': {message}", param=param)


@dataclass
class StructuredRequest:
    """The wire fields that constrain the output, as sent (frontend/structured.py reads them once
    the model is known: forced tool calls and reasoning depend on its vocabulary)."""
    response_format: Any = None
    structured_outputs: Any = None
    guided: dict[str, Any] = field(default_factory=dict)  # guided_json / _regex / _choice / _grammar
    tools: list[dict] | None = None
    tool_choice: Any = None


@dataclass
class GenerationOptions:
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)  # matched on the detokenized text, never emitted
    echo: bool = False  # completions: the prompt goes out before each choice's first delta
    param_names: dict[str, str] = field(default_factory=dict)  # engine field -> the client's field
    structured: StructuredRequest | None = None
    # Sampling fields the client set (engine names); the others take the model's generation_config
    # defaults. None: unknown (no defaults are applied).
    explicit: set[str] | None = None

    def validate(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """InvalidRequestError naming the client's field on the first value outside the rules."""
        try:
            self.sampling.validate(limits)
        except SamplingParamsError as exc:
            raise invalid(self.param_names.get(exc.param, exc.param), exc.reason) from None
        if len(self.stop) > limits.max_stop_strings:
            raise invalid("stop", f"at most {limits.max_stop_strings} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise invalid("stop", "stop strings must not be empty")
            if len(s) > limits.max_stop_string_chars:
                raise invalid("stop", f"each stop string must be at most {limits.max_stop_string_chars} characters")


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
        raise invalid(param, "must not be empty")
    if len(batch) > limits.max_batch_inputs:
        raise invalid(param, f"at most {limits.max_batch_inputs} inputs per request, got {len(batch)}")
    for i, item in enumerate(batch):
        if isinstance(item, str):
            if not item:
                raise invalid(f"{param}.{i}" if len(batch) > 1 else param, "must not be an empty string")
        else:
            item = list(item)
            batch[i] = item
            if not item:
                raise invalid(f"{param}.{i}", "must not be an empty list of token ids")
            if any(t < 0 for t in item):
                raise invalid(f"{param}.{i}", "token ids must be non-negative")
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
        raise invalid(param, "contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid "
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
            raise invalid(where, f"JSON nested deeper than {limits.max_json_depth} levels")
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
        raise BodyTooLargeError(f"Request body is {num_bytes} bytes; the limit is {limits.max_body_bytes} bytes")


def new_id(prefix: str) -> str:
    """A request id in OpenAI's style, e.g. new_id("cmpl") -> "cmpl-3f2a...". """
    return f"{prefix}-{uuid.uuid4().hex}"
