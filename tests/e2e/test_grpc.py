"""The gRPC API end to end: the shared e2e app (tests/e2e/conftest.py `serve_app`: build_app on
local Ray Serve, API key on) behind Serve's own gRPC proxy, with real clients (the generated stub,
deployments.client, deployments.client_cli).

- every Qwen2Serve RPC through the generated stub, GenerateStream included, and grpc.health.v1 Check
  (when the app's grpc_servicer_functions include the health servicer);
- greedy text over gRPC == HTTP /v1/completions == the engine run directly on the same checkpoint;
- the error contract over gRPC: INVALID_ARGUMENT naming the field (unary and stream), context
  length, NOT_FOUND model, UNAUTHENTICATED, RESOURCE_EXHAUSTED (queue full via the router's live
  reconfigure to max_waiting=0, and a message over the size cap), DEADLINE_EXCEEDED;
- cancellation (client deadline, stream cancel) aborts on the router and frees its KV blocks;
- the typed client and the `client` CLI commands.
"""

from __future__ import annotations

import contextlib
import json
import time

import grpc
import httpx
import pytest

from deployments import client_cli
from deployments.client import ClientError, Qwen2ServeClient
from deployments.admission import HOLD_S as PROXY_QUEUE_FULL_HOLD_S
from deployments.frontend.core import QUEUE_FULL_HOLD_S
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc

PROMPT = "The quick brown fox"


class App:
    """The shared app, seen from gRPC."""

    def __init__(self, serve_app):
        self.s = serve_app
        self.grpc_target = serve_app.grpc_target
        self.http_url = serve_app.http_url
        self.api_key = serve_app.api_key
        self.gen, self.cls, self.tok, self.qa = (serve_app.generate_model, serve_app.classify_model,
                                                 serve_app.ner_model, serve_app.qa_model)
        self.max_model_len = serve_app.max_model_len
        self.max_body = serve_app.max_body_bytes
        self.auth = serve_app.headers
        self.channel = grpc.insecure_channel(self.grpc_target)
        self.stub = pb_grpc.Qwen2ServeStub(self.channel)
        self.md = (("authorization", f"Bearer {self.api_key}"),)
        self.health_servicer = self._has_health_servicer()

    def _has_health_servicer(self) -> bool:
        """Whether grpc.health.v1 is routed (its servicer function is in the app's gRPC options)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False
            raise
        return True

    def router_stats(self, model: str | None = None) -> dict:
        return self.s.router_stats(model or self.gen)

    @contextlib.contextmanager
    def queue_full(self, model: str | None = None):
        """The router refuses every new request (max_waiting=0) until the block ends."""
        router = self.s.router(model or self.gen)
        old = router.info.remote().result(timeout_s=30)["config"]["max_waiting"]
        router.reconfigure.remote({"max_waiting": 0}).result(timeout_s=30)
        try:
            yield
        finally:
            router.reconfigure.remote({"max_waiting": old}).result(timeout_s=30)
            # the ingress and Serve's proxy (deployments/admission.py) keep a "queue full" answer this long
            time.sleep(max(QUEUE_FULL_HOLD_S, PROXY_QUEUE_FULL_HOLD_S) + 0.05)


@pytest.fixture(scope="module")
def app(serve_app):
    a = App(serve_app)
    yield a
    a.channel.close()


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)  # a stream raises while iterating
    return e.value


def greedy(prompt=PROMPT, max_tokens=12, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


# ---------------------------------------------------------------------------------------------
# Every RPC


def test_list_models_and_health(app):
    models = app.stub.ListModels(pb.ListModelsRequest(), metadata=app.md)
    cards = {m.id: m for m in models.models}
    assert set(cards) == set(app.s.model_names)
    assert cards[app.gen].task == "generate" and cards[app.gen].max_model_len == app.max_model_len
    assert cards[app.cls].task == "classify" and cards[app.qa].task == "answer"
    assert cards[app.tok].task == "classify_tokens"


def test_health(app):
    # Serve's own health endpoint, always there.
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    assert serve_pb2_grpc.RayServeAPIServiceStub(app.channel).Healthz(serve_pb2.HealthzRequest()).message == "success"

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not app.health_servicer:
        pytest.skip("the app's grpc_servicer_functions lack grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server")
    health = health_pb2_grpc.HealthStub(app.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="qwen2_serve.v1.Qwen2Serve")).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert rpc_error(health.Check, health_pb2.HealthCheckRequest(service="nope")).code() == grpc.StatusCode.NOT_FOUND


def test_generate_greedy_matches_http_and_engine(app):
    resp = app.stub.Generate(greedy(), metadata=app.md)
    [choice] = resp.choices
    assert resp.model == app.gen and resp.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and len(choice.token_ids) == 12
    assert resp.usage.completion_tokens == 12 and resp.usage.total_tokens == resp.usage.prompt_tokens + 12

    http = httpx.post(f"{app.http_url}/v1/completions", headers=app.auth, timeout=60,
                      json={"model": app.gen, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert http.status_code == 200, http.text
    assert http.json()["choices"][0]["text"] == choice.text
    assert http.json()["usage"]["prompt_tokens"] == resp.usage.prompt_tokens

    # The engine itself, in this process, on the same checkpoint.
    from qwen2_model.engine.engine import Engine, EngineConfig
    from qwen2_model.engine.executor import LocalExecutor
    from qwen2_model.engine.sampling import SamplingParams
    from qwen2_model.tokenizer import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(str(app.s.checkpoints[app.gen]))
    ids = tokenizer.encode(PROMPT)
    engine = Engine(LocalExecutor(str(app.s.checkpoints[app.gen]), kv_cache_memory=8 << 20), EngineConfig(max_model_len=app.max_model_len))
    [out] = engine.generate_all({"r": ids}, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))["r"]
    assert list(choice.token_ids) == out
    assert choice.text == tokenizer.decode(out)

    # Token ids in give the same answer as text in.
    by_ids = app.stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=12, temperature=0, ignore_eos=True),
                               metadata=app.md)
    assert by_ids.choices[0].token_ids == choice.token_ids


def test_generate_stream(app):
    unary = app.stub.Generate(greedy(max_tokens=10), metadata=app.md).choices[0]
    msgs = list(app.stub.GenerateStream(greedy(max_tokens=10), metadata=app.md))
    assert len(msgs) >= 2 and len({m.id for m in msgs}) == 1
    assert "".join(m.text for m in msgs) == unary.text
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
    assert [m.HasField("usage") for m in msgs] == [False] * (len(msgs) - 1) + [True]
    assert msgs[-1].finish_reason == "length" and all(not m.finish_reason for m in msgs[:-1])
    assert msgs[-1].usage.completion_tokens == 10

    # n=2 with logprobs: each choice ends with its finish_reason, one logprob entry per token.
    msgs = list(app.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_tokens=5, n=2, seed=7, logprobs=2),
                                        metadata=app.md))
    for index in (0, 1):
        mine = [m for m in msgs if m.index == index]
        assert mine[-1].finish_reason in ("length", "stop")
        assert sum(len(m.token_ids) for m in mine) == sum(len(m.logprobs) for m in mine)
        assert all(len(lp.top_logprobs) == 2 for m in mine for lp in m.logprobs)
    assert msgs[-1].usage.total_tokens > 0


def test_generate_chat_messages_match_http(app):
    messages = [pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Hello")]
    resp = app.stub.Generate(pb.GenerateRequest(messages=messages, max_tokens=8, temperature=0, ignore_eos=True),
                             metadata=app.md)
    http = httpx.post(f"{app.http_url}/v1/chat/completions", headers=app.auth,
                      timeout=60, json={"model": app.gen, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                        "messages": [{"role": m.role, "content": m.content} for m in messages]})
    assert http.status_code == 200, http.text
    assert http.json()["choices"][0]["message"]["content"] == resp.choices[0].text
    assert http.json()["usage"]["prompt_tokens"] == resp.usage.prompt_tokens


def test_logit_bias_matches_http(app):
    bias = {5: 100.0}
    resp = app.stub.Generate(greedy(max_tokens=4, logit_bias=bias), metadata=app.md)
    http = httpx.post(f"{app.http_url}/v1/completions", headers=app.auth, timeout=60,
                      json={"model": app.gen, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                            "ignore_eos": True, "logit_bias": {"5": 100.0}})
    assert http.status_code == 200, http.text
    assert list(resp.choices[0].token_ids) == [5] * 4
    assert http.json()["choices"][0]["text"] == resp.choices[0].text


def test_echo_with_logprobs_matches_http(app):
    ids = list(app.stub.Tokenize(pb.TokenizeRequest(text=PROMPT), metadata=app.md).token_ids)
    resp = app.stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=2, temperature=0, ignore_eos=True,
                                                echo=True, logprobs=0), metadata=app.md)
    http = httpx.post(f"{app.http_url}/v1/completions", headers=app.auth, timeout=60,
                      json={"model": app.gen, "prompt": ids, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
                            "echo": True, "logprobs": 0})
    assert http.status_code == 200, http.text
    choice = resp.choices[0]
    assert list(choice.token_ids[:len(ids)]) == ids and len(choice.token_ids) == len(ids) + 2
    assert choice.text == http.json()["choices"][0]["text"]
    assert not choice.logprobs[0].HasField("logprob") and choice.logprobs[1].HasField("logprob")
    expected = http.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert [lp.logprob if lp.HasField("logprob") else None for lp in choice.logprobs] == pytest.approx(expected)
    stream = list(app.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_tokens=2, temperature=0, echo=True),
                                          metadata=app.md))
    assert stream[0].text.startswith(PROMPT)


def test_generate_chat_with_tools_matches_http(app):
    """tools_json reaches the model's template as HTTP's `tools` do (same prompt, same text)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [pb.ChatMessage(role="user", content="Weather in Paris?")]
    resp = app.stub.Generate(pb.GenerateRequest(messages=messages, max_tokens=6, temperature=0, ignore_eos=True,
                                                tools_json=json.dumps(tools)), metadata=app.md)
    plain = app.stub.Generate(pb.GenerateRequest(messages=messages, max_tokens=6, temperature=0, ignore_eos=True),
                              metadata=app.md)
    http = httpx.post(f"{app.http_url}/v1/chat/completions", headers=app.auth, timeout=60,
                      json={"model": app.gen, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "tools": tools,
                            "messages": [{"role": "user", "content": "Weather in Paris?"}]})
    assert http.status_code == 200, http.text
    assert http.json()["usage"]["prompt_tokens"] == resp.usage.prompt_tokens > plain.usage.prompt_tokens
    assert http.json()["choices"][0]["message"]["content"] == resp.choices[0].text
    err = rpc_error(app.stub.Generate, pb.GenerateRequest(messages=messages, tools_json=json.dumps(tools),
                                                          tool_choice='{"type": "function", "function": {"name": "x"}}'),
                    metadata=app.md)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("tool_choice.function.name: ")


def test_classify_tokens_answer_embed_tokenize(app):
    auth = app.auth
    cls = app.stub.Classify(pb.ClassifyRequest(model=app.cls, input=["good film", "bad film"]), metadata=app.md)
    http = httpx.post(f"{app.http_url}/v1/classify", headers=auth, json={"model": app.cls, "input": ["good film", "bad film"]})
    assert [r.label for r in cls.results] == [d["label"] for d in http.json()["data"]]
    assert [r.index for r in cls.results] == [0, 1] and cls.results[0].num_classes == len(cls.results[0].probs)
    assert cls.results[0].probs == pytest.approx(http.json()["data"][0]["probs"], abs=1e-6)
    assert cls.usage.prompt_tokens > 0

    text = "Ada Lovelace lived in London"
    tok = app.stub.ClassifyTokens(pb.ClassifyTokensRequest(model=app.tok, input=text, aggregation="simple"),
                                  metadata=app.md)
    assert tok.tokens and all(text[t.start:t.end] == t.token for t in tok.tokens)
    http = httpx.post(f"{app.http_url}/v1/classify/tokens", headers=auth,
                      json={"model": app.tok, "input": text, "aggregation": "simple"}).json()
    assert [t.label for t in tok.tokens] == [t["label"] for t in http["tokens"]]
    assert len(tok.entities) == len(http["entities"])

    context = "Ada Lovelace wrote the first program in 1843."
    ans = app.stub.AnswerQuestion(pb.AnswerQuestionRequest(model=app.qa, question="Who wrote it?", context=context),
                                  metadata=app.md)
    assert ans.answer == context[ans.start:ans.end] and ans.end > ans.start
    http = httpx.post(f"{app.http_url}/v1/answer", headers=auth,
                      json={"model": app.qa, "question": "Who wrote it?", "context": context}).json()
    assert (ans.answer, ans.start, ans.end) == (http["answer"], http["start"], http["end"])

    emb = app.stub.Embed(pb.EmbedRequest(model=app.gen, input=["a cat", "a dog"]), metadata=app.md)
    assert [e.index for e in emb.data] == [0, 1]
    assert sum(v * v for v in emb.data[0].values) == pytest.approx(1.0, abs=1e-4)
    http = httpx.post(f"{app.http_url}/v1/embeddings", headers=auth,
                      json={"model": app.gen, "input": ["a cat", "a dog"], "encoding_format": "float"}).json()
    assert list(emb.data[1].values) == pytest.approx(http["data"][1]["embedding"], abs=1e-6)
    raw = app.stub.Embed(pb.EmbedRequest(model=app.gen, input=["a cat"], pooling="mean", normalize=False),
                         metadata=app.md)
    assert sum(v * v for v in raw.data[0].values) != pytest.approx(1.0, abs=1e-4)

    t = app.stub.Tokenize(pb.TokenizeRequest(model=app.gen, text=PROMPT), metadata=app.md)
    assert t.count == len(t.token_ids) > 0 and t.max_model_len == app.max_model_len
    http = httpx.post(f"{app.http_url}/tokenize", headers=auth, json={"model": app.gen, "prompt": PROMPT}).json()
    assert list(t.token_ids) == http["tokens"]
    d = app.stub.Detokenize(pb.DetokenizeRequest(model=app.gen, token_ids=t.token_ids), metadata=app.md)
    assert d.text == PROMPT


# ---------------------------------------------------------------------------------------------
# The error contract


@pytest.mark.parametrize("req, code, param", [
    (pb.GenerateRequest(max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(prompt="x", prompt_token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
    (pb.GenerateRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="y")]),
     grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (pb.GenerateRequest(prompt="x", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(prompt="x", n=99), grpc.StatusCode.INVALID_ARGUMENT, "n"),
    (pb.GenerateRequest(prompt="x", max_tokens=32000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (pb.GenerateRequest(prompt="x", model="gpt-9"), grpc.StatusCode.NOT_FOUND, "model"),
    (pb.GenerateRequest(prompt="x", model="qwen2-demo-classifier"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
], ids=["none", "two", "three", "temperature", "n", "context-length", "unknown-model", "wrong-task"])
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_generate_errors(app, rpc, req, code, param):
    err = rpc_error(getattr(app.stub, rpc), req, metadata=app.md)
    assert err.code() == code
    assert err.details().startswith(f"{param}: "), err.details()
    if param == "max_tokens":
        assert "maximum context length" in err.details()


def test_other_rpc_errors(app):
    cases = [
        (app.stub.Classify, pb.ClassifyRequest(model=app.cls), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (app.stub.Classify, pb.ClassifyRequest(model="nope", input=["x"]), grpc.StatusCode.NOT_FOUND, "model"),
        (app.stub.ClassifyTokens, pb.ClassifyTokensRequest(model=app.tok, input="x", aggregation="max"),
         grpc.StatusCode.INVALID_ARGUMENT, "aggregation"),
        (app.stub.AnswerQuestion, pb.AnswerQuestionRequest(model=app.qa, context="c"),
         grpc.StatusCode.INVALID_ARGUMENT, "question"),
        (app.stub.Embed, pb.EmbedRequest(input=["x"], pooling="max"), grpc.StatusCode.INVALID_ARGUMENT, "pooling"),
        (app.stub.Detokenize, pb.DetokenizeRequest(model=app.gen, token_ids=[10**9]),
         grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
    ]
    for call, req, code, param in cases:
        err = rpc_error(call, req, metadata=app.md)
        assert (err.code(), err.details().split(":")[0]) == (code, param), (type(req).__name__, err.details())


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)], ids=["missing", "wrong"])
def test_unauthenticated(app, metadata):
    for call, req in [(app.stub.ListModels, pb.ListModelsRequest()), (app.stub.Generate, greedy()),
                      (app.stub.GenerateStream, greedy())]:
        assert rpc_error(call, req, metadata=metadata).code() == grpc.StatusCode.UNAUTHENTICATED


def test_queue_full_is_resource_exhausted(app):
    with app.queue_full():
        err = rpc_error(app.stub.Generate, pb.GenerateRequest(prompt="x", max_tokens=2), metadata=app.md)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert ("retry-after", "1") in [(m.key, m.value) for m in err.trailing_metadata()]
        err = rpc_error(app.stub.GenerateStream, pb.GenerateRequest(prompt="x", max_tokens=2), metadata=app.md)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert app.stub.Generate(greedy(max_tokens=2), metadata=app.md).choices[0].finish_reason == "length"


def test_message_over_size_cap(app):
    err = rpc_error(app.stub.Generate, pb.GenerateRequest(prompt="x" * (app.max_body + 1)), metadata=app.md)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(app.max_body) in err.details()


def test_request_timeout_metadata_is_deadline_exceeded(app):
    md = app.md + (("x-request-timeout", "0.2"),)
    req = pb.GenerateRequest(prompt=PROMPT, max_tokens=app.max_model_len - 64, temperature=0, ignore_eos=True)
    for call in (app.stub.Generate, app.stub.GenerateStream):
        err = rpc_error(call, req, metadata=md)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
    err = rpc_error(app.stub.Generate, req, metadata=app.md + (("x-request-timeout", "soon"),))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("x-request-timeout: ")
    _wait_idle(app)


# ---------------------------------------------------------------------------------------------
# Cancellation frees the router's blocks


def _wait_idle(app, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = app.router_stats()
        if (s["running"], s["waiting"], s["free_kv_blocks"]) == (0, 0, s["num_kv_blocks"]):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"router did not go idle: {s}")
        time.sleep(0.1)


def _aborts(stats: dict) -> int:
    return stats["finished"].get("abort", 0)


def test_deadline_on_unary_generate_aborts_on_router(app):
    """A client deadline cancels the call; Serve cancels the ingress, which aborts on the router."""
    before = _wait_idle(app)
    req = pb.GenerateRequest(prompt=PROMPT, max_tokens=app.max_model_len - 64, temperature=0, ignore_eos=True)
    assert rpc_error(app.stub.Generate, req, metadata=app.md, timeout=0.5).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = _wait_idle(app)
    assert _aborts(after) == _aborts(before) + 1
    assert after["generated_tokens"] - before["generated_tokens"] < app.max_model_len // 2


def test_cancel_stream_frees_router_blocks(app):
    """Cancelling a GenerateStream aborts the request on the router and frees its KV blocks.

    Serve 2.60's gRPC proxy loses a client cancellation that arrives while it is handing a message
    to gRPC (it then abandons its stream to the replica without cancelling it, and the generation
    runs to max_tokens). So: several tries; at least one must abort promptly (the path works end to
    end), and whatever the proxy lost still ends and frees every block (max_tokens is bounded).
    """
    tries, aborted = 4, 0
    for _ in range(tries):
        before = _wait_idle(app)
        req = pb.GenerateRequest(prompt=PROMPT, max_tokens=app.max_model_len - 64, temperature=0, ignore_eos=True)
        call = app.stub.GenerateStream(req, metadata=app.md)
        for got, _msg in enumerate(call, 1):
            if got == 3:
                break
        running = app.router_stats()
        assert running["running"] == 1 and running["free_kv_blocks"] < running["num_kv_blocks"]
        call.cancel()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _aborts(app.router_stats()) == _aborts(before):
            time.sleep(0.05)
        after = _wait_idle(app, timeout=60)
        if _aborts(after) == _aborts(before) + 1:
            aborted += 1
            # Stopped long before max_tokens, and stays stopped.
            assert after["generated_tokens"] - before["generated_tokens"] < app.max_model_len // 2
            time.sleep(0.3)
            assert app.router_stats()["generated_tokens"] == after["generated_tokens"]
    assert aborted >= 1, f"no cancellation reached the router in {tries} tries"


# ---------------------------------------------------------------------------------------------
# The typed client and the CLI


def test_typed_client(app):
    with Qwen2ServeClient(app.grpc_target, api_key=app.api_key, timeout=60) as c:
        assert {m.id for m in c.list_models().models} == set(app.s.model_names)
        r = c.generate(PROMPT, app.gen, max_tokens=12, temperature=0, ignore_eos=True)
        direct = app.stub.Generate(greedy(), metadata=app.md)
        assert r.choices[0].text == direct.choices[0].text
        stream = list(c.generate_stream(PROMPT, max_tokens=12, temperature=0, ignore_eos=True))
        assert "".join(m.text for m in stream) == r.choices[0].text and stream[-1].usage.completion_tokens == 12
        assert c.chat([{"role": "user", "content": "Hi"}], max_tokens=3, ignore_eos=True).choices[0].finish_reason == "length"
        assert c.classify("good film", app.cls).results[0].num_classes > 0
        assert c.classify_tokens("Ada in London", app.tok).tokens
        ans = c.answer("Who?", "Ada wrote it.", app.qa)
        assert ans.answer == "Ada wrote it."[ans.start:ans.end]
        assert len(c.embed(["x", "y"], app.gen).data) == 2
        ids = c.tokenize(PROMPT, app.gen).token_ids
        assert c.detokenize(ids, app.gen).text == PROMPT
        if app.health_servicer:
            assert c.health() == "SERVING"

        with pytest.raises(ClientError) as e:
            c.generate("x", model="gpt-9")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.details.startswith("model: ")
        with pytest.raises(ClientError) as e:
            list(c.generate_stream("x", top_p=2.0))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details
        with app.queue_full(), pytest.raises(ClientError) as e:
            c.generate("x", max_tokens=2)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.retry_after == 1.0

        # Cancelling through the client ends the iteration quietly (the server side: see
        # test_cancel_stream_frees_router_blocks).
        s = c.generate_stream(PROMPT, max_tokens=app.max_model_len - 64, temperature=0, ignore_eos=True)
        it = iter(s)
        next(it), next(it)
        s.cancel()
        assert list(it) == []
        _wait_idle(app, timeout=60)

    # The client's timeout also goes to the server as x-request-timeout: the server stops at the
    # deadline even when the call's cancellation is lost on the way.
    with Qwen2ServeClient(app.grpc_target, api_key=app.api_key, timeout=0.5) as c:
        before = _wait_idle(app)
        with pytest.raises(ClientError) as e:
            list(c.generate_stream(PROMPT, max_tokens=app.max_model_len - 64, temperature=0, ignore_eos=True))
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        after = _wait_idle(app)
        assert after["generated_tokens"] - before["generated_tokens"] < app.max_model_len // 2

    with Qwen2ServeClient(app.grpc_target) as anonymous:
        with pytest.raises(ClientError) as e:
            anonymous.list_models()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_client_cli(app, capsys):
    common = ["--target", app.grpc_target, "--api-key", app.api_key]
    expected = app.stub.Generate(greedy(max_tokens=6), metadata=app.md).choices[0].text

    assert client_cli.main(["client", "generate", "--prompt", PROMPT, "--max-tokens", "6", "--temperature", "0",
                            *common]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert client_cli.main(["generate", "--prompt", PROMPT, "--max-tokens", "6", "--temperature", "0", "--stream",
                            *common]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert client_cli.main(["chat", "--message", "Hi", "--max-tokens", "2", *common]) == 0
    capsys.readouterr()
    assert client_cli.main(["classify", "--input", "good", "--input", "bad", "--model", app.cls, *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["0", "1"]
    assert client_cli.main(["answer", "--question", "Who?", "--context", "Ada wrote it.", "--model", app.qa, "--json",
                            *common]) == 0
    assert '"answer"' in capsys.readouterr().out
    assert client_cli.main(["models", *common]) == 0
    assert f"{app.gen}\tgenerate" in capsys.readouterr().out
    if app.health_servicer:
        assert client_cli.main(["health", *common]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"

    assert client_cli.main(["generate", "--prompt", "x", "--model", "gpt-9", *common]) == 1
    assert "error: NOT_FOUND: model:" in capsys.readouterr().err
    assert client_cli.main(["models", "--target", app.grpc_target]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err

    # Through the `qwen2-serve` entry point too.
    from deployments import cli

    assert cli.main(["client", "models", *common]) == 0
    assert f"{app.gen}\tgenerate" in capsys.readouterr().out
    assert cli.main(["client", "generate", "--prompt", "x", "--model", "gpt-9", *common]) == 1
    assert "error: NOT_FOUND" in capsys.readouterr().err
