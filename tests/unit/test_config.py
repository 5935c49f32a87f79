"""Qwen2Config: HF field names and defaults, both transformers spellings, and a ConfigError naming the field."""

import json

import pytest
import torch

from qwen2_model.config import ConfigError, Qwen2Config

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def make(**overrides) -> Qwen2Config:
    return Qwen2Config.from_dict({**SMALL, **overrides})


# --- invalid fields: the message names the field ------------------------------------------------

@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "max_position_embeddings"])
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        make(**{field: value})


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_non_integer_sizes_name_the_field(field):
    with pytest.raises(ConfigError, match=field):
        make(**{field: 64.5})
    with pytest.raises(ConfigError, match=field):
        make(**{field: True})


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads") as info:
        make(num_attention_heads=4, num_key_value_heads=3, head_dim=16)
    assert "num_attention_heads" in str(info.value)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        make(num_attention_heads=4, num_key_value_heads=8)  # more KV heads than query heads


def test_odd_head_dim_names_head_dim():
    with pytest.raises(ConfigError, match="head_dim"):
        make(head_dim=15)


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_unsupported_rope_type(key):
    with pytest.raises(ConfigError, match="rope_scaling") as info:
        make(rope_scaling={key: "mrope", "factor": 2.0})
    assert "mrope" in str(info.value)


def test_unsupported_rope_type_in_rope_parameters():
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope'"):
        make(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0})


@pytest.mark.parametrize("factor", [0.5, 0, -1, None, "2"])
def test_rope_factor_below_one_or_missing(factor):
    scaling = {"rope_type": "linear"} if factor is None else {"rope_type": "linear", "factor": factor}
    with pytest.raises(ConfigError, match=r"rope_scaling\.factor"):
        make(rope_scaling=scaling)


def test_rope_theta_and_rms_norm_eps_must_be_positive():
    with pytest.raises(ConfigError, match="rope_theta"):
        make(rope_theta=0)
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        make(rms_norm_eps=-1e-6)


@pytest.mark.parametrize("act", ["gelu", "relu", "SiLU"])
def test_bad_hidden_act(act):
    with pytest.raises(ConfigError, match="hidden_act") as info:
        make(hidden_act=act)
    assert repr(act) in str(info.value)


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_bad_torch_dtype(key):
    with pytest.raises(ConfigError, match="torch_dtype 'float8'"):
        make(**{key: "float8"})


@pytest.mark.parametrize("field", ["eos_token_id", "pad_token_id", "bos_token_id"])
@pytest.mark.parametrize("value", [512, -1, 10**6])
def test_special_ids_outside_vocab(field, value):
    with pytest.raises(ConfigError, match=field) as info:
        make(**{field: value})
    assert str(value) in str(info.value)


def test_eos_list_with_one_id_outside_vocab():
    with pytest.raises(ConfigError, match="eos_token_id 600"):
        make(eos_token_id=[1, 600])
    assert make(eos_token_id=[1, 511]).eos_token_ids == [1, 511]


def test_layer_types_length_mismatch():
    with pytest.raises(ConfigError, match="layer_types"):
        make(layer_types=["full_attention"] * 3)


def test_sliding_window_must_be_positive_when_used():
    with pytest.raises(ConfigError, match="sliding_window"):
        make(use_sliding_window=True, sliding_window=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe", "qwen3"])
def test_wrong_model_type(model_type):
    with pytest.raises(ConfigError, match="model_type") as info:
        make(model_type=model_type)
    assert model_type in str(info.value)


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="architectures") as info:
        make(architectures=["LlamaForCausalLM"])
    assert "LlamaForCausalLM" in str(info.value)


def test_bad_id2label_keys():
    with pytest.raises(ConfigError, match="id2label"):
        make(id2label={"0": "a", "2": "b"})


def test_wrong_json_type_is_a_config_error():
    with pytest.raises(ConfigError, match="wrong type"):
        make(num_labels="three")


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64,')
    with pytest.raises(ConfigError, match="config.json") as info:
        Qwen2Config.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json") as info:
        Qwen2Config.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_error_from_file_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "num_key_value_heads": 3, "head_dim": 16}))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        Qwen2Config.from_pretrained(tmp_path)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- defaults and derived values -----------------------------------------------------------------

def test_kv_heads_default_to_attention_heads_and_head_dim_is_derived():
    raw = dict(SMALL)
    del raw["num_key_value_heads"]
    config = Qwen2Config.from_dict(raw)
    assert config.num_key_value_heads == 4
    assert config.head_dim == 16
    assert make(head_dim=32).head_dim == 32  # explicit head_dim wins
    assert make(num_key_value_heads=None).num_key_value_heads == 4


def test_hf_defaults():
    config = Qwen2Config.from_dict({})
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (151936, 4096, 32)
    assert config.hidden_act == "silu" and config.rope_theta == 10000.0 and config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings is False and config.rope_type == "default"
    assert config.architecture == "Qwen2ForCausalLM"
    assert config.dtype == torch.float32 and config.eos_token_ids == []


def test_unknown_fields_are_carried_through():
    config = make(initializer_range=0.02, attention_dropout=0.0, transformers_version="4.45.0")
    assert config.extra["initializer_range"] == 0.02
    assert config.to_dict()["transformers_version"] == "4.45.0"


# --- both transformers spellings -------------------------------------------------------------------

@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_transformers_4_and_5_rope_spellings_read_the_same(scaling):
    v4 = {**SMALL, "rope_theta": 1e6}
    if scaling:
        legacy = dict(scaling)
        legacy["type"] = legacy.pop("rope_type")  # the oldest 4.x spelling
        v4["rope_scaling"] = legacy
    v5 = {**SMALL, "rope_parameters": {"rope_theta": 1e6, **(scaling or {"rope_type": "default"})}}
    a, b = Qwen2Config.from_dict(v4), Qwen2Config.from_dict(v5)
    assert a.rope_theta == b.rope_theta == 1e6
    assert a.rope_type == b.rope_type == (scaling["rope_type"] if scaling else "default")
    if scaling:
        assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == scaling["factor"]
        if "original_max_position_embeddings" in scaling:
            assert b.rope_scaling["original_max_position_embeddings"] == 64
    else:
        assert not a.rope_scaling and not b.rope_scaling


def test_rope_parameters_without_theta_uses_default():
    assert make(rope_parameters={"rope_type": "default"}).rope_theta == 10000.0


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float32", torch.float32)])
def test_torch_dtype_and_dtype_keys(name, dtype):
    assert make(torch_dtype=name).dtype == dtype
    assert make(dtype=name).dtype == dtype
    assert make(dtype=name).torch_dtype == name
    assert "dtype" not in make(dtype=name).extra


def test_torch_dtype_wins_over_dtype():
    assert make(torch_dtype="bfloat16", dtype="float16").dtype == torch.bfloat16


def test_labels():
    config = make(id2label={"0": "NEG", "1": "NEU", "2": "POS"})
    assert config.num_labels == 3
    assert config.id2label == {0: "NEG", 1: "NEU", 2: "POS"}
    assert config.label2id == {"NEG": 0, "NEU": 1, "POS": 2}
    default = make(num_labels=4)
    assert default.id2label == {i: f"LABEL_{i}" for i in range(4)}
    assert default.label2id == {f"LABEL_{i}": i for i in range(4)}
    assert make().num_labels == 2
    # id2label is the truth when both are given (as transformers does)
    assert make(num_labels=5, id2label={"0": "a", "1": "b"}).num_labels == 2


def test_sliding_window_per_layer():
    config = make(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert [config.layer_sliding_window(i) for i in range(4)] == [None, None, 8, 8]
    typed = make(num_hidden_layers=2, use_sliding_window=True, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention"])
    assert [typed.layer_sliding_window(i) for i in range(2)] == [8, None]
    assert make(sliding_window=8).layer_sliding_window(1) is None


# --- serialization -------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    config = make(tie_word_embeddings=True, rope_scaling={"rope_type": "yarn", "factor": 4.0},
                  torch_dtype="bfloat16", eos_token_id=[1, 2], pad_token_id=0, id2label={"0": "x", "1": "y"},
                  architectures=["Qwen2ForSequenceClassification"], initializer_range=0.02)
    again = Qwen2Config.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    for name in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "rope_scaling", "eos_token_id",
                 "id2label", "label2id", "num_labels", "architectures", "tie_word_embeddings", "torch_dtype"):
        assert getattr(again, name) == getattr(config, name), name
    config.save_pretrained(tmp_path / "out")
    loaded = Qwen2Config.from_pretrained(tmp_path / "out")
    assert loaded.to_dict() == config.to_dict()
    assert Qwen2Config.from_pretrained(tmp_path / "out" / "config.json").to_dict() == config.to_dict()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen2"


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_word_embeddings=True, torch_dtype="bfloat16"),
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=1e6),
    dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
    dict(architectures=["Qwen2ForTokenClassification"], id2label={"0": "O", "1": "B-ENT", "2": "I-ENT"},
         pad_token_id=3, eos_token_id=4, bos_token_id=4),
])
def test_transformers_reads_our_config(tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    ours = make(**overrides)
    ours.save_pretrained(tmp_path)
    hf = transformers.Qwen2Config.from_pretrained(tmp_path)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                 "use_sliding_window", "max_window_layers", "pad_token_id", "bos_token_id",
                 "eos_token_id", "num_labels", "id2label", "label2id", "architectures", "hidden_act"):
        assert getattr(hf, name) == getattr(ours, name), name
    assert getattr(hf, "head_dim", ours.head_dim) == ours.head_dim
    if ours.use_sliding_window:  # transformers drops the window when it is off
        assert hf.sliding_window == ours.sliding_window
    hf_params = getattr(hf, "rope_parameters", None) or {}
    hf_theta = getattr(hf, "rope_theta", None) or hf_params.get("rope_theta")
    assert hf_theta == ours.rope_theta
    hf_scaling = getattr(hf, "rope_scaling", None) or hf_params
    hf_rope_type = hf_scaling.get("rope_type", hf_scaling.get("type", "default")) if hf_scaling else "default"
    assert hf_rope_type == ours.rope_type
    if ours.rope_type != "default":
        assert hf_scaling["factor"] == ours.rope_scaling["factor"]
    hf_dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    if ours.torch_dtype:
        assert str(hf_dtype).removeprefix("torch.") == ours.torch_dtype
    # and what transformers writes, we read back the same
    hf.save_pretrained(tmp_path / "hf")
    back = Qwen2Config.from_pretrained(tmp_path / "hf")
    for name in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "rope_theta", "rope_type",
                 "tie_word_embeddings", "id2label", "num_labels", "eos_token_ids", "architectures", "dtype"):
        assert getattr(back, name) == getattr(ours, name), name
    if ours.rope_type != "default":
        assert back.rope_scaling["factor"] == ours.rope_scaling["factor"]
    assert [back.layer_sliding_window(i) for i in range(2)] == [ours.layer_sliding_window(i) for i in range(2)]
