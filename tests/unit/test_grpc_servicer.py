"""deployments/grpc_api without Ray: request validation, Frontend results -> response protos, the
error contract on a gRPC context, stream message order, and the typed client's request builder.

The servicer runs over the real Frontend (detokenizer, stop strings, validation) and the real Qwen
vocabulary; only the Router is scripted (tests/scripted_router.py). The real path (Serve's proxy,
the real router and model) is tests/e2e/test_grpc.py.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from deployments.client import ClientError, build_generate_request
from deployments.errors import InvalidRequestError, ModelNotFoundError, QueueFullError
from deployments.frontend.core import Frontend, ModelEntry
from deployments.frontend.requests import Limits
from deployments.frontend.results import (Answer, Choice, Classification, Entity, GenerationDelta as Delta,
                                          LogprobEntry, ModelCard, TokenClassification, TokenLabel, TopLogprob, Usage)
from deployments.frontend.tool_calls import ParsedToolCall
from deployments.grpc_api import convert as G
from deployments.grpc_api import servicer as S
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from tests.scripted_router import ScriptedRouter

ANSWER_TEXT = "Hello there"
LABELS = {0: "O", 1: "B-PER", 2: "I-PER"}


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


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    from qwen2_model.tokenizer import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(qwen_tokenizer_dir)


def _pooled(task, token_ids):
    if task == "classify":
        return [[0.25, 0.75] for _ in token_ids]
    if task == "classify_tokens":
        return [[[0.1, 0.8, 0.1]] + [[0.1, 0.1, 0.8]] * (len(ids) - 1) for ids in token_ids]
    if task == "answer":  # the best span: the first context token
        return [([0.0] * len(ids), [0.0] * len(ids)) for ids in token_ids]
    return [[1.0, 0.0] for _ in token_ids]


class Ingress(S.GrpcIngressMixin):
    """The servicer over the real Frontend: a causal LM "m" and heads for the one-shot tasks."""

    def __init__(self, tokenizer, api_key=None, limits=Limits()):
        self.router = ScriptedRouter(tokenizer.encode(ANSWER_TEXT), "length", pooled_results=_pooled)

        def entry(name, arch, task):
            return ModelEntry(name, path="/ckpt/" + name, architecture=arch, task=task, tokenizer=tokenizer,
                              router=self.router, max_model_len=64, id2label=LABELS)

        self.frontend = Frontend([entry("m", "Qwen2ForCausalLM", "generate"),
                                  entry("cls", "Qwen2ForSequenceClassification", "classify"),
                                  entry("ner", "Qwen2ForTokenClassification", "classify_tokens"),
                                  entry("qa", "Qwen2ForQuestionAnswering", "answer")], limits)
        self.api_key = api_key


@pytest.fixture
def ingress(tokenizer):
    return Ingress(tokenizer)


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
    with pytest.raises(InvalidRequestError) as e:
        G.generate_input(req)
    assert e.value.param == param


def test_generate_input_kinds():
    assert G.generate_input(pb.GenerateRequest(prompt="hi")) == ("prompt", "hi")
    assert G.generate_input(pb.GenerateRequest(prompt_token_ids=[5, 6])) == ("prompt_token_ids", [5, 6])
    kind, msgs = G.generate_input(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]))
    assert kind == "messages" and msgs == [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError) as e:
        G.generate_input(pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="hi")]))
    assert e.value.param == "messages.0.role"


def test_choose_and_required():
    assert G.choose("", G.AGGREGATIONS, "aggregation") == "none"
    assert G.choose("simple", G.AGGREGATIONS, "aggregation") == "simple"
    with pytest.raises(InvalidRequestError) as e:
        G.choose("max", G.POOLINGS, "pooling")
    assert e.value.param == "pooling"
    with pytest.raises(InvalidRequestError) as e:
        G.required_text("", "question")
    assert e.value.param == "question"


# ---------------------------------------------------------------------------------------------
# Responses: typed results map field for field


def test_choice_and_logprobs_to_proto():
    c = Choice(1, "hi", [4, 5], [LogprobEntry(4, "h", -0.1, [TopLogprob(9, "x", -2.0)]), LogprobEntry(5, "i", None)],
               "stop")
    p = G.choice_to_proto(c)
    assert (p.index, p.text, list(p.token_ids), p.finish_reason) == (1, "hi", [4, 5], "stop")
    assert p.logprobs[0].token == "h" and p.logprobs[0].top_logprobs[0].token_id == 9
    assert not p.logprobs[1].HasField("logprob")  # an echoed prompt's first token has none
    assert G.choice_to_proto(Choice(0, "", [], None, None)).finish_reason == ""
    u = G.usage_to_proto(Usage(3, 4, 7))
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (3, 4, 7)


def test_other_responses_to_proto():
    r = G.classify_response("id", "m", [Classification(0, "a", [0.5, 0.5], 2)], Usage(1, 0, 1))
    assert r.results[0].label == "a" and list(r.results[0].probs) == [0.5, 0.5] and r.usage.total_tokens == 1
    t = G.classify_tokens_response(TokenClassification([TokenLabel("x", "B-PER", 0.5, 0, 1)],
                                                       [Entity("PER", 0.5, "x", 0, 1)], Usage(1, 0, 1)))
    assert t.tokens[0].end == 1 and t.entities[0].entity_group == "PER"
    a = G.answer_response(Answer("Ada", 0.5, 0, 3))
    assert (a.answer, a.start, a.end) == ("Ada", 0, 3)
    e = G.embed_response("m", [[0.5, 0.25]], Usage(1, 0, 1))
    assert list(e.data[0].values) == [0.5, 0.25]
    m = G.list_models_response([ModelCard("m", "generate", 64, "/x", "me")])
    assert (m.models[0].max_model_len, m.models[0].owned_by) == (64, "me")


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
# The servicer over the real Frontend: every RPC and the error contract on the context


def test_every_rpc(ingress, tokenizer):
    ctx = Ctx()
    n_answer = len(tokenizer.encode(ANSWER_TEXT))
    g = run(ingress.Generate(pb.GenerateRequest(model="m", prompt="hi", temperature=0), ctx))
    assert ctx.code is None and g.model == "m" and g.choices[0].text == ANSWER_TEXT
    assert g.choices[0].finish_reason == "length" and g.id.startswith("cmpl-")
    assert g.usage.prompt_tokens == len(tokenizer.encode("hi")) and g.usage.completion_tokens == n_answer
    prompt_ids, params = ingress.router.requests[-1]
    assert prompt_ids == tokenizer.encode("hi") and params.temperature == 0.0 and params.max_tokens == 16

    msgs = run(collect(ingress.GenerateStream(pb.GenerateRequest(prompt="hi", n=2, logprobs=1), ctx)))
    assert ctx.code is None and msgs[-1].usage.completion_tokens == 2 * n_answer
    assert "".join(m.text for m in msgs if m.index == 1) == ANSWER_TEXT
    assert msgs[-1].logprobs[0].top_logprobs[0].token == msgs[-1].logprobs[0].token
    assert ingress.router.closed == 2

    run(ingress.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="yo")]), ctx))
    prompt_ids, params = ingress.router.requests[-1]
    assert "yo" in tokenizer.decode(prompt_ids) and params.max_tokens is None  # chat: the rest of the context

    assert run(ingress.Classify(pb.ClassifyRequest(input=["a", "b"]), ctx)).results[1].label == "B-PER"
    ct = run(ingress.ClassifyTokens(pb.ClassifyTokensRequest(input="Ada Lovelace", aggregation="simple"), ctx))
    assert [e.entity_group for e in ct.entities] == ["PER"] and ct.entities[0].word == "Ada Lovelace"
    qa = run(ingress.AnswerQuestion(pb.AnswerQuestionRequest(question="who", context="Ada wrote"), ctx))
    assert qa.answer == "Ada" and (qa.start, qa.end) == (0, 3)
    assert len(run(ingress.Embed(pb.EmbedRequest(input=["x"]), ctx)).data[0].values) == 2
    tok = run(ingress.Tokenize(pb.TokenizeRequest(text="ab"), ctx))
    assert list(tok.token_ids) == tokenizer.encode("ab") and tok.max_model_len == 64
    assert run(ingress.Detokenize(pb.DetokenizeRequest(token_ids=tok.token_ids), ctx)).text == "ab"
    assert [m.id for m in run(ingress.ListModels(pb.ListModelsRequest(), ctx)).models] == ["m", "cls", "ner", "qa"]
    assert ctx.code is None


def test_stop_strings_end_a_choice_and_abort_it(ingress):
    g = run(ingress.Generate(pb.GenerateRequest(prompt="hi", stop=["llo"], n=2), Ctx()))
    assert [c.text for c in g.choices] == ["He", "He"] and {c.finish_reason for c in g.choices} == {"stop"}
    assert ingress.router.aborts  # the engine is told to stop (frees the KV blocks)


def test_chat_tools_reach_the_template_and_calls_come_back(tokenizer):
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    ing, ctx = Ingress(tokenizer), Ctx()
    ing.router.token_ids, ing.router.finish_reason = tokenizer.encode("ok" + call), "stop"
    tools = [{"type": "function", "function": {"name": "f"}}]
    chat = [pb.ChatMessage(role="user", content="yo")]
    g = run(ing.Generate(pb.GenerateRequest(messages=chat, tools_json=json.dumps(tools)), ctx))
    assert ctx.code is None and '"name": "f"' in tokenizer.decode(ing.router.requests[-1][0])  # rendered
    assert g.choices[0].finish_reason == "tool_calls" and g.choices[0].text == "ok"
    c = g.choices[0].tool_calls[0]
    assert (c.name, json.loads(c.arguments)) == ("f", {"x": 1}) and c.id.startswith("call")
    g = run(ing.Generate(pb.GenerateRequest(messages=chat, tools_json=json.dumps(tools), tool_choice="none"), ctx))
    assert g.choices[0].text == "ok" + call and not g.choices[0].tool_calls
    msg = G.delta_to_proto("id", "m", Delta(0, "", [5], None, "tool_calls", [ParsedToolCall("g", "{}")]))
    assert [c.name for c in msg.tool_calls] == ["g"] and msg.finish_reason == "tool_calls"


@pytest.mark.parametrize("req, param, words", [
    (pb.GenerateRequest(prompt="x", tools_json="[]"), "tools_json", "only goes with 'messages'"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], tools_json="[{"), "tools_json",
     "not valid JSON"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], tools_json='{"a": 1}'), "tools_json",
     "JSON array of tool objects"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], tools_json="[]", tool_choice="required"),
     "tool_choice", "needs `tools`"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], tool_choice="required"),
     "tool_choice", "needs tools_json"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], tools_json='[{"type": "function", '
                        '"function": {"name": "f"}}]', tool_choice='{"type": "function", "function": {"name": "g"}}'),
     "tool_choice.function.name", "not one of the request's tools"),
    (pb.GenerateRequest(prompt="x", structured_outputs=pb.StructuredOutputs(regex="a(b")),
     "structured_outputs.regex", "unclosed group"),
    (pb.GenerateRequest(prompt="x", response_format_json="{nope"), "response_format_json", "not valid JSON"),
])
def test_chat_tools_errors_name_the_field(ingress, req, param, words):
    ctx = Ctx()
    run(ingress.Generate(req, ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details.startswith(f"{param}: ") and words in ctx.details


@pytest.mark.parametrize("method, req, code, param", [
    ("Generate", pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("Generate", pb.GenerateRequest(prompt="x", n=0), grpc.StatusCode.INVALID_ARGUMENT, "n"),
    ("Generate", pb.GenerateRequest(prompt="x", model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
    ("Generate", pb.GenerateRequest(prompt="x", model="cls"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ("Classify", pb.ClassifyRequest(input=[]), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    ("ClassifyTokens", pb.ClassifyTokensRequest(input="x", aggregation="max"), grpc.StatusCode.INVALID_ARGUMENT, "aggregation"),
    ("AnswerQuestion", pb.AnswerQuestionRequest(question="q"), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    ("Embed", pb.EmbedRequest(input=["x"], pooling="max"), grpc.StatusCode.INVALID_ARGUMENT, "pooling"),
    ("Tokenize", pb.TokenizeRequest(text="x", model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
    ("Detokenize", pb.DetokenizeRequest(token_ids=[10**9]), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
])
def test_errors_set_code_and_details(ingress, method, req, code, param):
    ctx = Ctx()
    resp = run(getattr(ingress, method)(req, ctx))
    assert resp == type(resp)()  # an empty message goes with the error status
    assert ctx.code == code
    assert ctx.details.startswith(f"{param}: ")
    assert ("error-param", param) in ctx.trailing


def test_queue_full_carries_retry_after(ingress):
    def busy(*a, **k):
        raise QueueFullError(retry_after=2.5)

    ingress.router.generate.remote = busy
    ctx = Ctx()
    run(ingress.Generate(pb.GenerateRequest(prompt="x"), ctx))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "3") in ctx.trailing


def test_body_size_cap(tokenizer):
    ctx = Ctx()
    run(Ingress(tokenizer, limits=Limits(max_body_bytes=10)).Generate(pb.GenerateRequest(prompt="x" * 100), ctx))
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("metadata, code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer sk-1"),), None),
    ((("authorization", "sk-1"),), None),
])
def test_api_key_from_metadata(tokenizer, metadata, code):
    ctx = Ctx(metadata)
    run(Ingress(tokenizer, api_key="sk-1").ListModels(pb.ListModelsRequest(), ctx))
    assert ctx.code == code


def test_stream_error_sets_code_and_raises(ingress):
    ctx = Ctx()
    with pytest.raises(ModelNotFoundError):
        run(collect(ingress.GenerateStream(pb.GenerateRequest(prompt="x", model="nope"), ctx)))
    assert ctx.code == grpc.StatusCode.NOT_FOUND and ctx.details.startswith("model: ")


def test_stream_cancel_closes_the_router_stream(ingress):
    async def go():
        agen = ingress.GenerateStream(pb.GenerateRequest(prompt="x", n=1), Ctx())
        first = await agen.__anext__()
        await agen.aclose()  # what Serve does on client cancellation
        return first

    assert run(go()).text == "Hello"
    assert ingress.router.closed == 1 and ingress.router.aborts  # cancelled, and aborted by id


def test_unexpected_error_is_internal(ingress):
    def boom(*a, **k):
        raise RuntimeError("kaput")

    ingress.frontend.list_models = boom
    ctx = Ctx()
    run(ingress.ListModels(pb.ListModelsRequest(), ctx))
    assert ctx.code == grpc.StatusCode.INTERNAL and "kaput" in ctx.details


def test_health_check(ingress):
    from grpc_health.v1 import health_pb2

    ctx = Ctx()
    assert run(ingress.Check(health_pb2.HealthCheckRequest(), ctx)).status == health_pb2.HealthCheckResponse.SERVING
    assert run(ingress.Check(health_pb2.HealthCheckRequest(service=S.SERVICE_NAME), ctx)).status == 1
    run(ingress.Check(health_pb2.HealthCheckRequest(service="other"), ctx))
    assert ctx.code == grpc.StatusCode.NOT_FOUND
    ingress.router.alive = False  # a Router whose engine died
    assert run(ingress.Check(health_pb2.HealthCheckRequest(), Ctx())).status == health_pb2.HealthCheckResponse.NOT_SERVING


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


def test_structured_reasoning_and_defaults_over_grpc(tokenizer):
    """gRPC's fields reach the engine as HTTP's do; reasoning_content whole and streamed; defaults in ListModels."""
    answer = "<think>hmm</think>{\"a\": 1}"
    ing = Ingress(tokenizer)
    ing.router = ScriptedRouter(tokenizer.encode(answer), "stop")
    defaults = {"temperature": 0.6, "top_p": 0.95}
    ing.frontend = Frontend([ModelEntry("m", path="/ckpt/m", architecture="Qwen2ForCausalLM", task="generate",
                                        tokenizer=tokenizer, router=ing.router, max_model_len=64,
                                        sampling_defaults=defaults, reasoning_parser="deepseek_r1")])
    chat = dict(messages=[pb.ChatMessage(role="user", content="x")])
    req = pb.GenerateRequest(structured_outputs=pb.StructuredOutputs(json_object=True), top_p=0.5, **chat)
    choice = run(ing.Generate(req, Ctx())).choices[0]
    assert choice.reasoning_content == "hmm" and choice.text == "{\"a\": 1}"
    params = ing.router.requests[-1][1]
    assert params.structured.kind == "json_object"
    assert params.structured.start_after_token == tokenizer.token_to_id("</think>")
    assert (params.temperature, params.top_p) == (0.6, 0.5)  # unset -> the model's; set -> the client's
    msgs = run(collect(ing.GenerateStream(pb.GenerateRequest(**chat), Ctx())))
    assert "".join(m.reasoning_content for m in msgs) == "hmm" and "".join(m.text for m in msgs) == "{\"a\": 1}"
    run(ing.Generate(pb.GenerateRequest(prompt="x", structured_outputs=pb.StructuredOutputs(
        choice=pb.ChoiceList(choices=["a", "b"]))), Ctx()))
    assert ing.router.requests[-1][1].structured.kind == "choice"
    card = run(ing.ListModels(pb.ListModelsRequest(), Ctx())).models[0]
    assert dict(card.sampling_defaults) == pytest.approx(defaults) and card.reasoning_parser == "deepseek_r1"
