"""Reasoning models' `<think>...</think>` -> vLLM's `reasoning_content`, apart from `content`.

QwQ and DeepSeek-R1-Distill-Qwen think first and answer after `</think>`; their chat templates end the
prompt with `<think>\\n`, so the generated text usually has no opening tag, only the closing one.
With a model's `reasoning_parser: deepseek_r1` (serve_config / CLI), the Frontend runs one
`ReasoningSplitter` per choice, before tool-call splitting (tool calls live in the answer):

- text before `</think>` is reasoning (an opening `<think>` at the very start is dropped),
- text after it is content,
- a generation that never closes its thinking (max_tokens hit) is all reasoning (as vLLM's parser).

Streaming holds back only a tail that could still grow into `</think>`. Structured output starts
after `</think>` (the engine's `StructuredOutput.start_after_token`), so the content is what the
grammar constrained.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tool_calls import tail_prefix_length

THINK_START = "<think>"
THINK_END = "</think>"
PARSERS = ("deepseek_r1", "qwq")  # one format: qwq is an alias


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class ReasoningSplitter:
    """Feed generated text in pieces; get back what is reasoning and what is content, in order."""

    def __init__(self):
        self._buffer = ""
        self._started = False  # past the (optional) opening tag
        self.done = False  # `</think>` seen: everything from now on is content

    def feed(self, text: str) -> ReasoningDelta:
        if self.done:
            return ReasoningDelta(content=text)
        self._buffer += text
        if not self._started:
            if THINK_START.startswith(self._buffer.lstrip()) and len(self._buffer.lstrip()) < len(THINK_START):
                return ReasoningDelta()  # could still be the opening tag
            stripped = self._buffer.lstrip()
            if stripped.startswith(THINK_START):
                self._buffer = stripped[len(THINK_START):]
            self._started = True
        end = self._buffer.find(THINK_END)
        if end >= 0:
            reasoning, content = self._buffer[:end], self._buffer[end + len(THINK_END):]
            self._buffer, self.done = "", True
            return ReasoningDelta(reasoning, content)
        keep = tail_prefix_length(self._buffer, THINK_END)
        cut = len(self._buffer) - keep
        reasoning, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return ReasoningDelta(reasoning=reasoning)

    def finish(self) -> ReasoningDelta:
        """The end of the generation: what is held back was reasoning (the thinking never closed)."""
        rest, self._buffer = self._buffer, ""
        return ReasoningDelta(content=rest) if self.done else ReasoningDelta(reasoning=rest)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """A whole answer -> (reasoning or None when there was none, content)."""
    s = ReasoningSplitter()
    a, b = s.feed(text), s.finish()
    reasoning = a.reasoning + b.reasoning
    return (reasoning if reasoning or s.done else None), a.content + b.content
