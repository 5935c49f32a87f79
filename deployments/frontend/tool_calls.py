"""Tool calls in a Qwen2 chat model's output -> OpenAI `tool_calls`.

Qwen2 / Qwen2.5 chat templates, when given `tools`, ask the model to answer a call as

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

(the "Hermes" format; vLLM's `hermes` tool parser reads the same). `ToolCallSplitter` splits the
generated text into plain content and calls as it streams in; deployments/frontend/text.py runs one per
choice (after stop strings), so streamed and whole answers, over HTTP and gRPC, always agree.

A block whose body is not a JSON object with a string `name` stays in the content as text (the
client sees what the model wrote rather than a call we guessed at); so does a block the model never
closed (generation stopped at max_tokens). Text outside blocks is content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


def parse_call_body(body: str) -> ParsedToolCall | None:
    """The JSON between the tags -> a call, or None when it is not a call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some fine-tunes emit the arguments already as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def tail_prefix_length(text: str, marker: str) -> int:
    """The length of the longest tail of `text` that is a proper prefix of `marker`: text that could
    still grow into the marker, so a stream must hold it back (also used for stop strings)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallSplitter:
    """Feed generated text in pieces; get back content pieces and finished tool calls, in order.

    Content is released as soon as it cannot be the start of a `<tool_call>` tag; a block is held
    until its closing tag arrives, then released as one call (or as text, when it is not a call).
    """

    def __init__(self):
        self._buffer = ""
        self._in_call = False
        self.num_calls = 0

    def feed(self, text: str) -> list[str | ParsedToolCall]:
        self._buffer += text
        events: list[str | ParsedToolCall] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(TOOL_CALL_START)
                if start < 0:
                    keep = tail_prefix_length(self._buffer, TOOL_CALL_START)
                    cut = len(self._buffer) - keep
                    if cut:
                        events.append(self._buffer[:cut])
                    self._buffer = self._buffer[cut:]
                    return events
                if start:
                    events.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(TOOL_CALL_START):]
                self._in_call = True
            else:
                end = self._buffer.find(TOOL_CALL_END)
                if end < 0:
                    return events
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(TOOL_CALL_END):]
                self._in_call = False
                call = parse_call_body(body.strip())
                if call is None:
                    events.append(TOOL_CALL_START + body + TOOL_CALL_END)
                else:
                    self.num_calls += 1
                    events.append(call)

    def finish(self) -> list[str | ParsedToolCall]:
        """The end of the generation: whatever is held back (an unclosed block included) is content."""
        rest = (TOOL_CALL_START if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return [rest] if rest else []


def finish_reason_with_calls(finish_reason: str | None, num_calls: int) -> str | None:
    """OpenAI reports "tool_calls" when the model stopped on its own after calling tools."""
    return "tool_calls" if num_calls and finish_reason == "stop" else finish_reason
