"""Property-based fuzzing of both ingresses (hypothesis) against the shared e2e app.

Properties, for every HTTP route and every gRPC RPC:
- no answer is a 5xx (HTTP) or INTERNAL / UNKNOWN / DATA_LOSS / UNIMPLEMENTED (gRPC), and every
  answer is complete (no dropped connection);
- an error is shaped as the contract: HTTP `{"error": {"message": str, "type": str, "param": str |
  None, "code": str}}` (also inside an SSE stream), gRPC a status of the contract with details;
- a success is strict JSON (no NaN / Infinity) or a message that parses;
- afterwards the service answers a valid request, and no generation is left running or queued.

Inputs: random JSON documents (any shape, NaN / Infinity, lone surrogates, deep-ish nesting) and
"near-valid" bodies (each route's real fields with random values of any JSON type, or typed values
around the limits); for gRPC, random values for every field of each request message, built from the
proto descriptors (ints over the whole wire range, doubles with NaN / inf, repeated and map fields),
and random raw bytes.

CI runs a fixed seed (`derandomize=True`) and CI_EXAMPLES per property (about 16 s on the 2-core
box); `pytest -m fuzz tests/e2e/test_fuzz.py` runs the same properties with FUZZ_EXAMPLES (the
`_long` tests, skipped otherwise).
Every generation request carries `x-request-timeout: 5`, so a random max_tokens cannot stall the run
(a 408 / DEADLINE_EXCEEDED is a fine answer).
"""

from __future__ import annotations

import collections
import json
import time
import urllib.parse

import grpc
import httpx
import pytest
from google.protobuf import descriptor as pdesc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb

SERVICE = "qwen2_serve.v1.Qwen2Serve"
CI_EXAMPLES = 20  # per property (fixed seed); the -m fuzz tests: FUZZ_EXAMPLES
FUZZ_EXAMPLES = 400
TIMEOUT = "5"
CONTRACT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                  grpc.StatusCode.UNAUTHENTICATED}


OUTCOMES: collections.Counter = collections.Counter()  # (ingress, route, status) -> count, printed by the tests


def strict_json(text: str):
    def bad(token):
        raise AssertionError(f"non-finite number {token} in a JSON answer")
    return json.loads(text, parse_constant=bad)


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


# --- strategies: JSON ------------------------------------------------------------------------------------------

odd_text = st.sampled_from(["", " ", "\ud800", "a\udfffb", "\x00", "\u202e", "<|im_end|>", "<tool_call>", "{{ x }}",
                            "{% for %}", "\U0001F600", "x" * 300, "-1", "1e999", "NaN"])
texts = st.one_of(st.text(max_size=20), odd_text)
numbers = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([2**31, 2**32, 2**63, 2**64, -(2**63) - 1, 1e-300, 1e300, 0.5, -0.0]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                        st.dictionaries(texts, c, max_size=4)), max_leaves=12)


def models(app):
    return st.one_of(st.none(), st.sampled_from(app.model_names), texts)


def near_valid(app, route: str):
    """The route's real fields with random values: typed around the limits, or any JSON at all."""
    required, optional = route_fields(app, route)
    return st.fixed_dictionaries({"model": models(app), **required}, optional=optional)


def route_fields(app, route: str) -> tuple[dict, dict]:
    """(required, optional): field name -> value strategy, for one route."""
    small = st.one_of(st.integers(0, 4), numbers)
    token_ids = st.lists(st.one_of(st.integers(0, 600), numbers), max_size=6)
    prompt = st.one_of(texts, st.lists(texts, max_size=3), token_ids, st.lists(token_ids, max_size=2))
    message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), texts),
                                     "content": st.one_of(texts, json_values)})
    sampling = {
        "max_tokens": small, "n": small, "temperature": numbers, "top_p": numbers, "top_k": numbers, "min_p": numbers,
        "repetition_penalty": numbers, "presence_penalty": numbers, "frequency_penalty": numbers, "seed": numbers,
        "stop": st.one_of(texts, st.lists(texts, max_size=3)), "stream": st.booleans(), "logprobs": json_values,
        "stop_token_ids": token_ids, "logit_bias": st.dictionaries(st.one_of(texts, st.integers(-5, 2**40).map(str)),
                                                                   numbers, max_size=3),
        "min_tokens": small, "ignore_eos": json_values, "stream_options": json_values, "best_of": json_values,
        "response_format": json_values, "user": json_values,
    }
    return {
        "/v1/completions": ({"prompt": prompt}, {**sampling, "echo": json_values, "suffix": json_values}),
        "/v1/chat/completions": ({"messages": st.one_of(st.lists(message, max_size=3), json_values)},
                                 {**sampling, "tools": json_values, "tool_choice": json_values,
                                  "top_logprobs": small, "max_completion_tokens": small,
                                  "chat_template_kwargs": json_values, "add_generation_prompt": json_values}),
        "/v1/classify": ({"input": prompt}, {}),
        "/v1/classify/tokens": ({"input": texts}, {"aggregation": st.one_of(st.sampled_from(["none", "simple"]), texts)}),
        "/v1/answer": ({"question": texts, "context": texts}, {}),
        "/v1/embeddings": ({"input": prompt}, {"encoding_format": json_values, "pooling": json_values,
                                               "normalize": json_values, "dimensions": json_values}),
        "/tokenize": ({"prompt": texts}, {"add_special_tokens": json_values}),
        "/detokenize": ({"tokens": token_ids}, {}),
    }[route]


def valid_base(app, route: str) -> dict:
    """A request the route serves (short generations), for the "one or two fields off" bodies."""
    m = {"model": app.generate_model}
    return {
        "/v1/completions": {**m, "prompt": "Hello there", "max_tokens": 3},
        "/v1/chat/completions": {**m, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        "/v1/classify": {"model": app.model_names[1], "input": "good"},
        "/v1/classify/tokens": {"model": app.model_names[2], "input": "Ada in Paris"},
        "/v1/answer": {"model": app.model_names[3], "question": "who?", "context": "Ada wrote it"},
        "/v1/embeddings": {**m, "input": "Hello"},
        "/tokenize": {**m, "prompt": "Hello"},
        "/detokenize": {**m, "tokens": [1, 2, 3]},
    }[route]


def one_or_two_off(app, route: str):
    """A valid request with one or two of its fields (real or refused ones) given random values."""
    required, optional = route_fields(app, route)
    names = sorted(set(required) | set(optional) | {"model"})
    strategies = {**optional, **required, "model": models(app)}
    return st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True).flatmap(
        lambda picked: st.fixed_dictionaries({n: strategies[n] for n in picked})).map(
        lambda changes: {**valid_base(app, route), **changes})


POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/classify/tokens", "/v1/answer",
               "/v1/embeddings", "/tokenize", "/detokenize"]


# --- HTTP checks -----------------------------------------------------------------------------------------------

def assert_error_shape(err) -> None:
    assert isinstance(err, dict), err
    assert isinstance(err.get("message"), str) and err["message"], err
    assert isinstance(err.get("type"), str) and isinstance(err.get("code"), str), err
    assert err.get("param") is None or isinstance(err["param"], str), err


def check_http(r: httpx.Response) -> None:
    OUTCOMES["http", r.request.url.path if r.status_code != 404 else "*", r.status_code] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines and lines[-1] == "data: [DONE]", r.text[-300:]  # the stream was finished, not cut
        for line in lines[:-1]:
            chunk = strict_json(line[6:])
            if "error" in chunk:
                assert_error_shape(chunk["error"])
        return
    body = strict_json(r.text)
    if r.status_code >= 400:
        assert_error_shape(body["error"])


def post(client: httpx.Client, path: str, payload) -> httpx.Response:
    content = json.dumps(payload, allow_nan=True).encode()  # NaN / Infinity as Python writes them
    return client.post(path, content=content, headers={"content-type": "application/json",
                                                       "x-request-timeout": TIMEOUT})


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.http_url, headers=serve_app.headers, timeout=60) as c:
        yield c


def still_serves(serve_app, http) -> None:
    r = http.post("/v1/completions", json={"model": serve_app.generate_model, "prompt": "Hello", "max_tokens": 2,
                                                 "ignore_eos": True})
    assert r.status_code == 200, r.text
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        resp = ch.unary_unary(f"/{SERVICE}/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                              response_deserializer=pb.GenerateResponse.FromString)(
            pb.GenerateRequest(model=serve_app.generate_model, prompt="Hello", max_tokens=2, ignore_eos=True),
            metadata=(("authorization", f"Bearer {serve_app.api_key}"),), timeout=60)
    assert resp.usage.completion_tokens == 2
    deadline = time.time() + 30
    while True:  # nothing the fuzzing started is still generating or queued
        stats = serve_app.router_stats(serve_app.generate_model)
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        assert time.time() < deadline, f"generation left running after fuzzing: {stats}"
        time.sleep(0.5)


def run_http(serve_app, http, examples: int) -> None:
    @fuzz_settings(examples)
    @given(route=st.sampled_from(POST_ROUTES), data=st.data())
    def random_json(route, data):
        check_http(post(http, route, data.draw(json_values)))

    @fuzz_settings(examples * 4)
    @given(route=st.sampled_from(POST_ROUTES), data=st.data())
    def near_valid_bodies(route, data):
        check_http(post(http, route, data.draw(near_valid(serve_app, route))))

    @fuzz_settings(examples * 4)
    @given(route=st.sampled_from(POST_ROUTES), data=st.data())
    def nearly_valid_bodies(route, data):
        check_http(post(http, route, data.draw(one_or_two_off(serve_app, route))))

    @fuzz_settings(examples)
    @given(name=texts, path=st.sampled_from(["/v1/models/", "/v1/", "/", "/v1/models?x="]))
    def get_routes(name, path):
        # Percent-encoded by hand, surrogates as their (invalid) UTF-8 bytes: %ED%A0%80.
        quoted = urllib.parse.quote(name.encode("utf-8", "surrogatepass"), safe="")
        for url in ("/v1/models", "/health", "/ready", path + quoted):
            check_http(http.get(url))

    random_json()
    near_valid_bodies()
    nearly_valid_bodies()
    get_routes()


def print_outcomes(ingress: str) -> None:
    for key, count in sorted((k, v) for k, v in OUTCOMES.items() if k[0] == ingress):
        print(*key, count)


def test_http_fuzz(serve_app, http, request):
    run_http(serve_app, http, CI_EXAMPLES)
    print_outcomes("http")
    still_serves(serve_app, http)


# --- gRPC: random field values from the descriptors ------------------------------------------------------------

FD = pdesc.FieldDescriptor
INT_RANGES = {FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_INT32: (-(2**31), 2**31 - 1),
              FD.TYPE_INT64: (-(2**63), 2**63 - 1), FD.TYPE_UINT64: (0, 2**64 - 1)}
proto_text = st.one_of(st.text(max_size=20), st.sampled_from(["", "user", "system", "assistant", "none", "auto",
                                                              "simple", "mean", "last", "required", "[]", "[{}]",
                                                              '[{"type": "function", "function": {"name": "f"}}]',
                                                              '[{"a": "\\ud800"}]', "[" * 80 + "]" * 80, "{}",
                                                              "x" * 300]))


def field_value(field, app, depth: int = 0):
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_f, val_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(scalar(key_f, app), scalar(val_f, app), max_size=3)
    one = message_strategy(field.message_type, app, depth + 1) if field.message_type is not None else scalar(field, app)
    if field.is_repeated:
        return st.lists(one, max_size=4)
    return one


def scalar(field, app):
    t = field.type
    if t in INT_RANGES:
        lo, hi = INT_RANGES[t]
        return st.one_of(st.integers(max(lo, -2), min(hi, 20)), st.integers(max(lo, 0), min(hi, 600)),
                         st.integers(lo, hi), st.sampled_from([lo, hi]))
    if t == FD.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == FD.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        if field.name == "model":
            return st.one_of(st.sampled_from(app.model_names + [""]), proto_text)
        return proto_text
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=16)
    if t == FD.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise AssertionError(f"unhandled proto field type {t} ({field.full_name})")


def message_strategy(descriptor, app, depth: int = 0):
    cls = getattr(pb, descriptor.name)
    fields = [f for f in descriptor.fields if depth < 2 or f.message_type is None]
    optional = {f.name: field_value(f, app, depth) for f in fields}

    def build(values: dict):
        msg = cls()
        for name, value in values.items():
            f = descriptor.fields_by_name[name]
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                getattr(msg, name).update(value)
            elif f.is_repeated:
                getattr(msg, name).extend(value)
            elif f.message_type is not None:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=optional).map(build)


def valid_messages(app) -> dict:
    gen = pb.GenerateRequest(model=app.generate_model, prompt="Hello there", max_tokens=3)
    return {"Generate": gen, "GenerateStream": gen,
            "Classify": pb.ClassifyRequest(model=app.model_names[1], input=["good"]),
            "ClassifyTokens": pb.ClassifyTokensRequest(model=app.model_names[2], input="Ada in Paris"),
            "AnswerQuestion": pb.AnswerQuestionRequest(model=app.model_names[3], question="who?", context="Ada wrote"),
            "Embed": pb.EmbedRequest(model=app.generate_model, input=["Hello"]),
            # the shared app serves no reward model: this one is refused (cannot do 'reward'); served
            # rewards are fuzzed in test_serve_rewards.py
            "Reward": pb.RewardRequest(model=app.generate_model, input=["Hello"]),
            "Tokenize": pb.TokenizeRequest(model=app.generate_model, text="Hello"),
            "Detokenize": pb.DetokenizeRequest(model=app.generate_model, token_ids=[1, 2, 3]),
            "ListModels": pb.ListModelsRequest()}


def fields_off(base, app):
    """`base` with one or two fields set to random values (a repeated field replaced, not extended)."""
    descriptor = base.DESCRIPTOR
    if not descriptor.fields:
        return st.just(base)
    one = message_strategy(descriptor, app)

    def merge(picked_and_random):
        picked, random_msg = picked_and_random
        msg = type(base)()
        msg.CopyFrom(base)
        for name in picked:
            msg.ClearField(name)
            only = type(base)()
            only.CopyFrom(random_msg)
            for other in descriptor.fields:
                if other.name != name:
                    only.ClearField(other.name)
            msg.MergeFrom(only)  # the random value of `name` (unset in random_msg: the field stays cleared)
        return msg

    names = [f.name for f in descriptor.fields]
    return st.tuples(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True), one).map(merge)


RPCS = [(m.name, m.input_type, getattr(pb, m.output_type.name), m.server_streaming)
        for m in pb.DESCRIPTOR.services_by_name["Qwen2Serve"].methods]


def check_grpc(call, payload: bytes, metadata, streaming: bool) -> None:
    try:
        result = call(payload, metadata=metadata, timeout=60)
        if streaming:
            list(result)
        OUTCOMES["grpc", call._method.decode().rsplit("/", 1)[-1], "OK"] += 1
    except grpc.RpcError as e:
        OUTCOMES["grpc", call._method.decode().rsplit("/", 1)[-1], e.code().name] += 1
        assert e.code() in CONTRACT_CODES, (e.code(), e.details())
        assert e.details(), e.code()


def run_grpc(serve_app, examples: int) -> None:
    metadata = (("authorization", f"Bearer {serve_app.api_key}"), ("x-request-timeout", TIMEOUT))
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        calls = {name: (ch.unary_stream if streaming else ch.unary_unary)(
            f"/{SERVICE}/{name}", request_serializer=lambda b: b, response_deserializer=out.FromString)
            for name, _, out, streaming in RPCS}
        streaming = {name: s for name, _, _, s in RPCS}

        def random_fields(name: str, descriptor) -> None:
            @fuzz_settings(examples * (3 if name in ("Generate", "GenerateStream") else 1))
            @given(msg=message_strategy(descriptor, serve_app))
            def prop(msg):
                check_grpc(calls[name], msg.SerializeToString(), metadata, streaming[name])

            prop()

        def nearly_valid(name: str) -> None:
            @fuzz_settings(examples * (3 if name in ("Generate", "GenerateStream") else 1))
            @given(msg=fields_off(valid_messages(serve_app)[name], serve_app))
            def prop(msg):
                check_grpc(calls[name], msg.SerializeToString(), metadata, streaming[name])

            prop()

        for name, descriptor, _, _ in RPCS:
            random_fields(name, descriptor)
            nearly_valid(name)

        @fuzz_settings(examples)
        @given(name=st.sampled_from([name for name, *_ in RPCS]), payload=st.binary(max_size=64))
        def random_bytes(name, payload):
            check_grpc(calls[name], payload, metadata, streaming[name])

        random_bytes()


def test_grpc_fuzz(serve_app, http, request):
    run_grpc(serve_app, CI_EXAMPLES)
    print_outcomes("grpc")
    still_serves(serve_app, http)


def needs_fuzz_marker(request) -> None:
    if "fuzz" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the long fuzz run: pytest -m fuzz tests/e2e/test_fuzz.py")


@pytest.mark.fuzz
def test_http_fuzz_long(serve_app, http, request):
    needs_fuzz_marker(request)
    run_http(serve_app, http, FUZZ_EXAMPLES)
    print_outcomes("http")
    still_serves(serve_app, http)


@pytest.mark.fuzz
def test_grpc_fuzz_long(serve_app, http, request):
    needs_fuzz_marker(request)
    run_grpc(serve_app, FUZZ_EXAMPLES)
    print_outcomes("grpc")
    still_serves(serve_app, http)
