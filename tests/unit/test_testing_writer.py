"""write_random_checkpoint: what it writes loads in ours and in transformers, identically."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from qwen2_model import Qwen2Config, from_pretrained
from qwen2_model.testing import HEADS, PRESETS, REWARD_LABELS, tensor_shapes, write_random_checkpoint

AUTO_CLASSES = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
}


def all_tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def ours_as_hf(model) -> dict[str, torch.Tensor]:
    """Our parameters under transformers' names (fused projections split back)."""
    out = {}
    config = model.config if hasattr(model, "config") else None
    for name, p in model.named_parameters():
        p = p.detach()
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("qkv_proj"):
            base = prefix[: -len("qkv_proj")]
            q = config.num_attention_heads * config.head_dim
            kv = config.num_key_value_heads * config.head_dim
            for part, t in zip("qkv", p.split([q, kv, kv])):
                out[f"{base}{part}_proj.{leaf}"] = t
        elif prefix.endswith("gate_up_proj"):
            base = prefix[: -len("gate_up_proj")]
            for part, t in zip(("gate", "up"), p.chunk(2)):
                out[f"{base}{part}_proj.{leaf}"] = t
        elif name == "lm_head.own.weight":
            out["lm_head.weight"] = p
        else:
            out[name] = p
    return out


@pytest.mark.parametrize("head,tied", [(head, False) for head in HEADS] + [("causal_lm", True)])
def test_every_head_loads_in_ours_and_transformers(tmp_path, head, tied):
    transformers = pytest.importorskip("transformers")
    ckpt = write_random_checkpoint(tmp_path, preset="tiny", head=head, seed=1, tie_word_embeddings=tied)
    tensors = all_tensors(ckpt)
    assert set(tensors) == set(tensor_shapes(Qwen2Config.from_pretrained(ckpt)))
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == [HEADS[head]]

    ours = from_pretrained(ckpt)
    assert type(ours).__name__ == HEADS[head]
    mine = ours_as_hf(ours)
    assert set(mine) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(mine[name], t), name

    if head in REWARD_LABELS:  # trust_remote_code models: transformers' Qwen2Model holds all but the score head
        hf, info = transformers.Qwen2Model.from_pretrained(ckpt, output_loading_info=True)
        assert not info["missing_keys"] and set(info["unexpected_keys"]) == {n for n in tensors if n.startswith("score.")}
        assert tensors["score.2.weight"].shape == (REWARD_LABELS[head], hf.config.hidden_size)
        for name, t in hf.state_dict().items():
            assert torch.equal(t, tensors[f"model.{name}"]), name
        return
    auto = getattr(transformers, AUTO_CLASSES[head])
    hf, info = auto.from_pretrained(ckpt, output_loading_info=True)
    assert type(hf).__name__ == HEADS[head]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = hf.state_dict()
    for name, t in tensors.items():
        assert torch.equal(state[name], t), name
    hf_params = {n for n, _ in hf.named_parameters()}
    assert hf_params <= set(tensors), hf_params - set(tensors)
    if head == "causal_lm":
        assert torch.equal(state["lm_head.weight"], tensors["model.embed_tokens.weight" if tied else "lm_head.weight"])
        shared = ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
        assert shared == tied


def test_outputs_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = write_random_checkpoint(tmp_path, head="causal_lm", seed=2)
    ours = from_pretrained(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_writes_an_index(tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = write_random_checkpoint(tmp_path, num_shards=3, seed=1)
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    expected = tensor_shapes(Qwen2Config.from_pretrained(ckpt))
    assert set(index["weight_map"]) == set(expected)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        for name, t in load_file(str(ckpt / shard)).items():
            assert index["weight_map"][name] == shard
            assert tuple(t.shape) == expected[name]
    # the same tensors as the one-file checkpoint of the same seed
    single = write_random_checkpoint(tmp_path / "single", seed=1)
    tensors = all_tensors(single)
    sharded = all_tensors(ckpt)
    assert set(tensors) == set(sharded)
    mine = ours_as_hf(from_pretrained(ckpt))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    for name, t in sharded.items():
        assert torch.equal(mine[name], t) and torch.equal(hf[name], t), name


def test_rewriting_a_directory_replaces_old_shards(tmp_path):
    write_random_checkpoint(tmp_path, num_shards=3)
    write_random_checkpoint(tmp_path, num_shards=1)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    from_pretrained(tmp_path)


def test_deterministic_for_a_fixed_seed(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", seed=7)
    b = write_random_checkpoint(tmp_path / "b", seed=7)
    c = write_random_checkpoint(tmp_path / "c", seed=8)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "vocab.json", "merges.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_norms_are_near_but_not_one(tmp_path):
    tensors = all_tensors(write_random_checkpoint(tmp_path))
    norm = tensors["model.norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm)) and (norm - 1).abs().mean() < 0.2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype(tmp_path, dtype):
    ckpt = write_random_checkpoint(tmp_path, dtype=dtype)
    assert {t.dtype for t in all_tensors(ckpt).values()} == {getattr(torch, dtype)}
    assert Qwen2Config.from_pretrained(ckpt).torch_dtype == dtype
    assert {p.dtype for p in from_pretrained(ckpt).parameters()} == {getattr(torch, dtype)}


def test_config_special_tokens_and_labels(tmp_path):
    from tokenizers import Tokenizer

    ckpt = write_random_checkpoint(tmp_path, head="token_classification", num_labels=3)
    config = Qwen2Config.from_pretrained(ckpt)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    assert config.eos_token_id == config.pad_token_id == eos
    assert config.vocab_size >= tok.get_vocab_size(with_added_tokens=True)
    assert config.id2label == {0: "O", 1: "B-ENT", 2: "I-ENT"} and config.num_labels == 3
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == eos
    seq = Qwen2Config.from_pretrained(write_random_checkpoint(tmp_path / "seq", head="sequence_classification",
                                                              num_labels=2))
    assert seq.id2label == {0: "LABEL_0", 1: "LABEL_1"} and seq.pad_token_id == eos
    assert Qwen2Config.from_pretrained(write_random_checkpoint(tmp_path / "lm")).pad_token_id is None


def test_overrides(tmp_path):
    ckpt = write_random_checkpoint(tmp_path, num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=2048)
    config = Qwen2Config.from_pretrained(ckpt)
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim, config.vocab_size) == (3, 32, 16, 2048)
    assert all_tensors(ckpt)["model.layers.2.self_attn.k_proj.weight"].shape == (16, 32)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        write_random_checkpoint(tmp_path, preset="qwen2-72b")
    with pytest.raises(ValueError, match="head"):
        write_random_checkpoint(tmp_path, head="multiple_choice")
    with pytest.raises(ValueError, match="vocab_size 16"):
        write_random_checkpoint(tmp_path, vocab_size=16)


def test_real_vocabulary(tmp_path, qwen_tokenizer_dir):
    ckpt = write_random_checkpoint(tmp_path, head="base", tokenizer_dir=qwen_tokenizer_dir)
    config = Qwen2Config.from_pretrained(ckpt)
    assert config.eos_token_id == 151643  # <|endoftext|>
    assert config.vocab_size >= 151643
    assert (ckpt / "tokenizer.json").read_bytes() == (qwen_tokenizer_dir / "tokenizer.json").read_bytes()
    assert from_pretrained(ckpt).embed_tokens.weight.shape == (config.vocab_size, 64)


def test_qwen2_05b_preset_shape():
    """Config only: the full preset writes ~2 GB of weights."""
    config = Qwen2Config(architectures=["Qwen2ForCausalLM"], **PRESETS["qwen2-0.5b"])
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (896, 24, 14, 2, 4864, 151936)
    assert config.head_dim == 64 and config.rope_theta == 1e6 and config.tie_word_embeddings
    shapes = tensor_shapes(config)
    assert "lm_head.weight" not in shapes
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (128, 896)
    assert sum(math.prod(s) for s in shapes.values()) == 494_032_768  # Qwen2-0.5B's published count
