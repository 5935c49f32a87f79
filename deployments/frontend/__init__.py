"""The request logic shared by the HTTP app and the gRPC servicer (no wire format here).

core.py        `Frontend`, `ModelEntry`: resolve, template, tokenize, call the Router, detokenize
requests.py    `Limits`, `GenerationOptions` (SamplingParams + stop strings + echo), input helpers
results.py     the typed results of every task
text.py        one choice's text: incremental detokenization, stop strings (`StopMatcher`)
tool_calls.py  Qwen2's <tool_call> blocks -> tool calls
postprocess.py labels, entity grouping, the QA span
structured.py  request fields (response_format, structured_outputs, guided_*) -> StructuredOutput
reasoning.py   the reasoning splitter (<think> blocks: deepseek_r1 / qwq)
"""
