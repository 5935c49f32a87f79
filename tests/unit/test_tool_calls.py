"""Tool calls: deployments/frontend/tool_calls.py's splitter, and `tool_calls` answers of the chat route.

The route runs in FastAPI over the real Frontend (detokenizer, stop strings, tool-call splitting) and
the real Qwen vocabulary; only the Router is scripted: it "generates" the tokens of a fixed answer,
since a random-weight model never writes a <tool_call> block. The official `openai` client reads
the answers (its own models parse our JSON and SSE). The real app (real model, Serve, the Qwen
template rendering `tools`) is tests/e2e/test_http.py.
"""

from __future__ import annotations

import json
import random

import openai
import pytest

from deployments.frontend.tool_calls import ParsedToolCall, ToolCallSplitter, finish_reason_with_calls
from tests.scripted_router import ScriptedRouter, openai_call

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
ANSWER = "Let me check.\n" + WEATHER + "\n" + TIME


def _streamed(pieces: list[str]) -> tuple[str, list[ParsedToolCall]]:
    splitter = ToolCallSplitter()
    events = [e for p in pieces for e in splitter.feed(p)] + splitter.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ParsedToolCall)]


def split_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """The whole text in one piece -> (content trimmed, or None when only whitespace; calls)."""
    content, calls = _streamed([text])
    return content.strip() or None, calls


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


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    from qwen2_model.tokenizer import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(qwen_tokenizer_dir)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _chat(tokenizer, text: str, finish_reason: str = "stop", **kw):
    """One chat call through the FastAPI app and the real Frontend, read by the official openai client."""
    router = ScriptedRouter(tokenizer.encode(text), finish_reason)
    return openai_call(tokenizer, router, lambda client: client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], **kw)), router


def test_the_qwen_vocabulary_has_the_tags_as_single_tokens(tokenizer):
    assert len(tokenizer.encode("<tool_call>")) == 1 and len(tokenizer.encode("</tool_call>")) == 1


def test_chat_answers_tool_calls_in_openai_shape(tokenizer):
    resp, _ = _chat(tokenizer, ANSWER, tools=TOOLS, n=2)
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        calls = choice.message.tool_calls
        assert [(c.type, c.function.name) for c in calls] == [("function", "get_weather"), ("function", "get_time")]
        assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "°C"}
        assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call") for c in calls)
    assert resp.usage.completion_tokens == 2 * len(tokenizer.encode(ANSWER))


def test_chat_stream_sends_each_call_once_and_the_text_around_it(tokenizer):
    chunks, _ = _chat(tokenizer, ANSWER, tools=TOOLS, stream=True)
    content, calls, finish = "", [], None
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert content.strip() == "Let me check." and "tool_call" not in content
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads(calls[1].function.arguments) == {"tz": "CET"}
    assert finish == "tool_calls"


def test_without_tools_or_with_tool_choice_none_the_text_is_untouched(tokenizer):
    resp, _ = _chat(tokenizer, ANSWER)
    assert resp.choices[0].message.content == ANSWER and resp.choices[0].finish_reason == "stop"
    resp, _ = _chat(tokenizer, ANSWER, tools=TOOLS, tool_choice="none")
    assert resp.choices[0].message.content == ANSWER and resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "stop"


def test_a_call_cut_off_by_max_tokens_is_text_with_finish_reason_length(tokenizer):
    resp, _ = _chat(tokenizer, ANSWER[:-20], finish_reason="length", tools=TOOLS)
    assert resp.choices[0].finish_reason == "length"
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["get_weather"]
    assert resp.choices[0].message.content.startswith("Let me check.") and "get_time" in resp.choices[0].message.content


def test_stop_strings_apply_before_tool_calls(tokenizer):
    resp, _ = _chat(tokenizer, ANSWER, tools=TOOLS, stop=["get_time"])
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["get_weather"]
    # the block cut by the stop string stays text, as written
    assert resp.choices[0].message.content == "Let me check.\n\n<tool_call>\n{\"name\": \""


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choice_reaches_the_engine_as_a_tool_call_grammar(tokenizer, tool_choice):
    resp, router = _chat(tokenizer, WEATHER, tools=TOOLS, tool_choice=tool_choice)
    assert resp.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["get_weather"]
    spec = router.requests[0][1].structured
    # the Qwen vocabulary has <tool_call> as one token: the grammar asks for the token, not its spelling
    assert spec.kind == "grammar" and spec.value.startswith("start: <tool_call> ")
    assert '"const": "get_weather"' in spec.value
    with pytest.raises(openai.BadRequestError) as e:
        _chat(tokenizer, WEATHER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.status_code == 400 and e.value.body["param"] == "tool_choice.function.name"
