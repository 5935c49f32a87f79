"""Proto <-> Frontend: request protos to the Frontend's arguments, typed results to response protos.

Renames only, as the HTTP schemas do: a field the client left unset is left out of
`SamplingParams`, whose defaults and ranges are the same for HTTP and gRPC. Results map field for
field from deployments/frontend/results.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from deployments.errors import InvalidRequestError
from deployments.frontend.requests import (DEFAULT_LIMITS, GenerationOptions, Limits, StructuredRequest, check_json_value,
                                          invalid, new_id)
from deployments.frontend.results import (
    Answer,
    Choice,
    Classification,
    GenerationDelta,
    LogprobEntry,
    ModelCard,
    TokenClassification,
    Usage,
)
from deployments.frontend.tool_calls import ParsedToolCall
from deployments.http_api.schemas import check_tool_choice
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from qwen2_model.engine.sampling import SamplingParams

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
AGGREGATIONS = ("none", "simple")
POOLINGS = ("last", "mean")

# GenerateRequest fields with the same name and meaning as SamplingParams'. Proto3 scalars without
# `optional` cannot be unset: their zero value is SamplingParams' default too.
_OPTIONAL_FIELDS = ("n", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "logprobs")
_PLAIN_FIELDS = ("min_tokens", "min_p", "presence_penalty", "frequency_penalty", "ignore_eos")


# ---------------------------------------------------------------------------------------------
# Requests -> frontend arguments


def decode_request(request: Any, message_class: type) -> Any:
    """Raw request bytes (deployments/grpc_api/raw.py) -> the message; a message passes through.

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
    return kind, chat_messages(request)


def chat_messages(request: Any) -> list[dict[str, str]]:
    """A request's `messages` -> [{role, content}], roles checked."""
    messages = []
    for i, m in enumerate(request.messages):
        if m.role not in CHAT_ROLES:
            raise invalid(f"messages.{i}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        messages.append({"role": m.role, "content": m.content})
    return messages


def reward_input(request: pb.RewardRequest) -> tuple[str, list[str] | list[list[int]] | list[dict[str, str]]]:
    """("input", [texts]) | ("input_token_ids", [[ids]]) | ("messages", [{role, content}]): exactly one."""
    given = [name for name, present in (("input", len(request.input) > 0),
                                        ("input_token_ids", len(request.input_token_ids) > 0),
                                        ("messages", len(request.messages) > 0)) if present]
    if len(given) != 1:
        detail = "none was set" if not given else f"got {' and '.join(given)}"
        raise InvalidRequestError(f"Exactly one of 'input', 'input_token_ids', 'messages' must be set; {detail}",
                                  param=given[-1] if given else "input")
    if given[0] == "input":
        return "input", list(request.input)
    if given[0] == "input_token_ids":
        return "input_token_ids", [[int(t) for t in row.ids] for row in request.input_token_ids]
    return "messages", chat_messages(request)


def generation_options(request: pb.GenerateRequest) -> GenerationOptions:
    """The request's generation fields under the engine's names (max_tokens: unset means 16 for a
    prompt, as OpenAI's completions, and the rest of the context for messages, as chat)."""
    chat_style = len(request.messages) > 0
    if request.echo and chat_style:
        raise invalid("echo", "is supported with 'prompt' or 'prompt_token_ids' only, not with 'messages'")
    kw = {name: getattr(request, name) for name in _OPTIONAL_FIELDS if request.HasField(name)}
    kw.update({name: getattr(request, name) for name in _PLAIN_FIELDS})
    if request.HasField("max_tokens"):
        kw["max_tokens"] = request.max_tokens
    elif chat_style:
        kw["max_tokens"] = None
    kw["stop_token_ids"] = list(request.stop_token_ids)
    kw["logit_bias"] = dict(request.logit_bias)
    if request.echo:
        kw["prompt_logprobs"] = kw.get("logprobs")
    explicit = {name for name in _OPTIONAL_FIELDS if request.HasField(name)}
    return GenerationOptions(SamplingParams(**kw), stop=list(request.stop), echo=request.echo,
                             structured=structured_request(request), explicit=explicit)


def structured_request(request: pb.GenerateRequest) -> StructuredRequest:
    """`response_format_json` / `structured_outputs` / tools + tool_choice, as HTTP's fields."""
    response_format = None
    if request.response_format_json:
        try:
            response_format = json.loads(request.response_format_json)
        except (ValueError, RecursionError) as e:
            raise invalid("response_format_json", f"is not valid JSON ({str(e)[:200]})") from None
        check_json_value(response_format, "response_format_json")
    structured_outputs = None
    if request.HasField("structured_outputs"):
        kind = request.structured_outputs.WhichOneof("constraint")
        if kind is None:
            raise invalid("structured_outputs", "set one of json, regex, choice, grammar, json_object")
        if kind == "json_object":
            response_format = response_format or {"type": "json_object"}
            if request.response_format_json:
                raise invalid("structured_outputs", "cannot be combined with response_format_json: one output "
                                                    "constraint per request")
        else:
            value = getattr(request.structured_outputs, kind)
            structured_outputs = {kind: list(value.choices) if kind == "choice" else value}
    tools, tool_choice = None, None
    if request.tool_choice not in ("", "auto", "none") and not request.tools_json:
        raise invalid("tool_choice", "needs tools_json")
    if request.tools_json and request.tool_choice not in ("", "auto", "none"):
        tools = json.loads(request.tools_json)  # checked by chat_tools
        tool_choice = _tool_choice_value(request.tool_choice)
    return StructuredRequest(response_format, structured_outputs, {}, tools, tool_choice)


def _tool_choice_value(value: str):
    """gRPC's tool_choice string: "required", or OpenAI's named-function object as JSON text."""
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except ValueError as e:
            raise invalid("tool_choice", f"is not valid JSON ({str(e)[:200]})") from None
    return value


def chat_tools(request: pb.GenerateRequest, kind: str,
               limits: Limits = DEFAULT_LIMITS) -> tuple[list[dict] | None, bool]:
    """`tools_json` / `tool_choice` -> (tools for the chat template, parse tool calls?), as HTTP's."""
    if not request.tools_json:
        if request.tool_choice:
            _check_tool_choice(request.tool_choice)
        return None, False
    if kind != "messages":
        raise invalid("tools_json", "only goes with 'messages' (chat)")
    try:
        tools = json.loads(request.tools_json)
    except RecursionError:
        raise invalid("tools_json", f"JSON nested deeper than {limits.max_json_depth} levels") from None
    except ValueError as e:
        raise invalid("tools_json", f"is not valid JSON ({e})") from None
    check_json_value(tools, "tools_json", limits)  # nesting, lone surrogates ("\ud800" escapes)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise invalid("tools_json", "must be a JSON array of tool objects")
    _check_tool_choice(request.tool_choice)
    return tools, bool(tools) and request.tool_choice != "none"


def _check_tool_choice(value: str) -> None:
    try:
        check_tool_choice(_tool_choice_value(value) if value else None)
    except ValueError as e:
        raise invalid("tool_choice", str(e)) from None


def required_text(value: str, param: str) -> str:
    if not value:
        raise InvalidRequestError(f"Missing required field '{param}'", param=param)
    return value


def choose(value: str, allowed: Sequence[str], param: str) -> str:
    """Empty -> the first (default) choice; anything outside `allowed` -> INVALID_ARGUMENT."""
    if not value:
        return allowed[0]
    if value not in allowed:
        raise invalid(param, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Frontend results -> response protos


def usage_to_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                    total_tokens=usage.total_tokens)


def logprobs_to_proto(logprobs: list[LogprobEntry | None] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, token=lp.token, logprob=lp.logprob,  # None: unset
                            top_logprobs=[pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob)
                                          for t in lp.top_logprobs])
            for lp in logprobs or () if lp is not None]


def tool_calls_to_proto(calls: list[ParsedToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=new_id("call"), name=c.name, arguments=c.arguments) for c in calls]


def choice_to_proto(c: Choice) -> pb.Choice:
    return pb.Choice(index=c.index, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason or "",
                     logprobs=logprobs_to_proto(c.logprobs), tool_calls=tool_calls_to_proto(c.tool_calls),
                     reasoning_content=c.reasoning_content)


def generate_response(request_id: str, model: str, choices: list[Choice], usage: Usage) -> pb.GenerateResponse:
    return pb.GenerateResponse(id=request_id, model=model, choices=[choice_to_proto(c) for c in choices],
                               usage=usage_to_proto(usage))


def delta_to_proto(request_id: str, model: str, d: GenerationDelta) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(id=request_id, model=model, index=d.index, text=d.text, token_ids=d.token_ids,
                                     finish_reason=d.finish_reason or "", logprobs=logprobs_to_proto(d.logprobs),
                                     tool_calls=tool_calls_to_proto(d.tool_calls), reasoning_content=d.reasoning)


async def stream_messages(request_id: str, model: str, n: int,
                          items: AsyncIterator[GenerationDelta | Usage]) -> AsyncIterator[pb.GenerateStreamResponse]:
    """Frontend deltas (then one Usage) -> stream messages, usage on the very last message.

    Messages go out as they come, except the delta that finishes the last open choice: it is
    held until the Usage (which the frontend sends right after it) and carries it. So a client
    sees each choice's last message carry its finish_reason, and the last message carry usage.
    """
    open_choices = set(range(max(n, 1)))
    held: pb.GenerateStreamResponse | None = None
    async for item in items:
        if isinstance(item, Usage):
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


def classify_response(request_id: str, model: str, results: list[Classification], usage: Usage) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(id=request_id, model=model, usage=usage_to_proto(usage), results=[
        pb.ClassificationResult(index=r.index, label=r.label, probs=r.probs, num_classes=r.num_classes)
        for r in results])


def classify_tokens_response(result: TokenClassification) -> pb.ClassifyTokensResponse:
    return pb.ClassifyTokensResponse(
        tokens=[pb.TokenLabel(token=t.token, label=t.label, score=t.score, start=t.start, end=t.end)
                for t in result.tokens],
        entities=[pb.Entity(entity_group=e.entity_group, score=e.score, word=e.word, start=e.start, end=e.end)
                  for e in result.entities])


def answer_response(a: Answer) -> pb.AnswerQuestionResponse:
    return pb.AnswerQuestionResponse(answer=a.answer, score=a.score, start=a.start, end=a.end)


def embed_response(model: str, vectors: list[list[float]], usage: Usage) -> pb.EmbedResponse:
    return pb.EmbedResponse(model=model, usage=usage_to_proto(usage),
                            data=[pb.Embedding(index=i, values=vec) for i, vec in enumerate(vectors)])


def list_models_response(models: list[ModelCard]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[
        pb.ModelCard(id=m.id, task=m.task, max_model_len=m.max_model_len, owned_by=m.owned_by,
                     sampling_defaults=m.sampling_defaults, reasoning_parser=m.reasoning_parser or "",
                     parent=m.parent or "")
        for m in models])


def reward_response(model: str, rows: list[list[list[float]]], usage: Usage) -> pb.RewardResponse:
    return pb.RewardResponse(id=new_id("pool"), model=model, usage=usage_to_proto(usage), data=[
        pb.RewardResult(index=i, rows=[pb.FloatRow(values=r) for r in result]) for i, result in enumerate(rows)])
