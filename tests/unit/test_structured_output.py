"""Constrained decoding in the engine: on a random-weight model (free output is noise) every
constrained answer still matches its schema / regex / choice / grammar, mixed with unconstrained
rows in one batch, across chunked prefill, preemption, n > 1, seeds and logprobs."""

import json
import re

import jsonschema
import pytest
import torch

from qwen2_model.engine.engine import Engine, EngineConfig, EngineError
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.kv_cache import PagedKVCache
from qwen2_model.engine.sampling import SamplingParams
from qwen2_model.engine.structured_output import GrammarBackend, StructuredOutput, StructuredOutputError
from qwen2_model.testing import write_random_checkpoint
from qwen2_model.tokenizer import Qwen2Tokenizer

# Bounded (maxLength, maxItems, enum, integer range) so a random model always finishes in time.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,5}-[0-9]{2,4}"
CHOICES = ["positive", "negative", "neutral"]
LARK = """
start: expr
expr: term (("+" | "-") term){0,3}
term: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # vocab_size 1024 > the trained tokenizer's 512 tokens: a padded LM head, like Qwen's.
    return write_random_checkpoint(tmp_path_factory.mktemp("ck"), num_hidden_layers=2, seed=7)


@pytest.fixture(scope="module")
def executor(checkpoint):
    return LocalExecutor(checkpoint, kv_cache_memory=2 << 20, tokenizer_path=checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Qwen2Tokenizer.from_pretrained(checkpoint)


def spec(kind, value=""):
    return StructuredOutput(kind, value if isinstance(value, str) else json.dumps(value))


def check(kind, value, text):
    if kind == "json":
        jsonschema.validate(json.loads(text), value)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(value, text), text
    elif kind == "choice":
        assert text in value
    elif kind == "grammar":
        assert re.fullmatch(r"[0-9+\-() ]+", text) and eval(text) is not None  # noqa: S307 (digits and + - ( ) only)


CASES = [("json", PERSON), ("json_object", ""), ("regex", REGEX), ("choice", CHOICES), ("grammar", LARK)]


def test_bad_specs_are_named_errors(executor):
    g = executor.grammar
    bad = [
        (spec("json", "{not json"), "not valid JSON"),
        (spec("json", "[1, 2]"), "must be a JSON object"),
        (spec("json", {"type": "wat"}), "wat"),
        (spec("regex", "a(b"), "unclosed group"),
        (spec("grammar", "start: foo"), "foo"),
        (spec("grammar", "this is not lark"), "Expected token"),
        (spec("choice", "[]"), "non-empty list"),
        (spec("choice", '["a", 3]'), "non-empty list"),
        (spec("json", json.dumps({"type": "string", "description": "x" * 70000})), "over the limit"),
        (StructuredOutput("xml", "<a/>"), "unknown kind"),
    ]
    for s, words in bad:
        with pytest.raises(StructuredOutputError, match=re.escape(words)):
            g.validate(s)
    engine = Engine(executor)
    with pytest.raises(EngineError) as err:
        engine.validate([1, 2, 3], SamplingParams(structured=spec("regex", "a(b")))
    assert err.value.param == "structured_outputs" and "unclosed group" in str(err.value)
    assert not engine.has_unfinished()


def test_no_tokenizer_no_structured_output(checkpoint):
    engine = Engine(LocalExecutor(checkpoint, kv_cache_memory=1 << 20))
    with pytest.raises(EngineError, match="not available"):
        engine.validate([1, 2], SamplingParams(structured=spec("json_object")))


def test_mixed_batch_constrained_answers_validate_and_free_rows_unchanged(executor, tokenizer):
    prompts = {f"c{i}": [10 + i, 20, 30 + 2 * i, 40] for i in range(len(CASES))}
    params = {f"c{i}": SamplingParams(max_tokens=120, temperature=0.0, structured=spec(kind, value))
              for i, (kind, value) in enumerate(CASES)}
    free = {f"f{i}": [5 + i, 6, 7] * (i + 1) for i in range(4)}
    free_params = {"f0": SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                   "f1": SamplingParams(max_tokens=20, temperature=0.9, seed=11, ignore_eos=True),
                   "f2": SamplingParams(max_tokens=20, temperature=0.0, logprobs=2, ignore_eos=True),
                   "f3": SamplingParams(max_tokens=20, temperature=0.7, top_k=20, seed=3, ignore_eos=True)}
    engine = Engine(executor, EngineConfig(max_num_batched_tokens=64))
    out = engine.generate_all({**prompts, **free}, {**params, **free_params})
    assert engine.stats.max_batch_seqs == len(prompts) + len(free)
    for i, (kind, value) in enumerate(CASES):
        text = tokenizer.decode(out[f"c{i}"][0], skip_special_tokens=True)
        check(kind, value, text)
    assert engine.stats.finished.get("stop", 0) >= len(CASES)
    for rid, p in free.items():
        alone = Engine(executor).generate_all({rid: p}, free_params[rid])[rid][0]
        assert out[rid][0] == alone, rid


def test_sampled_n_choices_seeds_chunked_prefill_and_preemption(checkpoint, executor, tokenizer):
    cfg = executor.config
    per_block = PagedKVCache.bytes_per_block(cfg.num_hidden_layers, 16, cfg.num_key_value_heads, cfg.head_dim,
                                             torch.float32)
    small = LocalExecutor(checkpoint, kv_cache_memory=20 * per_block, tokenizer_path=checkpoint)
    prompt = list(range(3, 75))  # 72 tokens: chunked at 32 tokens per step
    p = SamplingParams(n=3, max_tokens=110, temperature=1.0, seed=5, structured=spec("json", PERSON))
    engine = Engine(small, EngineConfig(max_num_batched_tokens=32))
    out = engine.generate_all({"a": prompt, "b": prompt[::-1]}, p)
    assert engine.stats.preemptions > 0  # 6 sequences of up to 182 tokens in 20 blocks
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out["a"] + out["b"]]
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)
    assert len(set(texts)) > 1  # choices are sampled independently
    again = Engine(executor).generate_all({"a": prompt}, p)["a"]
    assert again == out["a"]  # seeds: the same choices without chunking or preemption


def test_length_when_grammar_cannot_finish_and_stop_when_it_does(executor, tokenizer):
    engine = Engine(executor)
    engine.add_request("short", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0,
                                                          structured=spec("regex", "[a-z]{10}")))
    engine.add_request("done", [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0,
                                                         structured=spec("choice", ["yes", "no"])))
    finished = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = (o.finish_reason, o.num_output_tokens)
    assert finished["short"] == ("length", 3)
    assert finished["done"][0] == "stop" and finished["done"][1] <= 3


def test_padding_ids_never_allowed_and_logprobs_are_of_the_masked_distribution(executor, tokenizer):
    assert executor.config.vocab_size > len(tokenizer)
    pad_id = executor.config.vocab_size - 3  # a padded LM head row: no bytes
    p = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, logit_bias={pad_id: 100.0},
                       structured=spec("regex", "[a-z ]{1,12}"))
    engine = Engine(executor)
    engine.add_request("r", [4, 5, 6], p)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    tokens = [t for o in outs for t in o.new_token_ids]
    assert pad_id not in tokens
    assert re.fullmatch("[a-z ]{1,12}", tokenizer.decode(tokens, skip_special_tokens=True))
    for o in outs:
        for lp in o.new_logprobs:
            assert lp.logprob > float("-inf")
            assert pad_id not in [t for t, _ in lp.top]
            assert sum(torch.tensor([v for _, v in lp.top]).exp()) <= 1.0 + 1e-5


def test_constraint_starts_after_the_reasoning_token(executor, tokenizer):
    end_think = 77
    s = StructuredOutput("choice", json.dumps(["yes", "no"]), start_after_token=end_think)
    # The bias makes the free part emit end_think at once; the grammar then decides the rest.
    p = SamplingParams(max_tokens=20, temperature=0.0, logit_bias={end_think: 100.0}, structured=s)
    out = Engine(executor).generate_all({"r": [1, 2, 3]}, p)["r"][0]
    assert out[0] == end_think
    assert tokenizer.decode(out[1:], skip_special_tokens=True) in ("yes", "no")


def test_backend_covers_the_model_vocab_of_the_real_qwen_tokenizer(qwen_tokenizer_dir):
    g = GrammarBackend.from_pretrained(qwen_tokenizer_dir, 151936, [151645, 151643])
    assert g.words == 151936 // 32
    tok = Qwen2Tokenizer.from_pretrained(qwen_tokenizer_dir)
    m = g.compile(spec("json", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    for t in tok.encode('{"a": 12}'):
        assert m.consume_token(t)
    assert m.is_stopped()


def test_forced_tool_call_grammar_takes_qwens_tool_call_token(qwen_tokenizer_dir):
    from deployments.frontend.structured import tool_call_spec

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]
    g = GrammarBackend.from_pretrained(qwen_tokenizer_dir, 151936, [151645, 151643])
    tok = Qwen2Tokenizer.from_pretrained(qwen_tokenizer_dir)
    m = g.compile(tool_call_spec(tools, "required", special_tool_tokens=True))
    ids = tok.encode('<tool_call>\n{"name": "f", "arguments": {"x": 3}}\n</tool_call>')
    assert ids[0] == tok.token_to_id("<tool_call>")  # one token, as the chat template taught the model
    assert all(m.consume_token(t) for t in ids) and m.is_stopped()


def test_apply_bitmask_matches_a_dense_reference():
    from qwen2_model.engine.structured_output import apply_bitmask

    g = torch.Generator().manual_seed(0)
    B, V = 5, 70  # V not a multiple of 32: the last word's high bits are past the vocabulary
    logits = torch.randn(B, V, generator=g)
    allowed = torch.rand(2, 96, generator=g) < 0.3  # [R, W * 32]
    words = (allowed.view(2, 3, 32).long() << torch.arange(32)).sum(-1)  # [R, W] as uint32 values
    bitmask = words.to(torch.int64).apply_(lambda w: w - (1 << 32) if w >= 1 << 31 else w).to(torch.int32)
    out = logits.clone()
    apply_bitmask(out, [1, 3], bitmask)
    expected = logits.clone()
    for j, r in enumerate([1, 3]):
        expected[r][~allowed[j, :V]] = float("-inf")
    assert torch.equal(out, expected)
