"""deployments/grpc_ingress.py without Ray: request validation, frontend results -> response protos,
the error contract on a gRPC context, stream message order, and the typed client's request builder.

The mixin is driven with a stand-in frontend (documented Frontend API) and a recording context;
the real path (Serve's proxy, the real frontend and router) is tests/e2e/test_grpc.py.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from deployments import grpc_ingress as G
from deployments.client import ClientError, build_generate_request
from deployments.errors import ModelNotFoundError, QueueFullError
from deployments.frontend import Choice, ModelEntry, Usage
from deployments.frontend import GenerationDelta as Delta
from deployments.protocol import Limits
from deployments.tool_calls import ParsedToolCall
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb


def Entry(name: str, max_model_len: int = 64) -> ModelEntry:
    return ModelEntry(name, path="", task="generate", tokenizer=None, router=None, max_model_len=max_model_len)


class Ctx:
    """Records what a RayServegRPCContext would carry back."""

    def __init__(self, metadata=()):
        self.md = list(metadata)
        self.code = self.details = None
        self.trailing = []

    def invocation_metadata(self):
        return self.md

    def set_code(self, c):
        self.code = c

    def set_details(self, d):
        self.details = d

    def set_trailing_metadata(self, t):
        self.trailing = list(t)


class FakeRouter:
    """A Router handle whose info() answers, or fails like a dead engine."""

    def __init__(self, alive=True):
        self.alive = alive
        self.info = self

    async def remote(self):
        if not self.alive:
            raise RuntimeError("engine failed")
        return {"architecture": "Qwen2ForCausalLM"}


class FakeFrontend:
    api_key = None

    def __init__(self):
        self.calls = []
        self.closed = False
        self.models = [ModelEntry("m", path="", task="generate", tokenizer=None, router=FakeRouter(), max_model_len=64)]

    def resolve(self, model, task=None):
        if model not in (None, "m"):
            raise ModelNotFoundError(model, available=["m"])
        return Entry("m")

    def list_models(self):
        return [{"id": "m", "task": "generate", "max_model_len": 64, "owned_by": "qwen2-serve"}]

    def render_chat(self, model, messages, tools=None, **kw):
        self.tools = tools
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def tokenize(self, model, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def detokenize(self, model, ids):
        return "".join(chr(i) for i in ids)

    async def generate_stream(self, model, prompt, sampling, request_id=None, **options):
        self.calls.append((model, prompt, sampling, options))
        try:
            for i in range(sampling["n"]):
                yield Delta(i, "a", [1], None, None)
            for i in range(sampling["n"]):
                yield Delta(i, "b", [2], [{"token_id": 2, "token": "b", "logprob": -0.5,
                                           "top_logprobs": [{"token_id": 3, "token": "c", "logprob": -1.0}]}], "length")
            yield Usage(3, 2 * sampling["n"], 3 + 2 * sampling["n"])
        finally:
            self.closed = True

    async def generate(self, model, prompt, sampling, request_id=None, **options):
        self.calls.append((model, prompt, sampling, options))
        if prompt == "busy":
            raise QueueFullError(retry_after=2.5)
        if options.get("parse_tool_calls"):
            return [Choice(0, "ok", [1], None, "tool_calls", [ParsedToolCall("f", '{"x": 1}')])], Usage(3, 1, 4)
        return [Choice(0, "ab", [1, 2], None, "length")], Usage(3, 2, 5)

    async def classify(self, model, inputs):
        return [{"index": i, "label": "pos", "probs": [0.25, 0.75], "num_classes": 2} for i in range(len(inputs))], Usage(4, 0, 4)

    async def classify_tokens(self, model, text, aggregation="none"):
        toks = [{"token": "Ada", "label": "B-PER", "score": 0.9, "start": 0, "end": 3}]
        ents = [{"entity_group": "PER", "score": 0.9, "word": "Ada", "start": 0, "end": 3}] if aggregation == "simple" else []
        return toks, ents

    async def answer(self, model, question, context):
        return {"answer": context[0:3], "score": 0.5, "start": 0, "end": 3}

    async def embed(self, model, inputs, pooling="last", normalize=True):
        return [[1.0, 0.0]] * len(inputs), Usage(2, 0, 2)


class Ingress(G.GrpcIngressMixin):
    def __init__(self, api_key=None, limits=None):
        self.frontend = FakeFrontend()
        self.api_key = api_key
        if limits:
            self.limits = limits


def run(coro):
    return asyncio.run(coro)


async def collect(agen):
    return [m async for m in agen]


# ---------------------------------------------------------------------------------------------
# Request validation


@pytest.mark.parametrize("req, param", [
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(prompt="x", prompt_token_ids=[1]), "prompt_token_ids"),
    (pb.GenerateRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="hi")]), "messages"),
])
def test_exactly_one_prompt_kind(req, param):
    with pytest.raises(G.InvalidRequestError) as e:
        G.generate_input(req)
    assert e.value.param == param
    assert e.value.grpc_status() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Exactly one of" in e.value.grpc_details()


def test_generate_input_kinds():
    assert G.generate_input(pb.GenerateRequest(prompt="hi")) == ("prompt", "hi")
    assert G.generate_input(pb.GenerateRequest(prompt_token_ids=[5, 6])) == ("prompt_token_ids", [5, 6])
    kind, msgs = G.generate_input(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]))
    assert kind == "messages" and msgs == [{"role": "user", "content": "hi"}]
    with pytest.raises(G.InvalidRequestError) as e:
        G.generate_input(pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="hi")]))
    assert e.value.param == "messages.0.role"


def test_sampling_defaults_match_http():
    f = G.sampling_fields(pb.GenerateRequest(prompt="x"))
    assert f["max_tokens"] == 16 and f["n"] == 1 and f["temperature"] == 1.0 and f["logprobs"] is None
    chat = G.sampling_fields(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")]))
    assert chat["max_tokens"] is None  # the rest of the context, as chat over HTTP
    with pytest.raises(G.InvalidRequestError) as e:
        G.sampling_fields(pb.GenerateRequest(prompt="x", top_p=1.5))
    assert e.value.param == "top_p" and e.value.grpc_details().startswith("top_p: ")


def test_choose_and_required():
    assert G.choose("", G.AGGREGATIONS, "aggregation") == "none"
    assert G.choose("simple", G.AGGREGATIONS, "aggregation") == "simple"
    with pytest.raises(G.InvalidRequestError) as e:
        G.choose("max", G.POOLINGS, "pooling")
    assert e.value.param == "pooling"
    with pytest.raises(G.InvalidRequestError) as e:
        G.required_text("", "question")
    assert e.value.param == "question"
    with pytest.raises(G.InvalidRequestError) as e:
        G.batch_inputs([], "input")
    assert e.value.param == "input"


# ---------------------------------------------------------------------------------------------
# Responses


def test_choice_and_logprobs_to_proto():
    c = Choice(1, "hi", [4, 5], [{"token_id": 4, "token": "h", "logprob": -0.1, "top_logprobs": [
        {"token_id": 9, "token": "x", "logprob": -2.0}]}], "stop")
    p = G.choice_to_proto(c)
    assert (p.index, p.text, list(p.token_ids), p.finish_reason) == (1, "hi", [4, 5], "stop")
    assert p.logprobs[0].token == "h" and p.logprobs[0].top_logprobs[0].token_id == 9
    assert G.choice_to_proto(Choice(0, "", [], None, None)).finish_reason == ""
    u = G.usage_to_proto(Usage(3, 4, 7))
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (3, 4, 7)


def test_other_responses_to_proto():
    r = G.classify_response("id", "m", [{"index": 0, "label": "a", "probs": [0.5, 0.5], "num_classes": 2}], Usage(1, 0, 1))
    assert r.results[0].label == "a" and list(r.results[0].probs) == [0.5, 0.5] and r.usage.total_tokens == 1
    t = G.classify_tokens_response([{"token": "x", "label": "O", "score": 0.5, "start": 0, "end": 1}], None)
    assert t.tokens[0].end == 1 and len(t.entities) == 0
    a = G.answer_response({"answer": "Ada", "score": 0.5, "start": 0, "end": 3})
    assert (a.answer, a.start, a.end) == ("Ada", 0, 3)
    e = G.embed_response("m", [[0.5, 0.25]], Usage(1, 0, 1))
    assert list(e.data[0].values) == [0.5, 0.25]
    m = G.list_models_response([{"id": "m", "task": "generate", "max_model_len": 64, "owned_by": "x"}])
    assert m.models[0].max_model_len == 64


def test_stream_messages_usage_on_last_and_finish_per_choice():
    async def items():
        yield Delta(0, "a", [1], None, None)
        yield Delta(1, "b", [2], None, None)
        yield Delta(0, "c", [3], None, "stop")
        yield Delta(1, "d", [4], None, "length")
        yield Usage(2, 4, 6)

    msgs = run(collect(G.stream_messages("id", "m", 2, items())))
    assert [m.text for m in msgs] == ["a", "b", "c", "d"]
    assert [m.HasField("usage") for m in msgs] == [False, False, False, True]
    assert msgs[-1].usage.total_tokens == 6 and msgs[-1].finish_reason == "length"
    assert {m.index: m.finish_reason for m in msgs if m.finish_reason} == {0: "stop", 1: "length"}


def test_stream_messages_usage_alone():
    async def items():
        yield Usage(2, 0, 2)

    msgs = run(collect(G.stream_messages("id", "m", 1, items())))
    assert len(msgs) == 1 and msgs[0].usage.prompt_tokens == 2


# ---------------------------------------------------------------------------------------------
# The mixin: every RPC and the error contract on the context


def test_every_rpc_with_fake_frontend():
    ing, ctx = Ingress(), Ctx()
    g = run(ing.Generate(pb.GenerateRequest(prompt="hi", temperature=0), ctx))
    assert ctx.code is None and g.model == "m" and g.choices[0].text == "ab" and g.usage.total_tokens == 5
    assert g.id.startswith("cmpl-")
    assert ing.frontend.calls[-1][2]["temperature"] == 0.0 and ing.frontend.calls[-1][2]["max_tokens"] == 16

    msgs = run(collect(ing.GenerateStream(pb.GenerateRequest(prompt="hi", n=2), ctx)))
    assert ctx.code is None and len(msgs) == 4 and msgs[-1].usage.total_tokens == 7
    assert msgs[-1].logprobs[0].top_logprobs[0].token == "c"
    assert ing.frontend.closed

    run(ing.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="yo")]), ctx))
    assert ing.frontend.calls[-1][1] == "user:yo" and ing.frontend.calls[-1][2]["max_tokens"] is None

    assert run(ing.Classify(pb.ClassifyRequest(input=["a", "b"]), ctx)).results[1].index == 1
    ct = run(ing.ClassifyTokens(pb.ClassifyTokensRequest(input="Ada", aggregation="simple"), ctx))
    assert ct.entities[0].entity_group == "PER"
    assert run(ing.AnswerQuestion(pb.AnswerQuestionRequest(question="who", context="Ada wrote"), ctx)).answer == "Ada"
    assert len(run(ing.Embed(pb.EmbedRequest(input=["x"]), ctx)).data[0].values) == 2
    tok = run(ing.Tokenize(pb.TokenizeRequest(text="ab"), ctx))
    assert list(tok.token_ids) == [97, 98] and tok.count == 2 and tok.max_model_len == 64
    assert run(ing.Detokenize(pb.DetokenizeRequest(token_ids=[97]), ctx)).text == "a"
    assert run(ing.ListModels(pb.ListModelsRequest(), ctx)).models[0].id == "m"
    assert ctx.code is None


def test_chat_tools_reach_the_template_and_calls_come_back():
    ing, ctx = Ingress(), Ctx()
    tools = [{"type": "function", "function": {"name": "f"}}]
    chat = [pb.ChatMessage(role="user", content="yo")]
    g = run(ing.Generate(pb.GenerateRequest(messages=chat, tools_json=json.dumps(tools)), ctx))
    assert ctx.code is None and ing.frontend.tools == tools and ing.frontend.calls[-1][3]["parse_tool_calls"]
    assert g.choices[0].finish_reason == "tool_calls" and g.choices[0].text == "ok"
    call = g.choices[0].tool_calls[0]
    assert (call.name, call.arguments) == ("f", '{"x": 1}') and call.id.startswith("call")
    run(ing.Generate(pb.GenerateRequest(messages=chat, tools_json=json.dumps(tools), tool_choice="none"), ctx))
    assert ing.frontend.tools == tools and not ing.frontend.calls[-1][3]["parse_tool_calls"]
    run(ing.Generate(pb.GenerateRequest(messages=chat), ctx))
    assert ing.frontend.tools is None and not ing.frontend.calls[-1][3]["parse_tool_calls"]
    msg = G.delta_to_proto("id", "m", Delta(0, "", [5], None, "tool_calls", [ParsedToolCall("g", "{}")]))
    assert [c.name for c in msg.tool_calls] == ["g"] and msg.finish_reason == "tool_calls"


@pytest.mark.parametrize("req, param, words", [
    (pb.GenerateRequest(prompt="x", tools_json="[]"), "tools_json", "only goes with 'messages'"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], tools_json="[{"), "tools_json",
     "not valid JSON"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], tools_json='{"a": 1}'), "tools_json",
     "JSON array of tool objects"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], tools_json="[]", tool_choice="required"),
     "tool_choice", "constrained decoding"),
])
def test_chat_tools_errors_name_the_field(req, param, words):
    ctx = Ctx()
    run(Ingress().Generate(req, ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details.startswith(f"{param}: ") and words in ctx.details


@pytest.mark.parametrize("method, req, code, param", [
    ("Generate", pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("Generate", pb.GenerateRequest(prompt="x", n=0), grpc.StatusCode.INVALID_ARGUMENT, "n"),
    ("Generate", pb.GenerateRequest(prompt="x", model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
    ("Classify", pb.ClassifyRequest(input=[]), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    ("ClassifyTokens", pb.ClassifyTokensRequest(input="x", aggregation="max"), grpc.StatusCode.INVALID_ARGUMENT, "aggregation"),
    ("AnswerQuestion", pb.AnswerQuestionRequest(question="q"), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    ("Embed", pb.EmbedRequest(input=["x"], pooling="max"), grpc.StatusCode.INVALID_ARGUMENT, "pooling"),
    ("Tokenize", pb.TokenizeRequest(text="x", model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
])
def test_errors_set_code_and_details(method, req, code, param):
    ctx = Ctx()
    resp = run(getattr(Ingress(), method)(req, ctx))
    assert resp == type(resp)()  # an empty message goes with the error status
    assert ctx.code == code
    assert ctx.details.startswith(f"{param}: ")
    assert ("error-param", param) in ctx.trailing


def test_queue_full_carries_retry_after():
    ctx = Ctx()
    run(Ingress().Generate(pb.GenerateRequest(prompt="busy"), ctx))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "3") in ctx.trailing


def test_body_size_cap():
    ctx = Ctx()
    run(Ingress(limits=Limits(max_body_bytes=10)).Generate(pb.GenerateRequest(prompt="x" * 100), ctx))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("metadata, code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer sk-1"),), None),
    ((("authorization", "sk-1"),), None),
])
def test_api_key_from_metadata(metadata, code):
    ctx = Ctx(metadata)
    run(Ingress(api_key="sk-1").ListModels(pb.ListModelsRequest(), ctx))
    assert ctx.code == code


def test_stream_error_sets_code_and_raises():
    ctx = Ctx()
    with pytest.raises(ModelNotFoundError):
        run(collect(Ingress().GenerateStream(pb.GenerateRequest(prompt="x", model="nope"), ctx)))
    assert ctx.code == grpc.StatusCode.NOT_FOUND and ctx.details.startswith("model: ")


def test_stream_cancel_closes_frontend_stream():
    ing = Ingress()

    async def go():
        agen = ing.GenerateStream(pb.GenerateRequest(prompt="x", n=1), Ctx())
        first = await agen.__anext__()
        await agen.aclose()  # what Serve does on client cancellation
        return first

    assert run(go()).text == "a"
    assert ing.frontend.closed


def test_unexpected_error_is_internal():
    ing = Ingress()

    def boom(*a, **k):
        raise RuntimeError("kaput")

    ing.frontend.list_models = boom
    ctx = Ctx()
    run(ing.ListModels(pb.ListModelsRequest(), ctx))
    assert ctx.code == grpc.StatusCode.INTERNAL and "kaput" in ctx.details


def test_health_check():
    from grpc_health.v1 import health_pb2

    ing, ctx = Ingress(), Ctx()
    assert run(ing.Check(health_pb2.HealthCheckRequest(), ctx)).status == health_pb2.HealthCheckResponse.SERVING
    assert run(ing.Check(health_pb2.HealthCheckRequest(service=G.SERVICE_NAME), ctx)).status == 1
    run(ing.Check(health_pb2.HealthCheckRequest(service="other"), ctx))
    assert ctx.code == grpc.StatusCode.NOT_FOUND
    ing.frontend.models[0].router.alive = False  # a Router whose engine died
    assert run(ing.Check(health_pb2.HealthCheckRequest(), Ctx())).status == health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------------------------------------
# The typed client's request building (no server)


def test_build_generate_request():
    r = build_generate_request("hi", "m", max_tokens=4, temperature=0, stop="\n", seed=None)
    assert r.prompt == "hi" and r.model == "m" and r.max_tokens == 4 and r.HasField("temperature")
    assert r.temperature == 0.0 and list(r.stop) == ["\n"] and not r.HasField("seed")
    r = build_generate_request([1, 2], stop_token_ids=[7])
    assert list(r.prompt_token_ids) == [1, 2] and list(r.stop_token_ids) == [7]
    r = build_generate_request(messages=[{"role": "user", "content": "x"}])
    assert r.messages[0].role == "user"
    with pytest.raises(TypeError):
        build_generate_request("x", max_new_tokens=3)


def test_client_error_retry_after():
    e = ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", [("retry-after", "2")])
    assert e.retry_after == 2.0 and "RESOURCE_EXHAUSTED" in str(e)
