"""Qwen2 tokenizer on the `tokenizers` library, chat templates, and incremental detokenization.

This is what the ingress replicas use to turn requests into token ids and token ids back into
text. It reads a Hugging Face checkpoint directory (``tokenizer.json``, or the slow-tokenizer
``vocab.json`` + ``merges.txt``, plus ``tokenizer_config.json``) and reproduces
transformers' ``Qwen2Tokenizer`` exactly, without importing transformers: byte-level BPE with the
Qwen2 pre-tokenizer regex, NFC normalization, ChatML special tokens.

* ``Qwen2Tokenizer``: encode / decode / offsets, special-token ids, ``apply_chat_template``
  (sandboxed jinja2, same environment as transformers), ``save_pretrained``.
* ``IncrementalDetokenizer``: streaming text deltas that never split a UTF-8 character, using
  vLLM's prefix_offset / read_offset window so each token costs O(1) decode work.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "PRETOKENIZE_REGEX",
    "QWEN2_SPECIAL_TOKENS",
    "IncrementalDetokenizer",
    "Qwen2Tokenizer",
    "build_qwen2_tokenizer",
]

# The split transformers' Qwen2Tokenizer uses (tokenization_qwen2.py); ByteLevel runs after it
# with use_regex=False so GPT-2's own regex does not split a second time.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Appended after the BPE vocabulary, in this order, in every Qwen2 checkpoint (151643..151645).
QWEN2_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# Named special-token attributes, as in transformers' SPECIAL_TOKENS_ATTRIBUTES; chat templates
# see them as variables (e.g. `{{ eos_token }}`).
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Qwen2's defaults when a checkpoint has no tokenizer_config.json (transformers' class defaults).
_QWEN2_DEFAULT_SPECIAL = {"bos_token": None, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "unk_token": None}

# The Qwen ChatML template (the later revision, with tool calls and <think> blocks), used when a
# checkpoint ships no template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    '    {%- if ns.multi_step_tool and message.role == "user" and '
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n{%- endfor %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n        {%- set content = message.content %}\n'
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') "
    "+ '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}"
)


# --------------------------------------------------------------------------------------------
# Pipeline construction and file reading
# --------------------------------------------------------------------------------------------


def build_qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers.Tokenizer` with Qwen2's pipeline around the given BPE vocabulary and merges."""
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=None,  # byte-level: every byte is in the vocabulary, nothing is unknown
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    return apply_qwen2_pipeline(Tokenizer(model))


def apply_qwen2_pipeline(tok: Tokenizer) -> Tokenizer:
    """Set normalizer, pre-tokenizer, post-processor and decoder to Qwen2's (in place; returned)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # trim_offsets=False keeps offsets covering leading spaces, as Qwen2's tokenizer.json does.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _read_merges(path: Path) -> list[tuple[str, str]]:
    # Split on "\n" only: str.splitlines would also split on U+0085/U+2028, which can occur in
    # merges of non-byte-level vocabularies; "\r" is stripped because some copies use CRLF.
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from e
    merges = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected two space-separated tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _load_backend(directory: Path) -> Tokenizer:
    """The BPE pipeline from tokenizer.json, else from vocab.json + merges.txt."""
    tok_file = directory / TOKENIZER_FILE
    if tok_file.is_file():
        try:
            return Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON / unknown fields
            raise ValueError(f"{tok_file}: cannot load tokenizer ({e})") from e

    vocab_file, merges_file = directory / VOCAB_FILE, directory / MERGES_FILE
    if vocab_file.is_file() and merges_file.is_file():
        vocab = _read_json(vocab_file)
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_file}: expected a JSON object mapping token -> id")
        return build_qwen2_tokenizer(vocab, _read_merges(merges_file))

    present = [name for name in (VOCAB_FILE, MERGES_FILE) if (directory / name).is_file()]
    hint = f" (found only {present[0]})" if present else ""
    raise FileNotFoundError(
        f"no tokenizer files in {directory}: looked for {TOKENIZER_FILE}, or {VOCAB_FILE} + {MERGES_FILE}{hint}"
    )


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as a string or as an AddedToken dict.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"unexpected special-token entry {value!r}")


# --------------------------------------------------------------------------------------------
# Chat template rendering (same sandbox and helpers as transformers' chat_template_utils)
# --------------------------------------------------------------------------------------------


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes '<', '>' and '&', which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# Bounded: a per-call template override (apply_chat_template(chat_template=...)) must not grow memory.
@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    """Compile (cached per source) in an immutable sandbox: chat templates are untrusted code."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types so the sandbox never sees rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models (the HTTP schemas)
        return _plain(value.model_dump())
    return str(value)


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("chat template needs a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        message = _plain(message)
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        # Like transformers: drop None values (OpenAI clients send content=None with tool_calls),
        # templates test for a missing key, not for None.
        out.append({k: v for k, v in message.items() if v is not None})
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class Qwen2Tokenizer:
    """Qwen2's byte-level BPE tokenizer; same ids and text as transformers' Qwen2Tokenizer."""

    def __init__(self, backend: Tokenizer, config: Mapping[str, Any] | None = None):
        self._tok = backend
        self._config = dict(config or {})
        self._special = self._resolve_named_special_tokens()
        self._add_config_tokens()
        self._ensure_named_special_tokens()
        self.chat_template: str = self._config.get("chat_template") or DEFAULT_CHAT_TEMPLATE

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen2Tokenizer:
        """Load a checkpoint directory: tokenizer.json, else vocab.json + merges.txt; plus configs."""
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {directory} does not exist: "
                f"looked for {TOKENIZER_FILE}, or {VOCAB_FILE} + {MERGES_FILE}"
            )
        backend = _load_backend(directory)
        config = {}
        if (directory / CONFIG_FILE).is_file():
            config = _read_json(directory / CONFIG_FILE)
            if not isinstance(config, dict):
                raise ValueError(f"{directory / CONFIG_FILE}: expected a JSON object")
        if (directory / SPECIAL_TOKENS_MAP_FILE).is_file():
            # Legacy file; transformers merges it over tokenizer_config's named tokens.
            special_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
            if not isinstance(special_map, dict):
                raise ValueError(f"{directory / SPECIAL_TOKENS_MAP_FILE}: expected a JSON object")
            config.update(special_map)
        # A separate chat_template.jinja (newer transformers layout) wins over the config's.
        template_file = directory / "chat_template.jinja"
        if template_file.is_file():
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        return cls(backend, config)

    def _resolve_named_special_tokens(self) -> dict[str, str | None]:
        special = dict(_QWEN2_DEFAULT_SPECIAL)
        for name in _NAMED_SPECIAL:
            if name in self._config:
                special[name] = _token_content(self._config[name])
        return special

    def _add_config_tokens(self) -> None:
        """Add tokenizer_config's added_tokens_decoder entries missing from the backend, at their ids."""
        decoder = self._config.get("added_tokens_decoder") or {}
        entries = sorted(((int(i), spec) for i, spec in decoder.items()), key=lambda e: e[0])
        if not entries:
            # No config (slow files only): Qwen2's ChatML tokens, appended after the BPE vocab.
            entries = [(None, {"content": t, "special": True}) for t in QWEN2_SPECIAL_TOKENS]
        for want_id, spec in entries:
            content = spec["content"]
            have = self._tok.token_to_id(content)
            if have is None:
                self._add_token(spec)
                have = self._tok.token_to_id(content)
            if want_id is not None and have != want_id:
                # A shifted id would silently map text to the wrong embedding rows.
                raise ValueError(
                    f"added token {content!r} has id {have} in the vocabulary but {want_id} in {CONFIG_FILE}"
                )

    def _add_token(self, spec: Mapping[str, Any]) -> None:
        token = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", True),
        )
        if token.special:
            self._tok.add_special_tokens([token])
        else:
            self._tok.add_tokens([token])

    def _ensure_named_special_tokens(self) -> None:
        # eos/pad named in a config but absent from every vocabulary list: add them as special,
        # which is what transformers does too.
        for content in self._special.values():
            if content is not None and self._tok.token_to_id(content) is None:
                self._tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])

    # ---- properties ----------------------------------------------------------------------

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (shared, do not mutate)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added tokens (transformers' len(tokenizer))."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    @property
    def pad_token(self) -> str | None:
        return self._special["pad_token"]

    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def eos_token_id(self) -> int | None:
        return self._id_or_none(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_or_none(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_or_none(self.bos_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens that are set (bos/eos/pad/...), as chat templates see them."""
        return {k: v for k, v in self._special.items() if v is not None}

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every special token: the named ones plus added tokens marked special (sorted)."""
        ids = {self._tok.token_to_id(t) for t in self.special_tokens_map.values()}
        ids.update(i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special)
        ids.discard(None)
        return sorted(ids)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # ---- encode / decode -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text map to their ids, as in HF.

        Qwen2 adds no BOS/EOS, so `add_special_tokens` changes nothing; it is kept for the HF signature.
        """
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (tokenizers runs them in parallel threads)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and per-token (start, end) character offsets into `text`.

        A character split over several byte-level tokens gives each of them that character's span.
        """
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; incomplete UTF-8 sequences become U+FFFD (errors='replace')."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str | None] | None:
        """Vocabulary strings (byte-level form, e.g. 'Ġhello') of one id or a list of ids."""
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    # ---- chat template -------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render the checkpoint's chat template to a prompt string, as transformers does with tokenize=False.

        `extra` goes to the template as variables (e.g. `enable_thinking=False`, `documents=[...]`);
        the named special tokens (`eos_token`, ...) are variables too. `chat_template=...` in
        `extra` renders that template instead of the checkpoint's. Raises ValueError on any
        template error, including the template's own `raise_exception(...)`.
        """
        template = _compile_template(extra.pop("chat_template", None) or self.chat_template)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ValueError("tools must be a list of JSON-schema dicts")
        variables = {**self.special_tokens_map, **_plain(extra)}
        variables.setdefault("documents", None)
        try:
            return template.render(
                messages=_normalize_messages(messages),
                tools=_plain(tools),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            # e.g. content=None reaching `message.content.startswith` inside the template
            raise ValueError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e

    # ---- saving --------------------------------------------------------------------------

    def _vocab_and_merges(self) -> tuple[dict[str, int], list[str]]:
        model = json.loads(self._tok.to_str())["model"]
        # tokenizer.json stores merges as ["a", "b"] pairs (new) or "a b" strings (old).
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        return model["vocab"], merges

    def save_vocabulary(self, directory: str | Path) -> tuple[str, str]:
        """Write vocab.json + merges.txt in the slow-tokenizer format transformers writes."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab, merges = self._vocab_and_merges()
        vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
        vocab_path.write_text(json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        # newline="" keeps "\n" on every platform; merges are already in rank order.
        with open(merges_path, "w", encoding="utf-8", newline="") as f:
            f.write("#version: 0.2\n")
            f.writelines(m + "\n" for m in merges)
        return str(vocab_path), str(merges_path)

    def tokenizer_config(self) -> dict[str, Any]:
        """The tokenizer_config.json content describing this tokenizer (transformers-readable)."""
        added = self._tok.get_added_tokens_decoder()
        config = {k: v for k, v in self._config.items() if k not in ("added_tokens_decoder", "chat_template")}
        config.update(
            {
                "add_prefix_space": False,
                "added_tokens_decoder": {str(i): _added_token_json(added[i]) for i in sorted(added)},
                "bos_token": self.bos_token,
                "chat_template": self.chat_template,
                "clean_up_tokenization_spaces": False,
                "eos_token": self.eos_token,
                "errors": "replace",
                "pad_token": self.pad_token,
                "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": self._special.get("unk_token"),
            }
        )
        config.setdefault("model_max_length", 32768)
        return dict(sorted(config.items()))

    def save_pretrained(self, directory: str | Path) -> list[str]:
        """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tok_path, config_path = directory / TOKENIZER_FILE, directory / CONFIG_FILE
        self._tok.save(str(tok_path))
        vocab_path, merges_path = self.save_vocabulary(directory)
        config_text = json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
        config_path.write_text(config_text, encoding="utf-8")
        return [str(tok_path), vocab_path, merges_path, str(config_path)]


def _added_token_json(token: AddedToken) -> dict[str, Any]:
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": token.special,
    }


# --------------------------------------------------------------------------------------------
# Incremental detokenization
# --------------------------------------------------------------------------------------------

# Prompt tokens kept as left context for the first window (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turn a stream of generated token ids into text deltas, one `add` per engine step.

    Keeps two offsets into the ids (vLLM's scheme): text up to `read_offset` has been emitted;
    `prefix_offset..read_offset` is a few tokens of already-emitted left context. Each `add`
    decodes only `ids[prefix_offset:]` and emits what it adds beyond the context, unless that
    ends with U+FFFD, i.e. a UTF-8 character whose remaining bytes are in tokens not yet
    generated; then nothing is emitted until they arrive. The concatenated deltas are therefore
    always a prefix of `tokenizer.decode(generated)`, equal to it whenever that text does not end
    in a partial character, and equal after `flush()`.
    """

    def __init__(
        self,
        tokenizer: Qwen2Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = False,
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids or [])[-_PROMPT_CONTEXT_TOKENS:]
        # A prompt ending mid-character would make the first window's context end in U+FFFD,
        # and deltas would no longer line up with decode(generated); drop the context then.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self._chunks: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    @property
    def generated_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def add(self, new_ids: Sequence[int] | int) -> str:
        """Append generated ids; return the newly completed text ("" while a character is incomplete)."""
        if isinstance(new_ids, int):
            new_ids = [new_ids]
        self._ids.extend(new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (a trailing partial character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if not final and new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text) :]
        # Slide the window: what was just emitted becomes the left context of the next decode.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._chunks.append(delta)
        return delta
