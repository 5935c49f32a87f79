"""Structured output end to end on the shared e2e app (real local Ray Serve, a random-weight model
with a byte-level BPE vocabulary): whatever the noise the model would write freely, every
constrained answer validates, through the openai client (`.parse()` included), raw HTTP streaming
and gRPC; forced tool calls parse and their arguments validate; bad specs are 400 /
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json
import re
from typing import Annotated

import grpc
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc

# Bounded (maxLength, maxItems, enums, integer ranges): a random model always finishes in time.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "home": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{4}$"}},
                 "required": ["zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "home"],
    "additionalProperties": False,
}
REGEX = r"[A-Z]{2}-[0-9]{3}"
LARK = 'start: "(" NUM (" + " NUM){0,2} ")"\nNUM: /[1-9][0-9]?/\n'
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 8},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
MESSAGES = [{"role": "user", "content": "Tell me about someone."}]


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=99)
    tags: list[Annotated[str, Field(max_length=3)]] = Field(max_length=2)


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=f"{serve_app.http_url}/v1", api_key=serve_app.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.http_url, headers=serve_app.headers, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def stub(serve_app):
    with grpc.insecure_channel(serve_app.grpc_target) as channel:
        yield pb_grpc.Qwen2ServeStub(channel)


def md(serve_app):
    return (("authorization", f"Bearer {serve_app.api_key}"),)


def test_openai_client_json_schema_json_object_and_parse(client, serve_app):
    resp = client.chat.completions.create(
        model=serve_app.generate_model, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=1, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    for choice in resp.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    obj = client.chat.completions.create(model=serve_app.generate_model, messages=MESSAGES, max_tokens=60,
                                         temperature=0, response_format={"type": "json_object"},
                                         extra_body={"structured_outputs": None})
    # json_object: any object; a random model may run out of tokens inside one, so only the start is sure
    assert obj.choices[0].message.content.startswith("{")
    parsed = client.chat.completions.parse(model=serve_app.generate_model, messages=MESSAGES, max_tokens=120,
                                           temperature=0.8, seed=3, response_format=Person)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 99


@pytest.mark.parametrize("body, check", [
    ({"structured_outputs": {"regex": REGEX}}, lambda t: re.fullmatch(REGEX, t)),
    ({"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}, lambda t: t in ("alpha", "beta", "gamma")),
    ({"structured_outputs": {"grammar": LARK}}, lambda t: re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?){0,2}\)", t)),
    ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"guided_grammar": LARK}, lambda t: t.startswith("(") and t.endswith(")")),
])
def test_completions_streamed_over_raw_http_validate(http, serve_app, body, check):
    payload = {"model": serve_app.generate_model, "prompt": "Once upon a time", "max_tokens": 120,
               "temperature": 1.0, "seed": 7, "stream": True, **body}
    text, finish = "", None
    with http.stream("POST", "/v1/completions", json=payload) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    text += c["text"]
                    finish = c.get("finish_reason") or finish
    assert finish == "stop" and check(text), text


def test_forced_tool_calls_parse_and_validate(client, serve_app):
    for tool_choice, names in [({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
                               ("required", {"get_weather", "get_time"})]:
        resp = client.chat.completions.create(model=serve_app.generate_model, messages=MESSAGES,
                                              tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=80,
                                              temperature=1.0, seed=5)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0].function
        assert call.name in names
        schema = (WEATHER if call.name == "get_weather" else TIME)["function"]["parameters"]
        jsonschema.validate(json.loads(call.arguments), schema)


def test_constrained_and_free_requests_share_batches(client, serve_app):
    """Free requests answer the same while constrained ones run with them (greedy is deterministic)."""
    import concurrent.futures

    def free():
        return client.completions.create(model=serve_app.generate_model, prompt="The quick brown fox",
                                         max_tokens=16, temperature=0).choices[0].text

    def constrained():
        return client.completions.create(model=serve_app.generate_model, prompt="The quick brown fox",
                                         max_tokens=60, temperature=0.7, seed=2,
                                         extra_body={"structured_outputs": {"regex": REGEX}}).choices[0].text

    alone = free()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        frees = [pool.submit(free) for _ in range(3)]
        cons = [pool.submit(constrained) for _ in range(3)]
        assert all(f.result() == alone for f in frees)
        assert all(re.fullmatch(REGEX, c.result()) for c in cons)


def test_grpc_structured_outputs_response_format_and_tools(stub, serve_app):
    req = pb.GenerateRequest(model=serve_app.generate_model, prompt="Once", max_tokens=120, temperature=1.0, seed=3,
                             structured_outputs=pb.StructuredOutputs(json=json.dumps(SCHEMA)))
    resp = stub.Generate(req, metadata=md(serve_app), timeout=120)
    jsonschema.validate(json.loads(resp.choices[0].text), SCHEMA)
    req = pb.GenerateRequest(model=serve_app.generate_model, prompt="Once", max_tokens=40, temperature=1.0, seed=4,
                             structured_outputs=pb.StructuredOutputs(choice=pb.ChoiceList(choices=["red", "green"])))
    text = "".join(m.text for m in stub.GenerateStream(req, metadata=md(serve_app), timeout=120))
    assert text in ("red", "green")
    req = pb.GenerateRequest(model=serve_app.generate_model, prompt="Once", max_tokens=40, temperature=0,
                             response_format_json=json.dumps({"type": "json_schema", "json_schema": {"name": "r", "schema": {
                                 "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                 "additionalProperties": False}}}))
    assert isinstance(json.loads(stub.Generate(req, metadata=md(serve_app), timeout=120).choices[0].text)["ok"], bool)
    req = pb.GenerateRequest(model=serve_app.generate_model, max_tokens=80, temperature=1.0, seed=8,
                             messages=[pb.ChatMessage(role="user", content="Weather?")],
                             tools_json=json.dumps([WEATHER]), tool_choice="required")
    choice = stub.Generate(req, metadata=md(serve_app), timeout=120).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.tool_calls[0].name == "get_weather"
    jsonschema.validate(json.loads(choice.tool_calls[0].arguments), WEATHER["function"]["parameters"])


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema", "wat"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "unclosed group"),
    ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs.grammar", "nope"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_json": {"type": "string", "description": "x" * 70000}}, "guided_json", "over the limit"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
]


@pytest.mark.parametrize("body, param, words", BAD)
def test_bad_specs_are_400_naming_the_field(http, serve_app, body, param, words):
    r = http.post("/v1/chat/completions", json={"model": serve_app.generate_model, "messages": MESSAGES,
                                                "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(structured_outputs=pb.StructuredOutputs(regex="a(b")), "structured_outputs.regex", "unclosed group"),
    (dict(structured_outputs=pb.StructuredOutputs(grammar="start: nope")), "structured_outputs.grammar", "nope"),
    (dict(response_format_json='{"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}'),
     "response_format.json_schema.schema", "wat"),
    (dict(response_format_json="{nope"), "response_format_json", "JSON"),
])
def test_bad_specs_over_grpc_are_invalid_argument(stub, serve_app, kwargs, param, words):
    req = pb.GenerateRequest(model=serve_app.generate_model, prompt="Once", max_tokens=8, **kwargs)
    for call in (lambda: stub.Generate(req, metadata=md(serve_app), timeout=60),
                 lambda: list(stub.GenerateStream(req, metadata=md(serve_app), timeout=60))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert param in e.value.details() and words in e.value.details()
