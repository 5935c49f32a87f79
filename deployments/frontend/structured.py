"""Request fields that constrain the output -> the engine's `StructuredOutput`, checked at the ingress.

One request may say what its output must match in any one of these shapes (HTTP and gRPC alike):

- OpenAI's `response_format`: `{"type": "text"}` (nothing), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- vLLM's `structured_outputs`: `{"json": schema, "regex": str, "choice": [str], "grammar": lark}`
  (exactly one of them), and its older `guided_json`, `guided_regex`, `guided_choice`,
  `guided_grammar` fields;
- chat `tool_choice: "required"` or `{"type": "function", "function": {"name"}}`: the answer is
  forced into Qwen2's `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` with the
  chosen function's parameter schema (one call; `required` lets the model pick the function).

`structured_from_fields(...)` returns the spec or None and raises `StructuredFieldError` naming the
field (e.g. `response_format.json_schema.schema`) and what is wrong, so the ingress answers 400 /
INVALID_ARGUMENT before the request is queued: the grammar is compiled here without the vocabulary
(llguidance's `validate_grammar`), which catches bad JSON, schemas, regexes and Lark; the engine
compiles it against the vocabulary again at admission (a second check, same error contract).
"""

from __future__ import annotations

import json
from typing import Any

from qwen2_model.engine.structured_output import (JSON_DEFAULTS, MAX_SPEC_CHARS, StructuredOutput,
                                                  StructuredOutputError)

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar")
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


class StructuredFieldError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _json_text(param: str, value: Any) -> str:
    """A schema given as an object (or as JSON text) -> JSON text, size-capped."""
    if isinstance(value, str):
        text = value
    else:
        if not isinstance(value, (dict, bool)):
            raise StructuredFieldError(param, f"must be a JSON schema object, got {type(value).__name__}")
        text = json.dumps(value)
    if len(text) > MAX_SPEC_CHARS:
        raise StructuredFieldError(param, f"is {len(text)} characters, over the limit of {MAX_SPEC_CHARS}")
    return text


def _spec(param: str, kind: str, value: Any) -> StructuredOutput:
    if kind == "json":
        return StructuredOutput("json", _json_text(param, value))
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise StructuredFieldError(param, "must be a non-empty list of non-empty strings")
        return StructuredOutput("choice", json.dumps(value))
    if not isinstance(value, str) or not value:
        raise StructuredFieldError(param, f"must be a non-empty string, got {value!r}"[:200])
    return StructuredOutput(kind, value)


def _from_response_format(rf: Any) -> tuple[str, StructuredOutput] | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise StructuredFieldError("response_format", "must be {'type': 'text' | 'json_object' | 'json_schema'}")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return "response_format", StructuredOutput("json_object")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise StructuredFieldError("response_format.json_schema", "must be an object with a `schema`")
    if "schema" not in js or js["schema"] is None:
        # OpenAI allows a json_schema without a schema: any JSON object, as vLLM does.
        return "response_format.json_schema", StructuredOutput("json_object")
    param = "response_format.json_schema.schema"
    return param, _spec(param, "json", js["schema"])


def _from_structured_outputs(so: Any) -> tuple[str, StructuredOutput] | None:
    if so is None:
        return None
    if not isinstance(so, dict):
        raise StructuredFieldError("structured_outputs", "must be an object with one of json, regex, choice, grammar")
    given = [k for k in STRUCTURED_OUTPUTS_KEYS if so.get(k) is not None]
    unknown = [k for k, v in so.items() if k not in STRUCTURED_OUTPUTS_KEYS and v not in (None, False)]
    if unknown:
        raise StructuredFieldError(f"structured_outputs.{unknown[0]}",
                                   "is not supported (json, regex, choice and grammar are)")
    if len(given) != 1:
        raise StructuredFieldError("structured_outputs", f"must set exactly one of json, regex, choice, grammar "
                                                         f"(got {', '.join(given) or 'none'})")
    param = f"structured_outputs.{given[0]}"
    return param, _spec(param, given[0], so[given[0]])


def tool_call_spec(tools: list[dict] | None, tool_choice: Any, special_tool_tokens: bool) -> StructuredOutput | None:
    """tool_choice "required" / a named function -> a Lark grammar of one Qwen2 tool call; else None.

    `special_tool_tokens`: the vocabulary has `<tool_call>` as one token (Qwen's): the grammar then
    asks for that token, as the chat template taught the model, rather than its spelling in pieces."""
    if tool_choice in (None, "auto", "none"):
        return None
    if not tools:
        raise StructuredFieldError("tool_choice", "needs `tools`")
    functions = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise StructuredFieldError(f"tools.{i}", "must be {'type': 'function', 'function': {'name': ..., "
                                                     "'parameters': ...}} to be forced by tool_choice")
        functions.append(f)
    if tool_choice == "required":
        chosen = functions
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str):
        name = tool_choice["function"]["name"]
        chosen = [f for f in functions if f.get("name") == name]
        if not chosen:
            raise StructuredFieldError("tool_choice.function.name", f"{name!r} is not one of the request's tools")
    else:
        raise StructuredFieldError("tool_choice", "must be 'auto', 'none', 'required' or "
                                                  "{'type': 'function', 'function': {'name': ...}}")
    calls = []
    for f in chosen:
        params = f.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise StructuredFieldError("tools", f"function {f.get('name')!r}: parameters must be a JSON schema object")
        calls.append({"type": "object", "properties": {"name": {"const": f.get("name")}, "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False})
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema["x-guidance"] = JSON_DEFAULTS  # Qwen's spacing, no free whitespace
    start, end = (TOOL_CALL_START, TOOL_CALL_END) if special_tool_tokens else \
        (json.dumps(TOOL_CALL_START), json.dumps(TOOL_CALL_END))
    lark = f'start: {start} "\\n" call "\\n" {end}\ncall: %json {json.dumps(schema)}\n'
    if len(lark) > MAX_SPEC_CHARS:
        raise StructuredFieldError("tools", f"the forced call's schema is over the limit of {MAX_SPEC_CHARS} characters")
    return StructuredOutput("grammar", lark)


def structured_from_fields(response_format: Any = None, structured_outputs: Any = None,
                           guided: dict[str, Any] | None = None, tool_spec: StructuredOutput | None = None,
                           start_after_token: int | None = None) -> tuple[str, StructuredOutput] | None:
    """(the field it came from, the checked spec), or None when the output is free."""
    found: list[tuple[str, StructuredOutput]] = []
    for item in (_from_response_format(response_format), _from_structured_outputs(structured_outputs)):
        if item is not None:
            found.append(item)
    for name, kind in GUIDED_FIELDS.items():
        value = (guided or {}).get(name)
        if value is not None:
            found.append((name, _spec(name, kind, value)))
    if tool_spec is not None:
        found.append(("tool_choice", tool_spec))
    if not found:
        return None
    if len(found) > 1:
        raise StructuredFieldError(found[1][0].split(".")[0], f"cannot be combined with {found[0][0].split('.')[0]}: "
                                                              f"one output constraint per request")
    param, spec = found[0]
    check(param, spec)
    if start_after_token is not None:
        spec = StructuredOutput(spec.kind, spec.value, start_after_token)
    return param, spec


def check(param: str, spec: StructuredOutput) -> None:
    """Compile the grammar without the vocabulary: bad JSON, schema, regex or Lark -> StructuredFieldError."""
    import llguidance

    try:
        grammar = spec.to_grammar()
    except StructuredOutputError as exc:
        raise StructuredFieldError(param, str(exc)) from None
    message = llguidance.LLMatcher.validate_grammar(grammar)
    if message:
        raise StructuredFieldError(param, " ".join(message.split())[:500])
