"""Request fields -> StructuredOutput (deployments/frontend/structured.py), the reasoning splitter
(deployments/frontend/reasoning.py) and generation_config.json defaults (qwen2_model/generation_config.py)."""

import json
import random

import pytest

from deployments.frontend.reasoning import ReasoningSplitter, split_reasoning
from deployments.frontend.structured import StructuredFieldError, structured_from_fields, tool_call_spec
from qwen2_model.config import Qwen2Config
from qwen2_model.generation_config import GenerationConfigError, parse_generation_config, read_generation_config

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "noop"}}]


@pytest.mark.parametrize("kwargs, kind", [
    (dict(response_format={"type": "json_object"}), "json_object"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}), "json"),
    (dict(structured_outputs={"regex": "[a-z]+"}), "regex"),
    (dict(structured_outputs={"choice": ["a", "b"]}), "choice"),
    (dict(structured_outputs={"grammar": 'start: "x"'}), "grammar"),
    (dict(guided={"guided_json": '{"type": "integer"}'}), "json"),
    (dict(guided={"guided_choice": ["yes"]}), "choice"),
])
def test_each_shape_gives_its_kind(kwargs, kind):
    param, spec = structured_from_fields(**kwargs)
    assert spec.kind == kind


def test_text_and_nothing_are_free():
    assert structured_from_fields() is None
    assert structured_from_fields(response_format={"type": "text"}) is None


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}),
     "response_format.json_schema.schema", "wat"),
    (dict(response_format={"type": "xml"}), "response_format", "json_schema"),
    (dict(guided={"guided_regex": "a(b"}), "guided_regex", "unclosed group"),
    (dict(guided={"guided_json": "{oops"}), "guided_json", "not valid JSON"),
    (dict(structured_outputs={"grammar": "start: foo"}), "structured_outputs.grammar", "unknown name"),
    (dict(structured_outputs={"choice": []}), "structured_outputs.choice", "non-empty list"),
    (dict(structured_outputs={"json": {}, "regex": "a"}), "structured_outputs", "exactly one"),
    (dict(structured_outputs={"xml": "<a/>"}), "structured_outputs.xml", "not supported"),
    (dict(structured_outputs={"json": {"type": "string", "description": "x" * 70000}}),
     "structured_outputs.json", "over the limit"),
    (dict(response_format={"type": "json_object"}, guided={"guided_choice": ["a"]}), "guided_choice", "combined"),
])
def test_bad_fields_are_named(kwargs, param, words):
    with pytest.raises(StructuredFieldError) as err:
        structured_from_fields(**kwargs)
    assert err.value.param == param and words in str(err.value)


def test_forced_tool_calls():
    assert tool_call_spec(TOOLS, "auto", True) is None and tool_call_spec(TOOLS, None, True) is None
    named = tool_call_spec(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, True)
    assert named.kind == "grammar" and "<tool_call>" in named.value and '"const": "get_weather"' in named.value
    assert '"noop"' not in named.value
    required = tool_call_spec(TOOLS, "required", False)
    assert '"\\"<tool_call>\\""' not in required.value and '"<tool_call>"' in required.value  # spelled, not a token
    assert '"anyOf"' in required.value and '"noop"' in required.value
    assert structured_from_fields(tool_spec=required)[0] == "tool_choice"
    with pytest.raises(StructuredFieldError, match="not one of the request's tools"):
        tool_call_spec(TOOLS, {"type": "function", "function": {"name": "nope"}}, True)
    with pytest.raises(StructuredFieldError, match="needs `tools`"):
        tool_call_spec(None, "required", True)
    with pytest.raises(StructuredFieldError) as err:
        structured_from_fields(response_format={"type": "json_object"}, tool_spec=required)
    assert err.value.param == "tool_choice"


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nhmm</think>\n\nThe answer.", "\nhmm", "\n\nThe answer."),
    ("no opening tag</think>{\"a\": 1}", "no opening tag", "{\"a\": 1}"),
    ("still thinking when max_tokens hit", "still thinking when max_tokens hit", ""),
    ("</think>direct", "", "direct"),
    ("a < b and </thin k> are not tags</think>ok", "a < b and </thin k> are not tags", "ok"),
])
def test_reasoning_split_whole_and_streamed_agree(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)
    rng = random.Random(len(text))
    for _ in range(20):
        s, got_r, got_c, i = ReasoningSplitter(), "", "", 0
        while i < len(text):
            j = i + rng.randint(1, 4)
            d = s.feed(text[i:j])
            got_r, got_c, i = got_r + d.reasoning, got_c + d.content, j
        d = s.finish()
        assert (got_r + d.reasoning, got_c + d.content) == (reasoning, content)


def test_generation_config_defaults(tmp_path):
    g = parse_generation_config({"eos_token_id": [151645, 151643], "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                 "repetition_penalty": 1.05, "do_sample": True})
    assert g.eos_token_ids == [151645, 151643]
    assert g.sampling_defaults() == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert parse_generation_config({"eos_token_id": 2}).eos_token_ids == [2]
    assert parse_generation_config({"do_sample": False, "temperature": 0.6}).sampling_defaults() == {"temperature": 0.0}
    assert read_generation_config(tmp_path).sampling_defaults() == {}
    for bad in ({"top_p": 0}, {"temperature": -1}, {"top_k": 1.5}, {"eos_token_id": "x"}, {"repetition_penalty": True}):
        with pytest.raises(GenerationConfigError, match=next(iter(bad))):
            parse_generation_config(bad)


def test_generation_config_eos_ids_join_the_config(tmp_path):
    Qwen2Config(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, eos_token_id=5).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 5]}))
    assert Qwen2Config.from_pretrained(tmp_path).eos_token_ids == [5, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7000]}))
    with pytest.raises(ValueError, match="7000"):
        Qwen2Config.from_pretrained(tmp_path)
