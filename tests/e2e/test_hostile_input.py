"""Hostile input on both ingresses: each class that once gave a 500, UNKNOWN or no answer (issue 16)
now gets a clear 400 / INVALID_ARGUMENT naming the field, or a valid answer; never a 5xx.

Classes, HTTP and gRPC alike (the shared e2e app, real clients, real model):
- token-id prompts past the vocabulary, past 2**32 and past int64 (the detokenizer's OverflowError);
- an extreme but valid repetition_penalty (1e-300) with logprobs: the distribution degenerates to
  NaN / -inf, and logprobs must still be finite (JSON has no NaN; pydantic wrote null, json 500);
- lone UTF-16 surrogates ("\\ud800") in message content, model, prompt, stop, tools (the tokenizer
  and UTF-8 encoders raise on them); over gRPC only `tools_json` can carry one (protobuf strings
  are UTF-8), and bytes that are not UTF-8 make the message undecodable (below);
- deeply nested JSON in `tools` / the body (the chat template's rendering recursed past Python's limit);
- `x-request-timeout` parsed strictly (`1_0`, `inf`, `nan`, `1e400` are refused; HTTP's optional
  whitespace around " 5 " is not part of the value and is accepted, as RFC 9110 says);
- gRPC request bytes that do not decode as the message: INVALID_ARGUMENT from the ingress, not
  UNKNOWN from Serve's proxy (deployments/grpc_api/raw.py hands us the raw bytes).
After each class the service still answers a valid request.
"""

from __future__ import annotations

import json
import math
import socket

import grpc
import httpx
import pytest

from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb

SERVICE = "qwen2_serve.v1.Qwen2Serve"


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which Python's json accepts and JSON does not have)."""
    def bad(token):
        raise AssertionError(f"non-finite number {token} in a JSON answer")
    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.http_url, headers=serve_app.headers, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def channel(serve_app):
    ch = grpc.insecure_channel(serve_app.grpc_target)
    yield ch
    ch.close()


def md(serve_app, *extra):
    return (("authorization", f"Bearer {serve_app.api_key}"),) + extra


def raw_unary(channel, method: str, response_cls):
    """A unary call that sends bytes as they are (no client-side serialization)."""
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda b: b,
                               response_deserializer=response_cls.FromString)


def raw_stream(channel):
    return channel.unary_stream(f"/{SERVICE}/GenerateStream", request_serializer=lambda b: b,
                                response_deserializer=pb.GenerateStreamResponse.FromString)


def assert_invalid(r: httpx.Response, param: str | None = None, words: str = "") -> dict:
    assert r.status_code == 400, r.text
    err = strict_json(r.text)["error"]
    assert err["code"] == "invalid_request" and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    assert words in err["message"], err
    return err


def grpc_invalid(call, *args, words: str = "", **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if not hasattr(result, "ListFields"):  # a stream: drain it
            list(result)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    assert words in info.value.details(), info.value.details()
    return info.value.details()


def still_serves(http, serve_app, channel):
    r = http.post("/v1/completions", json={"model": serve_app.generate_model, "prompt": "Hello", "max_tokens": 2,
                                                 "ignore_eos": True})
    assert r.status_code == 200, r.text
    resp = raw_unary(channel, "Generate", pb.GenerateResponse)(
        pb.GenerateRequest(model=serve_app.generate_model, prompt="Hello", max_tokens=2,
                           ignore_eos=True).SerializeToString(),
        metadata=md(serve_app), timeout=60)
    assert resp.usage.completion_tokens == 2


# --- token ids -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", [512 + 7, 2**31, 2**32, 2**32 + 5, 2**63, 2**64, 10**30])
@pytest.mark.parametrize("stream,echo", [(False, False), (True, False), (False, True)])
def test_http_token_ids_outside_the_vocabulary_are_400(http, serve_app, channel, token, stream, echo):
    r = http.post("/v1/completions", json={"model": serve_app.generate_model, "prompt": [1, token], "max_tokens": 2,
                                           "stream": stream, "echo": echo})
    assert_invalid(r, "prompt", f"token id {token} is outside the vocabulary")


def test_http_token_id_batches_and_other_id_fields(http, serve_app, channel):
    m = serve_app.generate_model
    assert_invalid(http.post("/v1/completions", json={"model": m, "prompt": [[1, 2], [2**40]], "max_tokens": 2}),
                   "prompt", "outside the vocabulary")
    assert_invalid(http.post("/v1/embeddings", json={"model": m, "input": [[2**64]]}), "input", "outside the vocabulary")
    assert_invalid(http.post("/detokenize", json={"model": m, "tokens": [2**64]}), "tokens", "outside the vocabulary")
    for field in ({"stop_token_ids": [2**64]}, {"logit_bias": {str(2**64): 1}}):
        r = http.post("/v1/completions", json={"model": m, "prompt": "hi", "max_tokens": 2, **field})
        assert r.status_code == 400, r.text
    still_serves(http, serve_app, channel)


def test_grpc_token_ids_outside_the_vocabulary_are_invalid_argument(serve_app, channel):
    for ids in ([1, 2**32 - 1], [600], [2**31]):  # uint32 on the wire: 2**32 - 1 is the largest
        req = pb.GenerateRequest(model=serve_app.generate_model, prompt_token_ids=ids, max_tokens=2).SerializeToString()
        grpc_invalid(raw_unary(channel, "Generate", pb.GenerateResponse), req, metadata=md(serve_app), timeout=60,
                     words="outside the vocabulary")
        grpc_invalid(raw_stream(channel), req, metadata=md(serve_app), timeout=60, words="outside the vocabulary")


# --- non-finite logprobs ---------------------------------------------------------------------------------------

def finite_logprobs(values) -> None:
    values = list(values)
    assert values and all(v is not None and math.isfinite(v) for v in values), values


@pytest.mark.parametrize("penalty", [1e-300, 1e300])
def test_http_extreme_penalty_with_logprobs_gives_finite_logprobs(http, serve_app, channel, penalty):
    m = serve_app.generate_model
    body = {"model": m, "prompt": "hi there friend hi there", "max_tokens": 4, "repetition_penalty": penalty,
            "logprobs": 5}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = strict_json(r.text)["choices"][0]["logprobs"]
    finite_logprobs(lp["token_logprobs"])
    finite_logprobs(v for top in lp["top_logprobs"] for v in top.values())

    r = http.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200
    chunks = [strict_json(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    finite_logprobs(v for c in chunks for ch in c["choices"] if ch["logprobs"] for v in ch["logprobs"]["token_logprobs"])

    r = http.post("/v1/chat/completions", json={"model": m, "messages": [{"role": "user", "content": "hi hi hi"}],
                                                "max_tokens": 4, "repetition_penalty": penalty, "logprobs": True,
                                                "top_logprobs": 3})
    assert r.status_code == 200, r.text
    content = strict_json(r.text)["choices"][0]["logprobs"]["content"]
    finite_logprobs([c["logprob"] for c in content] + [t["logprob"] for c in content for t in c["top_logprobs"]])

    r = http.post("/v1/completions", json={**body, "echo": True})  # prompt logprobs too
    assert r.status_code == 200, r.text
    finite_logprobs(strict_json(r.text)["choices"][0]["logprobs"]["token_logprobs"][1:])


def test_grpc_extreme_penalty_with_logprobs_gives_finite_logprobs(serve_app, channel):
    req = pb.GenerateRequest(model=serve_app.generate_model, prompt="hi there friend hi there", max_tokens=4,
                             repetition_penalty=1e-300, logprobs=5)
    resp = raw_unary(channel, "Generate", pb.GenerateResponse)(req.SerializeToString(), metadata=md(serve_app),
                                                                timeout=60)
    lps = resp.choices[0].logprobs
    finite_logprobs([t.logprob for t in lps] + [x.logprob for t in lps for x in t.top_logprobs])
    msgs = list(raw_stream(channel)(req.SerializeToString(), metadata=md(serve_app), timeout=60))
    finite_logprobs(t.logprob for m in msgs for t in m.logprobs)


# --- lone surrogates -------------------------------------------------------------------------------------------

SURROGATE_BODIES = [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}], '
                             '"max_tokens": 2}', "messages.0.content.0.text"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "hi", "max_tokens": 2}', "model"),
    ("/v1/completions", '{"prompt": "hi \\uDBFF", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\ud800"], "max_tokens": 2}', "prompt.1"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}', "stop.0"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
                             '"function": {"name": "f", "parameters": {"\\ud800": 1}}}], "max_tokens": 2}',
     r"tools.0.function.parameters.\ud800"),  # the key, escaped: the error itself must encode
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/classify", '{"input": "\\ud800"}', "input"),
    ("/v1/embeddings", '{"input": "\\ud800"}', "input"),
    ("/v1/answer", '{"question": "q", "context": "\\ud800"}', "context"),
    ("/v1/classify/tokens", '{"input": "\\ud800"}', "input"),
]


@pytest.mark.parametrize("path,body,param", SURROGATE_BODIES, ids=[f"{p}:{q}" for p, _, q in SURROGATE_BODIES])
def test_http_lone_surrogates_are_400_naming_the_field(http, serve_app, path, body, param):
    r = http.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert_invalid(r, param, words="lone UTF-16 surrogate")


def test_http_valid_surrogate_pairs_are_text(http, serve_app, channel):
    # "\ud83d\ude00" is one character (an emoji) in JSON: it must keep working.
    body = '{"model": "%s", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}' % serve_app.generate_model
    r = http.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    still_serves(http, serve_app, channel)


def test_grpc_surrogates_in_tools_json_and_non_utf8_strings(serve_app, channel):
    msgs = [pb.ChatMessage(role="user", content="x")]
    req = pb.GenerateRequest(model=serve_app.generate_model, messages=msgs, max_tokens=2,
                             tools_json='[{"type": "function", "function": {"name": "\\ud800"}}]')
    details = grpc_invalid(raw_unary(channel, "Generate", pb.GenerateResponse), req.SerializeToString(),
                           metadata=md(serve_app), timeout=60, words="lone UTF-16 surrogate")
    assert details.startswith("tools_json.0.function.name")
    # A string field holding the UTF-8-style encoding of U+D800 (ED A0 80) is not UTF-8.
    bad_model = b"\x0a\x03\xed\xa0\x80" + pb.GenerateRequest(prompt="hi", max_tokens=2).SerializeToString()
    grpc_invalid(raw_unary(channel, "Generate", pb.GenerateResponse), bad_model, metadata=md(serve_app), timeout=60,
                 words="not a valid qwen2_serve.v1.GenerateRequest")


# --- nesting ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [70, 500, 5000])
def test_http_deeply_nested_json_is_400(http, serve_app, channel, depth):
    nested = '{"a":' * depth + "1" + "}" * depth
    for body in ('{"messages": [{"role": "user", "content": "x"}], "tools": [%s], "max_tokens": 2}' % nested,
                 '{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"x": %s}}' % nested,
                 "[" * depth + "]" * depth):
        r = http.post("/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
        assert_invalid(r, words="nested deeper than 64 levels")
    still_serves(http, serve_app, channel)


def test_tools_nested_within_the_limit_still_work(http, serve_app):
    schema = {"type": "string"}
    for _ in range(12):  # 12 schema levels ~ 30 JSON levels
        schema = {"type": "object", "properties": {"x": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    r = http.post("/v1/chat/completions", json={"model": serve_app.generate_model, "max_tokens": 2, "tools": tools,
                                                "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("depth", [70, 600, 5000])
def test_grpc_deeply_nested_tools_json_is_invalid_argument(serve_app, channel, depth):
    req = pb.GenerateRequest(model=serve_app.generate_model, messages=[pb.ChatMessage(role="user", content="x")],
                             max_tokens=2, tools_json="[" + '{"a":' * depth + "1" + "}" * depth + "]")
    grpc_invalid(raw_unary(channel, "Generate", pb.GenerateResponse), req.SerializeToString(),
                 metadata=md(serve_app), timeout=60, words="nested deeper than 64 levels")
    grpc_invalid(raw_stream(channel), req.SerializeToString(), metadata=md(serve_app), timeout=60,
                 words="nested deeper than 64 levels")


# --- x-request-timeout -----------------------------------------------------------------------------------------

def raw_http(serve_app, header_value: bytes) -> tuple[int, bytes]:
    """POST /v1/completions with the header bytes as given (httpx refuses to send " 5 ")."""
    body = json.dumps({"model": serve_app.generate_model, "prompt": "hi", "max_tokens": 2}).encode()
    host, port = serve_app.http_url.removeprefix("http://").split(":")
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {serve_app.api_key}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n").encode() \
        + b"x-request-timeout: " + header_value + b"\r\n\r\n" + body
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(req)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data, "no response at all"
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("value,status", [(b" 5 ", 200), (b"\t5", 200), (b"2.5", 200), (b"1e2", 200),
                                          (b"1_0", 400), (b"inf", 400), (b"nan", 400), (b"1e400", 400),
                                          (b"0", 400), (b"-1", 400), (b"0x10", 400), (b"5s", 400), (b"", 400)])
def test_http_timeout_header_is_parsed_strictly(serve_app, value, status):
    got, body = raw_http(serve_app, value)
    assert got == status, body
    if status == 400:
        err = strict_json(body)["error"]
        assert err["param"] == "x-request-timeout" and err["code"] == "invalid_request"


@pytest.mark.parametrize("value,ok", [(" 5 ", True), ("2.5", True), ("1_0", False), ("inf", False),
                                      ("nan", False), ("1e400", False), ("abc", False)])
def test_grpc_timeout_metadata_is_parsed_strictly(serve_app, channel, value, ok):
    req = pb.GenerateRequest(model=serve_app.generate_model, prompt="hi", max_tokens=2,
                             ignore_eos=True).SerializeToString()
    call = raw_unary(channel, "Generate", pb.GenerateResponse)
    if ok:
        assert call(req, metadata=md(serve_app, ("x-request-timeout", value)), timeout=60).usage.completion_tokens == 2
    else:
        details = grpc_invalid(call, req, metadata=md(serve_app, ("x-request-timeout", value)), timeout=60)
        assert details.startswith("x-request-timeout")


# --- undecodable gRPC bytes ------------------------------------------------------------------------------------

RPCS = [("Generate", pb.GenerateResponse), ("Classify", pb.ClassifyResponse),
        ("ClassifyTokens", pb.ClassifyTokensResponse), ("AnswerQuestion", pb.AnswerQuestionResponse),
        ("Embed", pb.EmbedResponse), ("Tokenize", pb.TokenizeResponse), ("Detokenize", pb.DetokenizeResponse),
        ("ListModels", pb.ListModelsResponse)]
GARBAGE = [b"\xff\xff\xff\xff", b"\x08\xff", b"\x0a\x10short"]  # corrupt wire format
NOT_UTF8 = b"\x0a\x02\xed\xa0"  # field 1 (a string in every request but the empty ListModelsRequest), not UTF-8


@pytest.mark.parametrize("method,response", RPCS, ids=[m for m, _ in RPCS])
def test_grpc_undecodable_request_bytes_are_invalid_argument(serve_app, channel, method, response):
    for garbage in GARBAGE + ([NOT_UTF8] if method != "ListModels" else []):
        grpc_invalid(raw_unary(channel, method, response), garbage, metadata=md(serve_app), timeout=60,
                     words="is not a valid qwen2_serve.v1.")


def test_grpc_undecodable_stream_request_and_auth_first(serve_app, channel):
    grpc_invalid(raw_stream(channel), b"\xff\xff\xff\xff", metadata=md(serve_app), timeout=60,
                 words="is not a valid qwen2_serve.v1.GenerateRequest")
    with pytest.raises(grpc.RpcError) as info:  # no key: UNAUTHENTICATED, before the bytes are looked at
        raw_unary(channel, "Generate", pb.GenerateResponse)(b"\xff\xff", timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
