"""LoRA adapters against PEFT + transformers, per row in mixed batches; prefix-cache isolation; slot eviction; bad adapters.

Adapters are written by peft itself (`get_peft_model` + `save_pretrained`, with `init_lora_weights=False`
so B is nonzero and the delta shows) on a random base from qwen2_model/testing.py. Three differ in
what they exercise: rslora on q/v/down; rank 8 on all seven linears; rank 2 with PEFT's
rank_pattern/alpha_pattern on k/o/gate/up.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from qwen2_model import from_pretrained  # noqa: E402
from qwen2_model.engine.engine import Engine, EngineConfig, EngineError  # noqa: E402
from qwen2_model.engine.executor import LocalExecutor  # noqa: E402
from qwen2_model.engine.sampling import SamplingParams  # noqa: E402
from qwen2_model.lora import LoraError, LoraSlots, read_adapter  # noqa: E402
from qwen2_model.testing import write_random_checkpoint  # noqa: E402

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]),
    "c": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
              rank_pattern={"gate_proj": 6}, alpha_pattern={"o_proj": 3}),
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = {"a": list(range(3, 40)), "b": [5, 9, 200, 17, 4], "c": list(range(300, 322)), "base": [7, 8, 9, 10, 11, 12]}
KV = 2 << 20


def write_peft_adapter(base_dir, out_dir, seed: int, **lora_kwargs):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora_kwargs)).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("base"), num_hidden_layers=2, seed=5)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(write_peft_adapter(base, root / name, seed=i, **kw)) for i, (name, kw) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def references(base, adapters):
    """name -> (PEFT model, or transformers' base for "base")."""
    refs = {"base": transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()}
    for name, path in adapters.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        refs[name] = peft.PeftModel.from_pretrained(hf, path).eval()
    return refs


def reference_greedy(model, prompt, n=GREEDY.max_tokens):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def expected(references):
    """Each prompt's greedy tokens under its own adapter (the key), from PEFT."""
    return {name: reference_greedy(references[name], PROMPTS[name]) for name in PROMPTS}


def lora_engine(base, adapters, names=("a", "b", "c"), **config) -> Engine:
    engine = Engine(LocalExecutor(base, kv_cache_memory=KV), EngineConfig(**config))
    for name in names:
        engine.add_lora(name, adapters[name])
    return engine


def test_logits_per_row_match_peft_in_a_mixed_batch(base, adapters, references):
    """One forward, rows of three adapters and the base: each row's logits are its PEFT model's."""
    ours = from_pretrained(base)
    slots = LoraSlots(ours.model, max_loras=4, max_rank=8)
    for slot, name in enumerate(("c", "a", "b")):  # slot order unrelated to row order
        slots.load(slot, read_adapter(adapters[name], ours.config, 8), name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, 11), generator=g)
    order, slot_of = ["a", "base", "b", "c"], {"c": 0, "a": 1, "b": 2, "base": -1}
    with torch.inference_mode(), slots.rows([(slot_of[n], i * 11, 11) for i, n in enumerate(order)]):
        logits = ours(ids)
    with torch.inference_mode():
        plain = ours(ids)  # no rows set: the base model, whatever the slots hold
    for i, name in enumerate(order):
        with torch.no_grad():
            ref = references[name](input_ids=ids[i:i + 1]).logits[0]
        torch.testing.assert_close(logits[i], ref, atol=2e-5, rtol=1e-4, msg=name)
        if name != "base":  # the adapter really changes the output
            assert (ref - references["base"](input_ids=ids[i:i + 1]).logits[0]).abs().max() > 0.05
    torch.testing.assert_close(plain, references["base"](input_ids=ids).logits, atol=2e-5, rtol=1e-4)


def test_greedy_tokens_match_peft_alone_and_mixed(base, adapters, expected):
    for name in PROMPTS:  # alone
        engine = lora_engine(base, adapters)
        out = engine.generate_all({name: PROMPTS[name]}, GREEDY, loras={name: None if name == "base" else name})
        assert out[name][0] == expected[name], name
    # together, chunked prefill so prefill and decode rows of different adapters share steps
    engine = lora_engine(base, adapters, max_num_batched_tokens=16)
    out = engine.generate_all(PROMPTS, GREEDY, loras={n: n for n in ("a", "b", "c")})
    assert engine.stats.max_batch_seqs == 4
    assert {n: out[n][0] for n in PROMPTS} == expected
    assert len({tuple(v) for v in expected.values()}) == 4


def test_prefix_cache_isolated_per_adapter(base, adapters, expected):
    """The same 37-token prompt (2 full blocks) under a, b and the base: none takes another's KV blocks."""
    prompt = PROMPTS["a"]
    engine = lora_engine(base, adapters)
    alone = {}
    for name in ("a", "b", None):
        alone[name] = lora_engine(base, adapters).generate_all({"x": prompt}, GREEDY, loras={"x": name})["x"][0]
    assert alone["a"] == expected["a"] and len(set(map(tuple, alone.values()))) == 3
    hits = []
    for i, name in enumerate(("a", "b", None, "a")):
        out = engine.generate_all({f"r{i}": prompt}, GREEDY, loras={f"r{i}": name})[f"r{i}"][0]
        assert out == alone[name], (i, name)
        hits.append(engine.blocks.prefix_hits)
    assert hits[:3] == [0, 0, 0]  # b and the base found nothing of a's blocks
    assert hits[3] == 2  # a again: both full blocks from the cache


def test_slot_eviction_and_reload(base, adapters, expected):
    engine = lora_engine(base, adapters, max_loras=1)
    for i, name in enumerate(("a", "b", "a")):
        out = engine.generate_all({"x": PROMPTS[name]}, GREEDY, loras={"x": name})["x"][0]
        assert out == expected[name], name
    assert engine.stats.lora_loads == 3 and engine.stats.lora_evictions == 2
    # three adapters submitted together over two slots: they take turns, results unchanged
    engine = lora_engine(base, adapters, max_loras=2)
    out = engine.generate_all(PROMPTS, GREEDY, loras={n: n for n in ("a", "b", "c")})
    assert {n: out[n][0] for n in PROMPTS} == expected
    assert engine.stats.lora_loads == 3 and engine.stats.lora_evictions == 1
    assert len(engine.lora_slots) == 2


def test_unknown_adapter_is_not_found(base, adapters):
    engine = lora_engine(base, adapters)
    with pytest.raises(EngineError) as err:
        engine.add_request("x", [1, 2, 3], GREEDY, lora="nope")
    assert err.value.code == "model_not_found" and "'nope'" in str(err.value)


@pytest.fixture(scope="module")
def bad_adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    other = write_random_checkpoint(root / "other-base", num_hidden_layers=2, hidden_size=32, seed=1)
    made = {
        "rank over the cap": write_peft_adapter(base, root / "r32", 0, r=32, lora_alpha=32, target_modules=["q_proj"]),
        "lm_head target": write_peft_adapter(base, root / "lm", 0, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
        "another base": write_peft_adapter(other, root / "other", 0, r=4, lora_alpha=8, target_modules=["q_proj"]),
        "modules_to_save": write_peft_adapter(base, root / "mts", 0, r=4, lora_alpha=8, target_modules=["q_proj"],
                                              modules_to_save=["lm_head"]),
    }
    empty = root / "empty"
    empty.mkdir()
    made["no config"] = empty
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    made["bad json"] = broken
    made["missing"] = root / "missing"
    return made


@pytest.mark.parametrize("case,message", [
    ("rank over the cap", "rank 32, over max_lora_rank 16"),
    ("lm_head target", "cannot be applied"),
    ("another base", "for another base model"),
    ("modules_to_save", "modules_to_save"),
    ("no config", "adapter_config.json is missing"),
    ("bad json", "is not valid JSON"),
    ("missing", "does not exist"),
])
def test_bad_adapter_fails_with_a_clear_error_and_the_engine_keeps_serving(base, adapters, bad_adapters, expected,
                                                                          case, message):
    engine = lora_engine(base, adapters, names=("a",))
    with pytest.raises(LoraError, match=message):
        engine.add_lora("bad", str(bad_adapters[case]))
    assert "bad" not in engine.loras
    out = engine.generate_all({"a": PROMPTS["a"]}, GREEDY, loras={"a": "a"})
    assert out["a"][0] == expected["a"]
