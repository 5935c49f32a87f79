"""Tool calls: deployments/tool_calls.py's splitter, and the chat route's `tool_calls` answers.

The route is driven through FastAPI with a stand-in Frontend whose "model" writes a fixed text, and
read back with the official `openai` client (its own response models parse our JSON and SSE). The
real app (real model, Serve, the Qwen template rendering `tools`) is tests/e2e/test_http.py; a
random-weight model never writes a <tool_call> block, so what the model wrote is scripted here.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest

from deployments import http_ingress
from deployments.frontend import Frontend, GenerationDelta, Usage
from deployments.protocol import DEFAULT_LIMITS
from deployments.tool_calls import (
    ParsedToolCall,
    ToolCallSplitter,
    finish_reason_with_calls,
    split_tool_calls,
)

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
ANSWER = "Let me check.\n" + WEATHER + "\n" + TIME


def test_split_finds_calls_in_order_with_the_text_around_them():
    content, calls = split_tool_calls(ANSWER)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "°C"}
    assert "°C" in calls[0].arguments  # not \u-escaped: clients show it as written


def test_only_calls_leave_no_content():
    assert split_tool_calls(WEATHER + "\n") == (None, [ParsedToolCall("get_weather", '{"city": "Paris", "unit": "°C"}')])


def test_arguments_written_as_json_text_are_an_object_too():
    _, calls = split_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert calls == [ParsedToolCall("f", '{"x": 1}')]


@pytest.mark.parametrize("text", [
    "<tool_call>not json</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>["get_weather"]</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',
    'Sure: <tool_call>\n{"name": "get_weather", "arguments": {"ci',  # cut off at max_tokens
    "a < b and <tool_ is not a tag",
])
def test_what_is_not_a_call_stays_text_as_written(text):
    assert split_tool_calls(text) == (text.strip(), [])


def test_no_tags_is_plain_content():
    assert split_tool_calls("  just words  ") == ("just words", [])
    assert split_tool_calls("") == (None, [])


def _streamed(pieces: list[str]) -> tuple[str, list[ParsedToolCall]]:
    splitter = ToolCallSplitter()
    events = [e for p in pieces for e in splitter.feed(p)] + splitter.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ParsedToolCall)]


@pytest.mark.parametrize("text", [ANSWER, WEATHER, "no calls <tool_call at all>", ANSWER + " and <tool_call>{bad}"])
def test_any_chunking_of_a_stream_gives_the_whole_answer(text):
    whole_content, whole_calls = split_tool_calls(text)
    rng = random.Random(0)
    chunkings = [list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), 6))
        chunkings.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for pieces in chunkings:
        content, calls = _streamed(pieces)
        assert (content.strip() or None, calls) == (whole_content, whole_calls), pieces


def test_text_is_held_back_only_while_it_could_start_a_tag():
    splitter = ToolCallSplitter()
    assert splitter.feed("Hello <tool_") == ["Hello "]  # "<tool_" may become "<tool_call>"
    assert splitter.feed("box> here") == ["<tool_box> here"]  # it did not: released at once
    assert splitter.feed("<tool_call>{\"name\": \"f\"") == []  # inside a block: nothing until it closes
    assert splitter.feed("}</tool_call>") == [ParsedToolCall("f", "{}")]
    assert splitter.num_calls == 1


def test_finish_reason_says_tool_calls_only_when_the_model_stopped_after_calling():
    assert finish_reason_with_calls("stop", 1) == "tool_calls"
    assert finish_reason_with_calls("stop", 0) == "stop"
    assert finish_reason_with_calls("length", 2) == "length"


# ---------------------------------------------------------------------------------------------
# The chat route


class ScriptedFrontend:
    """Frontend's documented API; its model "writes" `text` in a few pieces, per choice."""

    api_key = None
    limits = DEFAULT_LIMITS
    generate = Frontend.generate  # the real aggregation of a stream into choices

    def __init__(self, text: str, finish_reason: str = "stop"):
        self.text, self.finish_reason = text, finish_reason
        self.prompts = []

    def resolve(self, model, task=None):
        return type("Entry", (), {"name": "m", "max_model_len": 4096})()

    def render_chat(self, model, messages, tools=None, add_generation_prompt=True, **kw):
        self.prompts.append({"messages": messages, "tools": tools})
        return "prompt"

    def tokenize(self, model, text, add_special_tokens=False):
        return [1, 2, 3]

    async def generate_stream(self, model, prompt, sampling, request_id=None, timeout_s=None):
        n = int(sampling.get("n") or 1)
        cuts = [0, 5, 17, 40, 61, len(self.text)]
        pieces = [self.text[a:b] for a, b in zip(cuts, cuts[1:]) if a < b]
        for i, piece in enumerate(pieces):
            for index in range(n):
                last = i == len(pieces) - 1
                yield GenerationDelta(index, piece, [7], None, self.finish_reason if last else None)
        yield Usage(3, len(pieces) * n, 3 + len(pieces) * n)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _chat(frontend: ScriptedFrontend, **kw):
    """Run one chat call through the FastAPI app with the official async openai client."""
    http_ingress.bind(frontend)

    async def call():
        transport = httpx.ASGITransport(app=http_ingress.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as http:
            client = openai.AsyncOpenAI(base_url="http://ingress/v1", api_key="-", http_client=http, max_retries=0)
            result = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], **kw)
            if kw.get("stream"):
                return [chunk async for chunk in result]
            return result

    try:
        return asyncio.run(call())
    finally:
        http_ingress.bind(None)


def test_chat_answers_tool_calls_in_openai_shape():
    fe = ScriptedFrontend(ANSWER)
    resp = _chat(fe, tools=TOOLS, n=2)
    assert fe.prompts[0]["tools"] == TOOLS  # the template gets the tools
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        calls = choice.message.tool_calls
        assert [(c.type, c.function.name) for c in calls] == [("function", "get_weather"), ("function", "get_time")]
        assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "°C"}
        assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call") for c in calls)


def test_chat_stream_sends_each_call_once_and_the_text_around_it():
    chunks = _chat(ScriptedFrontend(ANSWER), tools=TOOLS, stream=True)
    content, calls, finish = "", [], None
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert content.strip() == "Let me check." and "<tool_call>" not in content
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads(calls[1].function.arguments) == {"tz": "CET"}
    assert finish == "tool_calls"


def test_without_tools_or_with_tool_choice_none_the_text_is_untouched():
    assert _chat(ScriptedFrontend(ANSWER)).choices[0].message.content == ANSWER
    resp = _chat(ScriptedFrontend(ANSWER), tools=TOOLS, tool_choice="none")
    assert resp.choices[0].message.content == ANSWER and resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "stop"


def test_a_call_cut_off_by_max_tokens_is_text_with_finish_reason_length():
    cut = ANSWER[:-20]
    resp = _chat(ScriptedFrontend(cut, finish_reason="length"), tools=TOOLS)
    assert resp.choices[0].finish_reason == "length"
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["get_weather"]
    assert resp.choices[0].message.content.startswith("Let me check.") and "get_time" in resp.choices[0].message.content


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_that_needs_constrained_decoding_is_refused(tool_choice):
    fe = ScriptedFrontend(ANSWER)
    with pytest.raises(openai.BadRequestError) as e:
        _chat(fe, tools=TOOLS, tool_choice=tool_choice)
    assert e.value.status_code == 400 and e.value.body["param"] == "tool_choice"
    assert "constrained decoding" in e.value.body["message"]
    assert fe.prompts == []  # refused before anything ran
