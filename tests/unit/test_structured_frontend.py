"""Structured output, reasoning content and generation_config defaults through the real Frontend
and FastAPI app (a scripted Router stands in for the engine), read by the official openai client."""

from __future__ import annotations

import json

import openai
import pytest

from tests.scripted_router import ScriptedRouter, openai_call

DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    from qwen2_model.tokenizer import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(qwen_tokenizer_dir)


def _call(tokenizer, answer: str, route: str, entry_kw: dict | None = None, **kw):
    router = ScriptedRouter(tokenizer.encode(answer))

    async def call(client):
        if route == "models":
            return await client.models.list()
        if route == "chat":
            return await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], **kw)
        return await client.completions.create(model="m", prompt="Hi", **kw)

    return openai_call(tokenizer, router, call, **(entry_kw or {})), router


@pytest.mark.parametrize("kw, kind", [
    (dict(extra_body={"response_format": {"type": "json_object"}}), "json_object"),
    (dict(extra_body={"structured_outputs": {"regex": "[a-z]+"}}), "regex"),
    (dict(extra_body={"guided_choice": ["a", "b"]}), "choice"),
    (dict(extra_body={"guided_grammar": 'start: "x"'}), "grammar"),
])
def test_each_field_reaches_the_engine_as_a_spec(tokenizer, kw, kind):
    for route in ("chat", "completions"):
        _, router = _call(tokenizer, "ok", route, **kw)
        assert router.requests[0][1].structured.kind == kind


def test_no_constraint_no_spec(tokenizer):
    _, router = _call(tokenizer, "ok", "chat", response_format={"type": "text"})
    assert router.requests[0][1].structured is None


def test_reasoning_content_whole_and_streamed_and_the_constraint_starts_after_it(tokenizer):
    answer = "<think>\nLet me think.</think>\n\n{\"a\": 1}"
    entry = {"reasoning_parser": "deepseek_r1"}
    resp, router = _call(tokenizer, answer, "chat", entry, response_format={"type": "json_object"})
    msg = resp.choices[0].message
    assert msg.reasoning_content == "\nLet me think." and json.loads(msg.content) == {"a": 1}
    assert router.requests[0][1].structured.start_after_token == tokenizer.token_to_id("</think>")
    chunks, _ = _call(tokenizer, answer, "chat", entry, stream=True)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == "\nLet me think." and content == "\n\n{\"a\": 1}"
    # completions are not split (vLLM's reasoning parsers apply to chat), nor a model without the option
    resp, _ = _call(tokenizer, answer, "completions", entry)
    assert resp.choices[0].text == answer
    resp, router = _call(tokenizer, answer, "chat", response_format={"type": "json_object"})
    assert resp.choices[0].message.content == answer and router.requests[0][1].structured.start_after_token is None


def test_generation_config_defaults_fill_unset_fields_and_show_in_models(tokenizer):
    entry = {"sampling_defaults": DEFAULTS}
    _, router = _call(tokenizer, "ok", "chat", entry)
    p = router.requests[0][1]
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    _, router = _call(tokenizer, "ok", "completions", entry, temperature=0.0, top_p=1.0)
    p = router.requests[0][1]
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 1.0, 20)  # what the client set wins
    models, _ = _call(tokenizer, "ok", "models", entry)
    assert models.data[0].model_extra["sampling_defaults"] == DEFAULTS


def test_bad_constraints_are_400_before_the_engine(tokenizer):
    with pytest.raises(openai.BadRequestError) as e:
        _call(tokenizer, "ok", "chat", extra_body={"structured_outputs": {"regex": "a(b"}})
    assert e.value.body["param"] == "structured_outputs.regex" and "unclosed group" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _call(tokenizer, "ok", "completions", stream=True, extra_body={"guided_json": "{nope"})
    assert e.value.body["param"] == "guided_json"
