"""The wire layer and the error contract: deployments/errors.py, http_api/schemas.py, grpc_api/convert.py
and frontend/requests.py: errors, validation naming the field, one set of sampling defaults and
limits for HTTP and gRPC (SamplingParams'), the API key check, and OpenAI-client compatibility of the
response models."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct

import grpc
import httpx
import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from google.protobuf.message import Message as ProtoMessage

from deployments import errors as E
from deployments.errors import ERROR_CLASSES, ErrorCode
from deployments.frontend import requests as R
from deployments.grpc_api import convert as C
from deployments.http_api import schemas as S
from qwen2_model.engine.sampling import SamplingParams
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb

# ---------------------------------------------------------------------------------------------
# Error contract: DESIGN.md's table


@pytest.mark.parametrize(
    "error, status, code",
    [
        (E.InvalidRequestError("bad", param="n"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (E.ContextLengthExceededError("too long"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (E.BodyTooLargeError("big"), 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (E.UnauthenticatedError("who"), 401, grpc.StatusCode.UNAUTHENTICATED),
        (E.ModelNotFoundError("gpt-9"), 404, grpc.StatusCode.NOT_FOUND),
        (E.QueueFullError(), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (E.RequestTimeoutError("slow"), 408, grpc.StatusCode.DEADLINE_EXCEEDED),
        (E.UnavailableError("down"), 503, grpc.StatusCode.UNAVAILABLE),
        (E.InternalError("oops"), 500, grpc.StatusCode.INTERNAL),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, Exception) else None,
)
def test_error_maps_to_http_and_grpc(error, status, code):
    http_status, body, headers = error.to_http()
    assert http_status == status == error.http_status
    assert error.grpc_status() == code
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == error.code.value
    assert body["error"]["message"] == error.message
    json.dumps(body)  # serializable as-is
    if status == 429:
        assert headers == {"Retry-After": "1"}
        assert dict(error.grpc_trailing_metadata()) == {"retry-after": "1"}
    else:
        assert headers == {}
        assert error.grpc_trailing_metadata() == ()


def test_every_code_has_one_class():
    assert set(ERROR_CLASSES) == set(ErrorCode)
    for code, cls in ERROR_CLASSES.items():
        assert issubclass(cls, E.ServeError) and cls.code is code


def test_retry_after_rounds_up_to_whole_seconds():
    assert E.QueueFullError(retry_after=2.2).to_http()[2] == {"Retry-After": "3"}


def test_param_in_body_and_grpc_details():
    err = E.InvalidRequestError("must be positive", param="max_tokens")
    assert err.to_http()[1]["error"]["param"] == "max_tokens"
    assert err.grpc_details().startswith("max_tokens:")
    assert E.ModelNotFoundError("nope", available=["qwen2"]).to_http()[1]["error"]["param"] == "model"


def _openai_client(handler) -> openai.OpenAI:
    """The real openai client, its HTTP answered in-process by `handler(request) -> httpx.Response`."""
    return openai.OpenAI(api_key="k", base_url="http://test/v1", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize(
    "error, exc",
    [(E.InvalidRequestError("m", param="n"), openai.BadRequestError),
     (E.UnauthenticatedError("m"), openai.AuthenticationError),
     (E.ModelNotFoundError("m"), openai.NotFoundError),
     (E.QueueFullError("m"), openai.RateLimitError),
     (E.InternalError("m"), openai.InternalServerError),
     (E.UnavailableError("m"), openai.InternalServerError)],
    ids=lambda x: type(x).__name__,
)
def test_openai_client_raises_the_matching_exception(error, exc):
    status, body, headers = error.to_http()
    client = _openai_client(lambda request: httpx.Response(status, json=body, headers=headers))
    with pytest.raises(exc) as info:
        client.models.list()
    assert info.value.status_code == status
    assert info.value.body["message"] == error.message


# ---------------------------------------------------------------------------------------------
# Pydantic validation -> invalid_request naming the field


def _validation_error(model, body) -> E.InvalidRequestError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    err = E.validation_error_to_serve_error(info.value)
    assert isinstance(err, E.InvalidRequestError)
    return err


@pytest.mark.parametrize(
    "model, body, param",
    [
        (S.CompletionRequest, {"prompt": "hi", "max_tokens": "lots"}, "max_tokens"),
        (S.CompletionRequest, {"prompt": "hi", "n": 1.5}, "n"),
        (S.CompletionRequest, {"prompt": {"a": 1}}, "prompt"),
        (S.CompletionRequest, {}, "prompt"),
        (S.CompletionRequest, {"prompt": "hi", "stop": [1]}, "stop"),
        (S.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
        (S.ChatCompletionRequest, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (S.ChatCompletionRequest, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (S.ChatCompletionRequest,
         {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content"),
        (S.ChatCompletionRequest, {"messages": []}, "messages"),
        (S.EmbeddingRequest, {"input": "x", "dimensions": 8}, "dimensions"),
        (S.EmbeddingRequest, {"input": "x", "encoding_format": "int8"}, "encoding_format"),
        (S.ClassifyRequest, {"input": [1, 2]}, "input"),
        (S.TokenClassifyRequest, {"input": "x", "aggregation": "max"}, "aggregation"),
        (S.AnswerRequest, {"question": "q", "context": ""}, "context"),
        (S.DetokenizeRequest, {"tokens": [1, -2]}, "tokens.1"),
    ],
)
def test_validation_error_names_the_field(model, body, param):
    err = _validation_error(model, body)
    assert err.param == param
    assert param in err.message
    status, out, _ = err.to_http()
    assert status == 400 and out["error"]["param"] == param


def test_echo_is_for_completions_with_prompt_logprobs_when_logprobs_are_asked():
    err = _validation_error(S.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "echo": True})
    assert "echo is supported by /v1/completions only" in err.message
    for req in (S.CompletionRequest(prompt="hi", echo=True, logprobs=2), pb.GenerateRequest(prompt="hi", echo=True,
                                                                                            logprobs=2)):
        fields = to_fields(req)
        assert fields["echo"] is True and fields["prompt_logprobs"] == 2
    assert to_fields(S.CompletionRequest(prompt="hi", echo=True))["prompt_logprobs"] is None
    assert to_fields(S.CompletionRequest(prompt="hi", logprobs=2))["prompt_logprobs"] is None
    err = _bad(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], echo=True))
    assert err.param == "echo" and "not with 'messages'" in err.message


# A value each refused field may be sent with (refused), and its neutral value (accepted).
UNSUPPORTED_EXAMPLES = {
    "suffix": ("end", None), "best_of": (2, 1),
    "functions": ([{"name": "f"}], None), "function_call": ("auto", None),
    "use_beam_search": (True, False), "length_penalty": (0.5, 1.0), "prompt_logprobs": (1, None),
    "allowed_token_ids": ([1, 2], None), "bad_words": (["x"], []), "include_stop_str_in_output": (True, False),
    "skip_special_tokens": (False, True), "truncate_prompt_tokens": (8, None), "continue_final_message": (True, False),
}


@pytest.mark.parametrize("model, base", [(S.CompletionRequest, {"prompt": "hi"}),
                                         (S.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})])
@pytest.mark.parametrize("field", sorted(S.UNSUPPORTED_FIELDS))
def test_fields_we_do_not_do_are_refused_by_name_not_ignored(model, base, field):
    refused, neutral = UNSUPPORTED_EXAMPLES[field]
    err = _validation_error(model, {**base, field: refused})
    assert err.param == field and err.to_http()[0] == 400
    model.model_validate({**base, field: neutral})


def test_fastapi_style_locations_drop_body_prefix():
    class FakeRequestValidationError:
        def errors(self):
            return [{"type": "int_parsing", "loc": ("body", "max_tokens"), "msg": "Input should be a valid integer"}]

    err = E.validation_error_to_serve_error(FakeRequestValidationError())
    assert err.param == "max_tokens"


def test_unknown_fields_are_ignored():
    req = S.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": True, "metadata": {"a": 1}}
    )
    assert not hasattr(req, "parallel_tool_calls")


def test_request_shapes_accepted():
    for prompt in ("a", ["a", "b"], [1, 2], [[1], [2, 3]]):
        assert S.CompletionRequest(prompt=prompt).prompt == prompt
    chat = S.ChatCompletionRequest.model_validate({
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
    })
    assert chat.messages[1].text() == "ab"
    assert chat.tools[0]["function"]["name"] == "f" and chat.tool_choice == "auto"
    assert S.EmbeddingRequest(input="x", encoding_format="base64").encoding_format == "base64"
    assert S.TokenizeRequest(prompt="x").add_special_tokens is True


# ---------------------------------------------------------------------------------------------
# The wire layers rename; SamplingParams owns defaults and ranges, the same for HTTP and gRPC


def options(req, limits: R.Limits = R.DEFAULT_LIMITS) -> R.GenerationOptions:
    """A request through its wire layer's renaming, then the Frontend's one validation."""
    opts = C.generation_options(req) if isinstance(req, ProtoMessage) else S.generation_options(req)
    opts.validate(limits)
    return opts


def to_fields(req, limits: R.Limits = R.DEFAULT_LIMITS) -> dict:
    opts = options(req, limits)
    return {**dataclasses.asdict(opts.sampling), "echo": opts.echo, "stop": opts.stop}


def test_defaults_identical_for_http_and_grpc_and_are_sampling_params():
    http = to_fields(S.CompletionRequest(prompt="hi"))
    rpc = to_fields(pb.GenerateRequest(prompt="hi"))
    assert http == rpc == {**dataclasses.asdict(SamplingParams()), "echo": False, "stop": []}
    assert http["max_tokens"] == 16 and http["temperature"] == 1.0 and http["n"] == 1 and http["logprobs"] is None


def test_chat_defaults_identical_for_http_and_grpc():
    http = to_fields(S.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
    rpc = to_fields(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]))
    assert http == rpc
    assert http["max_tokens"] is None  # the rest of the context: the engine resolves it with the prompt length


def test_completion_max_tokens_null_means_the_rest_of_the_context():
    assert to_fields(S.CompletionRequest.model_validate({"prompt": "x", "max_tokens": None}))["max_tokens"] is None
    assert to_fields(S.CompletionRequest.model_validate({"prompt": "x"}))["max_tokens"] == 16


def test_same_fields_for_http_and_grpc():
    knobs = dict(n=2, max_tokens=32, min_tokens=4, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
                 repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.25, seed=1234,
                 stop_token_ids=[151643], ignore_eos=True, logprobs=3)
    http = to_fields(S.CompletionRequest.model_validate(
        {"prompt": "hi", "stop": "\n", "logit_bias": {"42": 5.5, "7": -100}, **knobs}))
    rpc = to_fields(pb.GenerateRequest(prompt="hi", stop=["\n"], logit_bias={42: 5.5, 7: -100}, **knobs))
    assert http == rpc
    assert http == {**knobs, "logit_bias": {42: 5.5, 7: -100.0}, "prompt_logprobs": None, "structured": None, "echo": False,
                    "stop": ["\n"]}


def test_chat_logprobs_and_max_completion_tokens():
    req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=5,
                                  max_tokens=10, max_completion_tokens=20)
    fields = to_fields(req)
    assert fields["logprobs"] == 5 and fields["max_tokens"] == 20
    plain = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True)
    assert to_fields(plain)["logprobs"] == 0
    with pytest.raises(E.InvalidRequestError) as info:
        to_fields(S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_logprobs=2))
    assert info.value.param == "top_logprobs"


def test_top_k_minus_one_is_accepted_as_disabled():
    assert to_fields(S.CompletionRequest(prompt="x", top_k=-1))["top_k"] == -1
    assert to_fields(pb.GenerateRequest(prompt="x", top_k=-1))["top_k"] == -1


def _bad(req, limits: R.Limits = R.DEFAULT_LIMITS) -> E.InvalidRequestError:
    with pytest.raises(E.InvalidRequestError) as info:
        to_fields(req, limits)
    return info.value


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [str(i) for i in range(9)]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"seed": 2**63}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),  # JSON keys are strings; the proto's are uint32
        ({"logit_bias": {"5": float("nan")}}, "logit_bias"),
        ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
        ({"logit_bias": {"five": 1.0}}, "logit_bias"),
    ],
)
def test_limits_name_the_field_for_http_and_grpc(kwargs, param):
    err = _bad(S.CompletionRequest(prompt="x", **kwargs))
    assert err.param == param and param in err.message
    assert err.to_http()[0] == 400
    # Every case a GenerateRequest can carry fails the same way over gRPC (uint32 has no negatives).
    if kwargs.get("stop_token_ids") != [-1] and "five" not in kwargs.get("logit_bias", {}) and "seed" not in kwargs:
        if "logit_bias" in kwargs:
            kwargs = {"logit_bias": {int(t): b for t, b in kwargs["logit_bias"].items()}}
        err_rpc = _bad(pb.GenerateRequest(prompt="x", **kwargs))
        assert (err_rpc.param, err_rpc.message) == (err.param, err.message)
        assert err_rpc.grpc_status() == grpc.StatusCode.INVALID_ARGUMENT


def test_limit_messages_name_the_client_field():
    req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_completion_tokens=0)
    assert _bad(req).param == "max_completion_tokens"
    req = S.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21)
    assert _bad(req).param == "top_logprobs"


def test_custom_limits():
    limits = R.Limits(max_n=2, max_stop_strings=1)
    with pytest.raises(E.InvalidRequestError, match="between 1 and 2"):
        to_fields(S.CompletionRequest(prompt="x", n=3), limits)
    with pytest.raises(E.InvalidRequestError, match="at most 1 stop"):
        to_fields(pb.GenerateRequest(prompt="x", stop=["a", "b"]), limits)


def test_normalize_inputs():
    assert R.normalize_inputs("a", "prompt") == ["a"]
    assert R.normalize_inputs(["a", "b"], "input") == ["a", "b"]
    assert R.normalize_inputs([1, 2], "prompt") == [[1, 2]]
    assert R.normalize_inputs([[1], [2, 3]], "prompt") == [[1], [2, 3]]
    for bad, param in (([], "input"), ("", "input"), (["a", ""], "input.1"), ([[1], []], "input.1"),
                       ([[1, -1]], "input.0"), (["a"] * 65, "input")):
        with pytest.raises(E.InvalidRequestError) as info:
            R.normalize_inputs(bad, "input")
        assert info.value.param == param


def test_body_size():
    R.check_body_size(1 << 20)
    with pytest.raises(E.BodyTooLargeError) as info:
        R.check_body_size((1 << 20) + 1)
    assert info.value.to_http()[0] == 413 and info.value.grpc_status() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------------------------------------
# API key


def test_api_key():
    E.check_api_key("Bearer s3cret", "s3cret")
    E.check_api_key("bearer   s3cret ", "s3cret")
    E.check_api_key("s3cret", "s3cret")  # bare key, e.g. from gRPC metadata
    E.check_api_key(None, None)  # auth disabled
    E.check_api_key("anything", "")
    for provided in (None, "", "Bearer ", "Bearer wrong", "wrong", "Basic s3cret", "Bearer s3cret2", "Bearer ключ"):
        with pytest.raises(E.UnauthenticatedError) as info:
            E.check_api_key(provided, "s3cret")
        assert info.value.to_http()[0] == 401
        assert info.value.grpc_status() == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------------------------------------
# Responses parse with the openai client's own types


def _through_json(model):
    return json.loads(model.model_dump_json())


def test_completion_response_parses_with_openai():
    resp = S.CompletionResponse(
        model="qwen2",
        choices=[S.CompletionChoice(index=0, text="hi", finish_reason="length", logprobs=S.CompletionLogprobs(
            text_offset=[0], token_logprobs=[-0.5], tokens=["hi"], top_logprobs=[{"hi": -0.5}]))],
        usage=S.UsageInfo(prompt_tokens=2, completion_tokens=1, total_tokens=3),
    )
    parsed = Completion.model_validate(_through_json(resp))
    assert parsed.choices[0].text == "hi" and parsed.usage.total_tokens == 3
    assert parsed.id.startswith("cmpl-") and parsed.object == "text_completion"
    chunk = S.CompletionStreamResponse(id=resp.id, model="qwen2", choices=[S.CompletionChoice(index=0, text="h")])
    assert Completion.construct(**_through_json(chunk)).choices[0].text == "h"


def test_chat_response_parses_with_openai():
    resp = S.ChatCompletionResponse(
        model="qwen2",
        choices=[
            S.ChatCompletionChoice(index=0, message=S.ChatResponseMessage(content="hello"), finish_reason="stop",
                                   logprobs=S.ChatChoiceLogprobs(content=[S.ChatTokenLogprob(
                                       token="hello", logprob=-0.1, top_logprobs=[S.ChatTopLogprob(token="hello",
                                                                                                     logprob=-0.1)])])),
            S.ChatCompletionChoice(index=1, message=S.ChatResponseMessage(tool_calls=[
                S.ToolCall(function=S.FunctionCall(name="f", arguments='{"x": 1}'))]), finish_reason="tool_calls"),
        ],
        usage=S.UsageInfo(prompt_tokens=5, completion_tokens=1, total_tokens=6),
    )
    parsed = ChatCompletion.model_validate(_through_json(resp))
    assert parsed.choices[0].message.content == "hello"
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.1
    assert parsed.choices[1].message.tool_calls[0].function.name == "f"


def test_chat_chunks_parse_with_openai():
    first = S.ChatCompletionStreamResponse(id="chatcmpl-1", model="qwen2", choices=[
        S.ChatCompletionStreamChoice(index=0, delta=S.DeltaMessage(role="assistant", content=""))])
    last = S.ChatCompletionStreamResponse(id="chatcmpl-1", model="qwen2", choices=[
        S.ChatCompletionStreamChoice(index=0, delta=S.DeltaMessage(content="!"), finish_reason="stop")])
    usage = S.ChatCompletionStreamResponse(id="chatcmpl-1", model="qwen2", choices=[],
                                           usage=S.UsageInfo(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    parsed = [ChatCompletionChunk.model_validate(_through_json(c)) for c in (first, last, usage)]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[1].choices[0].finish_reason == "stop"
    assert parsed[2].choices == [] and parsed[2].usage.total_tokens == 3
    # Same again with None fields left out, as an SSE writer may send them.
    assert ChatCompletionChunk.model_validate(json.loads(first.model_dump_json(exclude_none=True))).id == "chatcmpl-1"


def test_streamed_chat_parses_through_the_openai_client():
    chunks = [
        S.ChatCompletionStreamResponse(id="chatcmpl-1", model="qwen2", choices=[
            S.ChatCompletionStreamChoice(index=0, delta=S.DeltaMessage(role="assistant", content="Hel"))]),
        S.ChatCompletionStreamResponse(id="chatcmpl-1", model="qwen2", choices=[
            S.ChatCompletionStreamChoice(index=0, delta=S.DeltaMessage(content="lo"), finish_reason="stop")]),
        S.ChatCompletionStreamResponse(id="chatcmpl-1", model="qwen2", choices=[],
                                       usage=S.UsageInfo(prompt_tokens=1, completion_tokens=2, total_tokens=3)),
    ]
    sse = "".join(f"data: {c.model_dump_json(exclude_none=True)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        body = S.ChatCompletionRequest.model_validate_json(request.content)
        assert body.stream and body.stream_options.include_usage
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    stream = _openai_client(handler).chat.completions.create(
        model="qwen2", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    got = list(stream)
    assert "".join(c.choices[0].delta.content for c in got if c.choices) == "Hello"
    assert got[1].choices[0].finish_reason == "stop" and got[-1].usage.total_tokens == 3


def test_embedding_response_parses_with_openai_in_both_formats():
    values = [0.5, -0.25, 1.0]  # exact in float32, so base64 round-trips exactly
    seen_formats = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = S.EmbeddingRequest.model_validate_json(request.content)
        seen_formats.append(body.encoding_format)
        resp = S.EmbeddingResponse(
            model=body.model,
            data=[S.EmbeddingData(index=0, embedding=S.encode_embedding(values, body.encoding_format))],
            usage=S.UsageInfo(prompt_tokens=3, total_tokens=3),
        )
        return httpx.Response(200, content=resp.model_dump_json(), headers={"content-type": "application/json"})

    client = _openai_client(handler)
    # Default call: the client asks for base64 itself and decodes it; must work out of the box.
    assert client.embeddings.create(model="emb", input="x").data[0].embedding == values
    assert client.embeddings.create(model="emb", input="x", encoding_format="float").data[0].embedding == values
    assert seen_formats == ["base64", "float"]
    resp = S.EmbeddingResponse(model="emb", data=[S.EmbeddingData(index=0, embedding=values)],
                               usage=S.UsageInfo(prompt_tokens=3, total_tokens=3))
    assert CreateEmbeddingResponse.model_validate(_through_json(resp)).data[0].embedding == values
    raw = base64.b64decode(S.encode_embedding(values, "base64"))
    assert list(struct.unpack("<3f", raw)) == values


def test_model_list_and_pooling_shapes():
    from openai.types import Model

    card = S.ModelCard(id="qwen2", max_model_len=32768, task="generate")
    assert Model.model_validate(_through_json(card)).id == "qwen2"
    ml = _through_json(S.ModelList(data=[card]))
    assert ml["object"] == "list" and ml["data"][0]["max_model_len"] == 32768
    cls = _through_json(S.ClassifyResponse(model="c", data=[S.ClassificationData(index=0, label="POS", probs=[0.2, 0.8],
                                                                                  num_classes=2)],
                                           usage=S.UsageInfo(prompt_tokens=3, total_tokens=3)))
    assert cls["object"] == "list" and set(cls["data"][0]) == {"index", "label", "probs", "num_classes"}
    ans = _through_json(S.AnswerResponse(answer="Paris", score=0.9, start=3, end=8))
    assert ans == {"answer": "Paris", "score": 0.9, "start": 3, "end": 8}
    tok = _through_json(S.TokenizeResponse(tokens=[1, 2], count=2, max_model_len=10))
    assert tok == {"tokens": [1, 2], "count": 2, "max_model_len": 10}
    assert _through_json(S.DetokenizeResponse(prompt="hi")) == {"prompt": "hi"}
