"""Tokenizer tests: parity with transformers' Qwen2Tokenizer on the real Qwen vocabulary, chat
templates, incremental detokenization, save/load round trips, the small trained tokenizer, and
the error messages of bad checkpoint directories."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qwen2_model.tokenizer import DEFAULT_CHAT_TEMPLATE, IncrementalDetokenizer, Qwen2Tokenizer
from qwen2_model.tokenizer_training import train_byte_level_bpe


def _fixture_dir() -> Path:
    env = os.environ.get("QWEN2_TOKENIZER_FIXTURE")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared/fixtures/qwen-tokenizer"


FIXTURE = _fixture_dir()
needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "tokenizer.json").is_file(),
    reason=f"real Qwen tokenizer fixture not found at {FIXTURE} (set QWEN2_TOKENIZER_FIXTURE)",
)

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "你好，世界！机器学习是人工智能的一个分支。",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass X:\n\tpass\n",
    "Emoji: 😀🚀🎉 👍🏽 ❤️ 👨‍👩‍👧‍👦 and flags 🇩🇪🇯🇵",
    "special <|im_start|>user\nhi<|im_end|>\n<|endoftext|> tail",
    "   leading spaces, trailing   \t \n",
    "runs:\n\n\n\r\n\r\n    \n\n\t\t\t  x",
    "I'm sure you'LL see they've 'd done it's 1234567890 ١٢٣ 3.14",
    "Mixed: café naïve Zürich Ελληνικά русский ひらがな カタカナ 한국어 عربى",
    "JSON {\"a\": [1, 2, {\"b\": null}]} <tool_call> <think>x</think>",
    "",
]

# No special-token strings: a tokenizer built from vocab.json + merges.txt alone knows only the
# ChatML tokens, so text with e.g. <tool_call> legitimately splits differently there.
PLAIN_TEXTS = [t for t in TEXTS if "<" not in t]


@pytest.fixture(scope="module")
def ours() -> Qwen2Tokenizer:
    if not (FIXTURE / "tokenizer.json").is_file():
        pytest.skip(f"real Qwen tokenizer fixture not found at {FIXTURE}")
    return Qwen2Tokenizer.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    if not (FIXTURE / "tokenizer.json").is_file():
        pytest.skip(f"real Qwen tokenizer fixture not found at {FIXTURE}")
    return transformers.AutoTokenizer.from_pretrained(str(FIXTURE))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Qwen2Tokenizer:
    return Qwen2Tokenizer.from_pretrained(train_byte_level_bpe(tmp_path_factory.mktemp("small_tok")))


# ---- parity with transformers on the real vocabulary --------------------------------------


@needs_fixture
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


@needs_fixture
def test_encode_batch_and_token_ids(ours, hf):
    assert ours.encode_batch(TEXTS) == [hf.encode(t, add_special_tokens=False) for t in TEXTS]
    assert ours.token_to_id("<|im_start|>") == 151644
    assert ours.token_to_id("no-such-token-here") is None
    assert ours.convert_ids_to_tokens(151645) == "<|im_end|>"


@needs_fixture
def test_special_token_properties_match_transformers(ours, hf):
    assert ours.vocab_size == len(hf) == len(ours) == 151669
    assert ours.eos_token == hf.eos_token == "<|im_end|>"
    assert ours.eos_token_id == hf.eos_token_id == 151645
    assert ours.pad_token == hf.pad_token == "<|endoftext|>"
    assert ours.pad_token_id == hf.pad_token_id == 151643
    assert ours.bos_token_id is None and hf.bos_token_id is None
    assert ours.all_special_ids == sorted(hf.all_special_ids)


@needs_fixture
def test_load_from_vocab_and_merges_only(tmp_path, ours, hf):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    slow = Qwen2Tokenizer.from_pretrained(tmp_path)
    for text in PLAIN_TEXTS + ["a<|endoftext|>b<|im_start|>c<|im_end|>"]:
        assert slow.encode(text) == ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    # Without a config: Qwen2's ChatML tokens at their real ids, and Qwen2 base defaults.
    assert [slow.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [151643, 151644, 151645]
    assert slow.eos_token_id == slow.pad_token_id == 151643
    assert slow.chat_template == DEFAULT_CHAT_TEMPLATE


@needs_fixture
def test_load_from_vocab_merges_and_config_matches_transformers(tmp_path, hf):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    slow = Qwen2Tokenizer.from_pretrained(tmp_path)
    assert slow.vocab_size == len(hf)
    for text in TEXTS:
        assert slow.encode(text) == hf.encode(text, add_special_tokens=False), text


# ---- chat template ------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <html & stuff>",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hi there 你好"}],
    "system": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "tool_calls": [
        {"role": "user", "content": "Weather in Berlin?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
    ],
}


@needs_fixture
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("with_tools", [False, True])
def test_chat_template_matches_transformers(ours, hf, name, add_generation_prompt, with_tools):
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools)
    assert got == want
    assert got.startswith("<|im_start|>")


@needs_fixture
def test_chat_template_extra_variables(ours, hf):
    messages = CONVERSATIONS["user_only"]
    got = ours.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert got == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert got.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_errors_are_value_errors(small):
    with pytest.raises(ValueError, match="non-empty list of messages"):
        small.apply_chat_template([])
    raising = "{{ raise_exception('only user messages, got ' + messages[0].role) }}"
    with pytest.raises(ValueError, match="chat template error: only user messages, got system"):
        small.apply_chat_template([{"role": "system", "content": "x"}], chat_template=raising)
    with pytest.raises(ValueError, match="does not compile"):
        small.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    # The sandbox refuses attribute access to internals.
    with pytest.raises(ValueError, match="chat template error"):
        small.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages.__class__.__mro__ }}")


def test_chat_template_missing_content_is_a_value_error(small):
    # OpenAI clients send content=None with tool_calls; it is dropped as in transformers, and
    # Qwen's template (like transformers with it) then fails on the missing field.
    tool_call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [tool_call]}]
    with pytest.raises(ValueError, match="chat template error: .*no attribute 'content'"):
        small.apply_chat_template(messages)


def test_default_template_used_without_checkpoint_template(small):
    text = small.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---- incremental detokenizer --------------------------------------------------------------

STREAM_TEXT = "Hi 你好世界 🚀🎉👨‍👩‍👧 naïve  \n\tok<|im_end|> 한국어 ∑x² done"


def _check_stream(tok: Qwen2Tokenizer, ids: list[int], skip: bool, chunk: int = 1, prompt_ids=None) -> None:
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids, skip_special_tokens=skip)
    emitted = ""
    for i in range(0, len(ids), chunk):
        delta = detok.add(ids[i : i + chunk])
        emitted += delta
        assert "\ufffd" not in delta  # never a broken character
        full = tok.decode(ids[: i + chunk], skip_special_tokens=skip)
        assert emitted == detok.text
        assert full.startswith(emitted)
        if not full.endswith("\ufffd"):
            assert emitted == full, (i, emitted, full)
    emitted += detok.flush()
    assert emitted == tok.decode(ids, skip_special_tokens=skip)


@needs_fixture
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_detokenizer_matches_full_decode(ours, skip, chunk):
    ids = ours.encode(STREAM_TEXT)
    # The text must really split characters across tokens for the test to mean anything.
    assert any(ours.decode([i]).endswith("\ufffd") for i in ids)
    _check_stream(ours, ids, skip, chunk, prompt_ids=ours.encode("<|im_start|>assistant\n"))


def test_incremental_detokenizer_small_vocab_and_broken_tail(small):
    ids = small.encode(STREAM_TEXT)
    _check_stream(small, ids, skip=False)
    # A generation that stops mid-character: held back by add, released by flush as U+FFFD.
    partial = small.encode("ok 🚀")[:-1]
    detok = IncrementalDetokenizer(small)
    streamed = "".join(detok.add([i]) for i in partial)
    assert streamed in ("ok", "ok ") and small.decode(partial).endswith("\ufffd")
    assert streamed + detok.flush() == small.decode(partial)
    assert detok.text == small.decode(partial)


def test_incremental_detokenizer_prompt_ending_mid_character(small):
    prompt = small.encode("x 🚀")[:-1]  # prompt's last character incomplete
    ids = small.encode(" after")
    detok = IncrementalDetokenizer(small, prompt_ids=prompt)
    assert "".join(detok.add([i]) for i in ids) + detok.flush() == small.decode(ids)


# ---- offsets, save/load -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ours", "small"])
def test_offsets_map_to_substrings(request, which):
    if which == "ours" and not (FIXTURE / "tokenizer.json").is_file():
        pytest.skip(f"real Qwen tokenizer fixture not found at {FIXTURE}")
    tok = request.getfixturevalue(which)
    text = "Hello, 世界! x=42 🚀<|im_end|>  end 👨‍👩‍👧"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(offsets) == len(ids)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    # Ordered, overlapping only where byte-level tokens share a split character.
    for (s0, e0), (s1, e1) in zip(offsets, offsets[1:]):
        assert s0 <= s1 <= e0 <= e1
    # What QA and NER rely on: any token run that decodes to whole characters is exactly the
    # substring between its first start and last end.
    for i in range(len(ids)):
        for j in range(i, len(ids)):
            piece = tok.decode(ids[i : j + 1])
            if "\ufffd" not in piece:
                assert text[offsets[i][0] : offsets[j][1]] == piece, (i, j, piece)


@needs_fixture
def test_save_vocabulary_roundtrip(tmp_path, ours):
    vocab_path, merges_path = ours.save_vocabulary(tmp_path / "slow")
    assert Path(vocab_path).name == "vocab.json" and Path(merges_path).name == "merges.txt"
    assert json.loads(Path(vocab_path).read_text(encoding="utf-8")) == json.loads(
        (FIXTURE / "vocab.json").read_text(encoding="utf-8")
    )
    fixture_merges = (FIXTURE / "merges.txt").read_text(encoding="utf-8").replace("\r\n", "\n").rstrip("\n")
    assert Path(merges_path).read_text(encoding="utf-8").rstrip("\n") == fixture_merges
    reloaded = Qwen2Tokenizer.from_pretrained(tmp_path / "slow")
    for text in PLAIN_TEXTS:
        assert reloaded.encode(text) == ours.encode(text)


@needs_fixture
def test_save_pretrained_roundtrip(tmp_path, ours, hf):
    ours.save_pretrained(tmp_path)
    written = {p.name for p in tmp_path.iterdir()}
    assert written >= {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"}
    again = Qwen2Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # now from the slow files + config
    slow = Qwen2Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == slow.encode(text) == ours.encode(text), text
    assert again.chat_template == slow.chat_template == ours.chat_template
    for tok in (again, slow):
        assert (tok.eos_token_id, tok.pad_token_id, tok.all_special_ids) == (
            ours.eos_token_id,
            ours.pad_token_id,
            ours.all_special_ids,
        )


# ---- the small trained tokenizer -----------------------------------------------------------


def test_trained_tokenizer_is_deterministic(tmp_path):
    a, b = train_byte_level_bpe(tmp_path / "a"), train_byte_level_bpe(tmp_path / "b")
    names = ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in a.iterdir()) == names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_trained_tokenizer_layout_and_roundtrip(small):
    assert small.vocab_size == 512
    assert [small.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [509, 510, 511]
    assert small.eos_token == small.pad_token == "<|endoftext|>" and small.eos_token_id == 509
    assert small.bos_token_id is None
    assert small.all_special_ids == [509, 510, 511]
    for text in TEXTS:
        ids = small.encode(text)
        assert all(0 <= i < 512 for i in ids)
        assert small.decode(ids) == text
    assert small.encode("<|im_start|>") == [510]
    assert len(small.encode("The quick brown fox")) < len("The quick brown fox".encode())  # merges do work


def test_trained_tokenizer_custom_size_and_corpus(tmp_path):
    tok = Qwen2Tokenizer.from_pretrained(train_byte_level_bpe(tmp_path, vocab_size=300, corpus=["abc abc abd"] * 5))
    assert tok.vocab_size <= 300 and tok.token_to_id("<|im_end|>") == tok.vocab_size - 1
    assert tok.decode(tok.encode("zzz 你好")) == "zzz 你好"  # every byte is in the alphabet
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_byte_level_bpe(tmp_path / "x", vocab_size=100)


def test_trained_tokenizer_loads_with_transformers(tmp_path, small):
    transformers = pytest.importorskip("transformers")
    path = train_byte_level_bpe(tmp_path)
    hf_small = transformers.AutoTokenizer.from_pretrained(str(path))
    assert len(hf_small) == small.vocab_size
    assert (hf_small.eos_token_id, hf_small.pad_token_id) == (small.eos_token_id, small.pad_token_id)
    for text in TEXTS:
        assert hf_small.encode(text, add_special_tokens=False) == small.encode(text), text
    msgs = CONVERSATIONS["system"]
    assert small.apply_chat_template(msgs, add_generation_prompt=True) == hf_small.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )


# ---- errors --------------------------------------------------------------------------------


def test_missing_directory_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*tokenizer\.json.*vocab\.json \+ merges\.txt"):
        Qwen2Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as info:
        Qwen2Tokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "vocab.json + merges.txt" in message
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"found only vocab\.json"):
        Qwen2Tokenizer.from_pretrained(tmp_path)


def test_corrupt_files_name_the_file(tmp_path, small):
    bad = tmp_path / "bad_tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_tok/tokenizer\.json"):
        Qwen2Tokenizer.from_pretrained(bad)

    slow = tmp_path / "bad_vocab"
    slow.mkdir()
    (slow / "vocab.json").write_text('{"a": 0,', encoding="utf-8")
    (slow / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_vocab/vocab\.json: not valid JSON"):
        Qwen2Tokenizer.from_pretrained(slow)

    (slow / "vocab.json").write_text('{"a": 0, "b": 1}', encoding="utf-8")
    (slow / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges\.txt:2: expected two space-separated tokens"):
        Qwen2Tokenizer.from_pretrained(slow)

    good = tmp_path / "bad_config"
    small.save_pretrained(good)
    (good / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_config/tokenizer_config\.json: not valid JSON"):
        Qwen2Tokenizer.from_pretrained(good)


def test_added_token_id_mismatch_is_an_error(tmp_path, small):
    small.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"]["600"] = {"content": "<|extra|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=r"'<\|extra\|>' has id 512 in the vocabulary but 600"):
        Qwen2Tokenizer.from_pretrained(tmp_path)
