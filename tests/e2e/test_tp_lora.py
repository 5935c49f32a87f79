"""LoRA under tensor parallelism (gloo, real Ray actors): adapter weights sharded with the layers.

tp=2 splits q/k/v heads and the MLP (B of column-parallel layers on its output rows, A of o_proj
and down_proj on its input columns, their partial deltas summed by the layer's all-reduce); tp=4
on the tiny preset (2 KV heads) also replicates the k/v slices of B. Against PEFT + transformers,
in one engine batch mixing three adapters and the base: greedy tokens identical, and every
prompt token's logprob (the logits, through the serving path) within float tolerance.
"""

from __future__ import annotations

import pytest
import ray
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from deployments.workers import RayExecutor  # noqa: E402
from qwen2_model.engine.engine import Engine, EngineConfig  # noqa: E402
from qwen2_model.engine.sampling import SamplingParams  # noqa: E402
from qwen2_model.lora import LoraError  # noqa: E402
from qwen2_model.testing import write_random_checkpoint  # noqa: E402

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]),
    "c": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
              rank_pattern={"gate_proj": 6}),
}
PROMPTS = {"a": list(range(3, 40)), "b": [5, 9, 200, 17, 4], "c": list(range(300, 322)), "base": [7, 8, 9, 10, 11]}
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
KV = 2 << 20


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("base"), num_hidden_layers=2, seed=7)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root, made = tmp_path_factory.mktemp("adapters"), {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **kw)).save_pretrained(root / name)
        made[name] = str(root / name)
    return made


@pytest.fixture(scope="module")
def references(base, adapters):
    """name -> (greedy tokens, prompt-token logprobs) from PEFT / transformers."""
    out = {}
    for name, prompt in PROMPTS.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if name != "base":
            model = peft.PeftModel.from_pretrained(model, adapters[name])
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)  # [S, V]
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                    min_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        out[name] = (tokens, [float(logp[j, prompt[j + 1]]) for j in range(len(prompt) - 1)])
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_mixed_adapters_match_peft_under_tp(base, adapters, references, tp):
    ex = RayExecutor(base, tp=tp, kv_cache_memory=KV)
    try:
        engine = Engine(ex, EngineConfig(max_num_batched_tokens=16))  # chunked: prefill and decode rows mix
        for name in ADAPTERS:
            engine.add_lora(name, adapters[name])
        loras = {n: n for n in ADAPTERS}
        out = engine.generate_all(PROMPTS, GREEDY, loras=loras)
        assert {n: out[n][0] for n in PROMPTS} == {n: references[n][0] for n in PROMPTS}
        assert engine.stats.max_batch_seqs == 4
        # logits: every prompt token's logprob, all four requests in one batch
        for name, prompt in PROMPTS.items():
            engine.add_request(f"lp-{name}", prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                               lora=loras.get(name))
        got = {}
        while engine.has_unfinished():
            for o in engine.step():
                if o.prompt_logprobs is not None:
                    got[o.request_id[3:]] = [lp.logprob for lp in o.prompt_logprobs]
        for name in PROMPTS:
            assert got[name] == pytest.approx(references[name][1], abs=1e-4), name
        # a bad adapter is refused on the driver: no rank fails, the group keeps serving
        with pytest.raises(LoraError, match="does not exist"):
            engine.add_lora("bad", "/nonexistent/adapter")
        assert ex.alive
    finally:
        ex.shutdown()
