"""The input checks of issue 16 without Ray: strict timeouts, JSON nesting and surrogates, finite
logprobs, raw gRPC bytes, and error messages that always encode (the e2e versions are in
tests/e2e/test_hostile_input.py)."""

from __future__ import annotations

import json
import math

import pytest

from deployments.errors import InvalidRequestError, QueueFullError
from deployments.frontend.requests import DEFAULT_LIMITS, check_json_value, finite_logprob, parse_request_timeout
from deployments.grpc_api.convert import decode_request
from deployments.http_api.app import screen_json_body
from tests.scripted_router import ScriptedRouter
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb


@pytest.mark.parametrize("value,seconds", [("5", 5.0), (" 5 ", 5.0), ("\t2.5", 2.5), ("1e2", 100.0), (".5", 0.5),
                                           ("3.", 3.0)])
def test_timeout_accepts_plain_decimals(value, seconds):
    assert parse_request_timeout(value, "x-request-timeout") == seconds


@pytest.mark.parametrize("value", ["1_0", "inf", "Infinity", "nan", "1e400", "0", "0.0", "-1", "+5", "0x10", "5s",
                                   "", " ", "5 5", "\u0665"])  # the last: an Arabic-Indic five, float() takes it
def test_timeout_refuses_everything_else(value):
    with pytest.raises(InvalidRequestError) as info:
        parse_request_timeout(value, "x-request-timeout")
    assert info.value.param == "x-request-timeout"


def nest(depth: int):
    value = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def test_json_depth_limit_counts_levels():
    check_json_value(nest(DEFAULT_LIMITS.max_json_depth - 1), "tools")
    with pytest.raises(InvalidRequestError) as info:
        check_json_value(nest(DEFAULT_LIMITS.max_json_depth + 1), "tools")
    assert info.value.param == "tools.a.a"  # the field, not a 64-part path
    check_json_value(nest(100_000), None, limits=type(DEFAULT_LIMITS)(max_json_depth=10**6))  # iterative: no recursion


def test_lone_surrogates_are_named_with_their_path_and_escaped():
    check_json_value({"a": ["ok \U0001F600"]}, None)  # a real character outside the BMP is fine
    with pytest.raises(InvalidRequestError) as info:
        check_json_value({"messages": [{"content": "x\ud800"}]}, None)
    assert info.value.param == "messages.0.content"
    with pytest.raises(InvalidRequestError) as info:
        check_json_value({"k\udc00": 1}, "tools")
    assert info.value.param == "tools.k\\udc00"
    json.dumps(info.value.to_http()[1], ensure_ascii=False).encode("utf-8")  # the error itself encodes


def test_screen_json_body_parses_only_suspicious_bodies():
    screen_json_body(b'{"prompt": "hi"}', DEFAULT_LIMITS)
    screen_json_body(b"not json [[[[" * 20, DEFAULT_LIMITS)  # left to FastAPI's own error
    screen_json_body(b'{"prompt": "\\ud83d\\ude00"}', DEFAULT_LIMITS)  # a valid pair
    for body in (b'{"prompt": "\\ud800"}', b'{"prompt": "\\uDFFF x"}', b"[" * 5000 + b"]" * 5000,
                 b'{"tools": [' + b'{"a":' * 80 + b"1" + b"}" * 80 + b"]}"):
        with pytest.raises(InvalidRequestError):
            screen_json_body(body, DEFAULT_LIMITS)


def test_finite_logprob():
    assert finite_logprob(-1.25) == -1.25 and finite_logprob(None) is None
    assert finite_logprob(float("-inf")) == -9999.0 and finite_logprob(float("nan")) == -9999.0
    assert finite_logprob(float("inf")) == 0.0
    assert all(math.isfinite(finite_logprob(v)) for v in (1e308, -1e308, float("nan")))


def test_decode_request_turns_bad_bytes_into_invalid_argument():
    req = pb.GenerateRequest(prompt="hi", max_tokens=3)
    assert decode_request(req.SerializeToString(), pb.GenerateRequest) == req
    assert decode_request(req, pb.GenerateRequest) is req
    for garbage in (b"\xff\xff\xff", b"\x0a\x02\xed\xa0"):
        with pytest.raises(InvalidRequestError) as info:
            decode_request(garbage, pb.GenerateRequest)
        assert "not a valid qwen2_serve.v1.GenerateRequest" in info.value.message


def test_raw_servicer_registers_every_rpc_without_a_deserializer():
    from deployments.grpc_api.raw import add_Qwen2ServeServicer_to_server

    class Server:
        def add_generic_rpc_handlers(self, handlers):
            self.generic = handlers

        def add_registered_method_handlers(self, name, handlers):
            self.name, self.handlers = name, handlers

    class Servicer:
        def __getattr__(self, name):
            return lambda *a: None

    server = Server()
    add_Qwen2ServeServicer_to_server(Servicer(), server)
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Qwen2Serve"].methods}
    assert server.name == "qwen2_serve.v1.Qwen2Serve" and set(server.handlers) == methods
    assert all(h.request_deserializer is None for h in server.handlers.values())
    assert server.handlers["GenerateStream"].response_streaming and not server.handlers["Generate"].response_streaming


# --- admission view: a full queue is refused at the ingress ----------------------------------------------------

class FullThenFreeRouter(ScriptedRouter):
    """A Router handle that answers "queue full" until `free` is set, and counts the calls it got."""

    def __init__(self):
        super().__init__([5], "length")
        self.calls, self.free = 0, False
        scripted = self.generate.remote

        async def full():  # as a Serve handle: the error comes with the stream's first item
            raise QueueFullError("The server is busy (the queue is full); retry later")
            yield

        def generate(request_id, prompt_ids, params):
            self.calls += 1
            return scripted(request_id, prompt_ids, params) if self.free else full()

        self.generate.remote = generate


def test_a_full_queue_is_refused_at_the_ingress_without_calling_the_router(qwen_tokenizer_dir, monkeypatch):
    import asyncio
    import contextvars
    import time

    from deployments.frontend import core as fe_mod
    from deployments.frontend.core import Frontend, ModelEntry
    from deployments.frontend.requests import GenerationOptions
    from qwen2_model.engine.sampling import SamplingParams
    from qwen2_model.tokenizer import Qwen2Tokenizer

    monkeypatch.setattr(fe_mod, "QUEUE_FULL_HOLD_S", 60.0)  # longer than this test's first call (metrics warm-up)
    router = FullThenFreeRouter()
    fe = Frontend([ModelEntry("m", path="", architecture="Qwen2ForCausalLM", task="generate",
                              tokenizer=Qwen2Tokenizer.from_pretrained(qwen_tokenizer_dir), router=router,
                              max_model_len=64)])
    # resolve() sets the request's `model` metrics label in the current context: keep it out of the
    # test process's own context (tests/unit/test_metrics.py expects an empty label there).
    entry = contextvars.copy_context().run(fe.resolve, "m")

    async def generate():
        return await fe.generate(entry, [1, 2], GenerationOptions(SamplingParams(max_tokens=1)))

    for _ in range(3):
        with pytest.raises(QueueFullError) as info:
            asyncio.run(generate())
        assert info.value.retry_after == 1.0
    assert router.calls == 1  # the first answer held for QUEUE_FULL_HOLD_S: the others never left the ingress
    router.free = True
    monkeypatch.setattr(fe_mod.time, "monotonic", lambda: time.perf_counter() + 3600)  # the hold is over
    choices, _ = asyncio.run(generate())
    assert choices[0].finish_reason == "length" and router.calls == 2
    assert fe._queue_full_until == {}  # admitted: the view is cleared
