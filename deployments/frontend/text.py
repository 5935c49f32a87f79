"""One choice's text as it streams: incremental detokenization, stop strings, tool-call blocks.

Stop strings are matched on the detokenized text across token boundaries and never emitted: a
tail that could still become a stop string is held back until it cannot (`StopMatcher`, pure
string logic, tested under every chunking). `ChoiceText` puts the detokenizer, the matcher and,
for chat with tools, a ToolCallSplitter together.
"""

from __future__ import annotations

from deployments.frontend.reasoning import ReasoningSplitter
from deployments.frontend.tool_calls import ParsedToolCall, ToolCallSplitter, tail_prefix_length


class StopMatcher:
    """Feed text chunks; get back what may be emitted and whether a stop string ended the text."""

    def __init__(self, stop: list[str]):
        self.stop = list(stop)
        self.held = ""  # text not yet emitted: it may be the start of a stop string

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """-> (text to emit, stopped). After `stopped` the matcher is done: feed nothing more.

        The stop string that completes first ends the text (the earliest end; at equal ends the
        longer one), as when the stream is read token by token: so the result does not depend on
        how the text was split into chunks."""
        buf = self.held + text
        if not self.stop:
            self.held = ""
            return buf, False
        hits = [(i + len(s), i) for s, i in ((s, buf.find(s)) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)[1]], True
        if final:
            self.held = ""
            return buf, False
        keep = max(tail_prefix_length(buf, s) for s in self.stop)  # could still become a stop string
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False


class ChoiceText:
    """Detokenization, stop strings and tool calls of one choice."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], parse_tool_calls: bool = False,
                 parse_reasoning: bool = False):
        from qwen2_model.tokenizer import IncrementalDetokenizer

        # Special tokens (EOS, <|im_end|>) are not part of the text, as in vLLM and OpenAI.
        # (<tool_call> is an added, non-special token in Qwen's vocabulary: it stays in the text.)
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=True)
        self.matcher = StopMatcher(stop)
        self.tool_calls = ToolCallSplitter() if parse_tool_calls else None
        self.reasoning = ReasoningSplitter() if parse_reasoning else None
        self.echoed = False  # echo: the prompt went out with the choice's first delta
        self.finished = False
        self.num_output_tokens = 0

    def feed(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        """New token ids -> (text to emit, stopped by a stop string)."""
        text = self.detok.add(token_ids) if token_ids else ""
        if final:
            text += self.detok.flush()
        return self.matcher.feed(text, final)

    def split_reasoning(self, text: str, final: bool) -> tuple[str, str]:
        """Emitted text -> (reasoning, content); a no-op unless the model's reasoning is parsed."""
        if self.reasoning is None:
            return "", text
        d = self.reasoning.feed(text)
        if final:
            end = self.reasoning.finish()
            d.reasoning, d.content = d.reasoning + end.reasoning, d.content + end.content
        return d.reasoning, d.content

    def split_tool_calls(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        """Emitted text -> (content, finished tool calls); a no-op unless tools are parsed."""
        if self.tool_calls is None:
            return text, []
        events = self.tool_calls.feed(text) + (self.tool_calls.finish() if final else [])
        return "".join(e for e in events if isinstance(e, str)), [e for e in events if not isinstance(e, str)]
