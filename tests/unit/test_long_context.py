"""Long context: the served context length follows the RoPE scaling, --max-model-len is checked
against it, hf_overrides replaces config fields at load, and configs we cannot run are refused."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen2_model.config import ConfigError, Qwen2Config  # noqa: E402
from qwen2_model.engine.engine import Engine, EngineConfig  # noqa: E402
from qwen2_model.engine.executor import LocalExecutor  # noqa: E402
from qwen2_model.engine.sampling import SamplingParams  # noqa: E402
from qwen2_model.loading import from_pretrained  # noqa: E402

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1, bos_token_id=1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def save_hf(path, **overrides):
    cfg = transformers.Qwen2Config(**{**BASE, **overrides})
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def test_context_length_follows_rope_scaling():
    assert Qwen2Config(**BASE).max_context_length == 64
    assert Qwen2Config(**BASE, rope_scaling=YARN).max_context_length == 256  # original x factor
    # Qwen2.5's published YaRN recipe: max_position_embeddings 32768, factor 4 -> 131072
    qwen25 = Qwen2Config(**{**BASE, "max_position_embeddings": 32768},
                         rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert qwen25.max_context_length == 131072
    assert Qwen2Config(**BASE, rope_scaling={"rope_type": "linear", "factor": 2.0}).max_context_length == 128
    # YaRN without original_max_position_embeddings: transformers takes max_position_embeddings
    assert Qwen2Config(**BASE, rope_scaling={"rope_type": "yarn", "factor": 2.0}).max_context_length == 128


def test_max_model_len_above_the_supported_context_is_refused_naming_both():
    config = Qwen2Config(**BASE, rope_scaling=YARN)
    assert config.check_max_model_len(None) == 256
    assert config.check_max_model_len(100) == 100
    with pytest.raises(ConfigError, match=r"max_model_len 1000 is larger than the model supports: 256 "
                                          r"\(rope_scaling yarn factor 4.0\)"):
        config.check_max_model_len(1000)
    with pytest.raises(ConfigError, match="max_model_len 65 is larger than the model supports: 64"):
        Qwen2Config(**BASE).check_max_model_len(65)


def test_dual_chunk_attention_is_refused(tmp_path):
    raw = {**BASE, "model_type": "qwen2", "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="dual_chunk_attention_config is not supported: dual chunk attention"):
        Qwen2Config.from_pretrained(tmp_path)
    # an override can switch it off (serving then within the plain context)
    assert Qwen2Config.from_pretrained(tmp_path, overrides={"dual_chunk_attention_config": None})


def test_hf_overrides_replace_config_fields(tmp_path):
    save_hf(tmp_path)
    config = Qwen2Config.from_pretrained(tmp_path, overrides={"rope_scaling": YARN, "max_position_embeddings": 64})
    assert config.rope_type == "yarn" and config.max_context_length == 256
    with pytest.raises(ConfigError, match="hf_overrides must be a JSON object"):
        Qwen2Config.from_pretrained(tmp_path, overrides=["rope_scaling"])
    with pytest.raises(ConfigError, match="rope_scaling type 'su' is not supported"):
        Qwen2Config.from_pretrained(tmp_path, overrides={"rope_scaling": {"type": "su", "factor": 2.0}})


def test_engine_refuses_a_max_model_len_the_model_cannot_serve(tmp_path):
    save_hf(tmp_path)
    with pytest.raises(ConfigError, match="max_model_len 512 is larger than the model supports: 64"):
        Engine(LocalExecutor(tmp_path, dtype="float32", kv_cache_memory=1 << 20), EngineConfig(max_model_len=512))


@pytest.mark.parametrize("via", ["config", "hf_overrides"])
def test_yarn_serves_its_derived_length_and_matches_transformers_past_the_original(tmp_path, via):
    """A YaRN checkpoint (original 64 positions, factor 4): the engine serves 256, generates to
    position ~110, and logits there equal transformers' on the same config."""
    ref = save_hf(tmp_path, rope_scaling=YARN) if via == "config" else None
    if via == "hf_overrides":
        save_hf(tmp_path)  # a plain checkpoint, YaRN switched on at serve time
        ref = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, rope_scaling=YARN).eval()
    overrides = {"rope_scaling": YARN} if via == "hf_overrides" else None
    executor = LocalExecutor(tmp_path, dtype="float32", kv_cache_memory=1 << 20, hf_overrides=overrides)
    engine = Engine(executor, EngineConfig(max_num_batched_tokens=32))
    assert engine.max_model_len == 256
    prompt = torch.randint(2, 300, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    out = engine.generate_all({"a": prompt}, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    tokens = out["a"][0]  # choice 0
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False, min_new_tokens=50)
    assert tokens == expected[0, 60:].tolist()
    full = expected[:, :110]
    with torch.no_grad():
        ours = from_pretrained(tmp_path, dtype="float32", hf_overrides=overrides)(full)
        theirs = ref(input_ids=full).logits
    torch.testing.assert_close(ours[:, 64:], theirs[:, 64:], atol=2e-5, rtol=1e-4)  # past the original length
    # and YaRN really changed the numbers there (the test would pass vacuously otherwise)
    plain = from_pretrained(tmp_path, dtype="float32", hf_overrides={"rope_scaling": None})
    with torch.no_grad():
        assert (plain(full)[:, 64:] - theirs[:, 64:]).abs().max() > 1e-3
