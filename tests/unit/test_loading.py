"""from_pretrained: every failure names the tensor or file; a success is fully and exactly loaded."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen2_model import CheckpointError, ConfigError, from_pretrained
from qwen2_model.loading import parse_dtype
from qwen2_model.modeling import base_model
from qwen2_model.testing import write_random_checkpoint

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny_master(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture
def tiny(tiny_master, tmp_path):
    """A fresh copy of a tiny causal-LM checkpoint, free to damage."""
    return shutil.copytree(tiny_master, tmp_path / "ckpt")


def rewrite(path, edit):
    """Load a safetensors file, let `edit` change the dict, and write it back."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def all_tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def expected_parameters(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter name -> what it must hold, built from the checkpoint's HF tensors."""
    out = {}
    for name, _ in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("qkv_proj"):
            base = prefix[: -len("qkv_proj")]
            out[name] = torch.cat([tensors[f"{base}{p}_proj.{leaf}"] for p in "qkv"])
        elif prefix.endswith("gate_up_proj"):
            base = prefix[: -len("gate_up_proj")]
            out[name] = torch.cat([tensors[f"{base}{p}_proj.{leaf}"] for p in ("gate", "up")])
        elif name == "lm_head.own.weight":
            out[name] = tensors["lm_head.weight"]
        else:
            out[name] = tensors[name]
    return out


def assert_loaded_exactly(model, tensors, dtype=None):
    expected = expected_parameters(model, tensors)
    params = dict(model.named_parameters())
    assert set(params) == set(expected)
    for name, param in params.items():
        assert param.device.type != "meta", name
        want = expected[name].to(dtype or param.dtype)
        assert param.dtype == want.dtype, name
        assert param.shape == want.shape, name
        assert torch.equal(param.detach(), want), f"{name} differs from the checkpoint"
    for name, buf in model.named_buffers():
        assert buf.device.type != "meta", name


# --- failures name the tensor or file -------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.bias",
                                  "model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"])
def test_missing_tensor(tiny, name):
    rewrite(tiny / WEIGHTS, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="missing 1 tensor") as info:
        from_pretrained(tiny)
    assert name in str(info.value)


def test_many_missing_tensors_are_counted(tiny):
    rewrite(tiny / WEIGHTS, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")])
    with pytest.raises(CheckpointError, match=r"missing 12 tensor\(s\)") as info:
        from_pretrained(tiny)
    assert "model.layers.1." in str(info.value) and "and 7 more" in str(info.value)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.extra_proj.weight", "model.layers.2.mlp.up_proj.weight",
                                  "score.weight"])
def test_unexpected_tensor(tiny, name):
    rewrite(tiny / WEIGHTS, lambda t: t.update({name: torch.zeros(4, 64)}))
    with pytest.raises(CheckpointError, match="unexpected tensor") as info:
        from_pretrained(tiny)
    assert name in str(info.value) and WEIGHTS in str(info.value)


@pytest.mark.parametrize("name,shape", [("model.layers.0.self_attn.k_proj.weight", (48, 64)),
                                        ("model.layers.1.self_attn.q_proj.bias", (63,)),
                                        ("model.layers.0.mlp.down_proj.weight", (64, 96)),
                                        ("model.embed_tokens.weight", (1000, 64)),
                                        ("lm_head.weight", (1024, 32)),
                                        ("model.norm.weight", (64, 1))])
def test_wrong_shape(tiny, name, shape):
    rewrite(tiny / WEIGHTS, lambda t: t.update({name: torch.zeros(shape)}))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tiny)
    message = str(info.value)
    assert name in message and WEIGHTS in message
    assert str(list(shape)) in message  # the checkpoint's shape, next to the model's


@pytest.mark.parametrize("cut", [1, 100, 5000, "header"])
def test_truncated_file(tiny, cut):
    file = tiny / WEIGHTS
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(4 if cut == "header" else size - cut)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tiny)
    assert str(file) in str(info.value)


def test_empty_file(tiny):
    (tiny / WEIGHTS).write_bytes(b"")
    with pytest.raises(CheckpointError, match=WEIGHTS):
        from_pretrained(tiny)


def test_directory_without_weights(tiny):
    (tiny / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights") as info:
        from_pretrained(tiny)
    assert str(tiny) in str(info.value) and WEIGHTS in str(info.value)


def test_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        from_pretrained(tmp_path / "nope")


def test_pickle_only_directory(tiny):
    (tiny / WEIGHTS).unlink()
    (tiny / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tiny)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "safetensors" in message


def test_bad_config_fails_before_weights(tiny):
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        from_pretrained(tiny)


@pytest.fixture(scope="module")
def sharded_master(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("sharded"), seed=4, num_shards=3)


@pytest.fixture
def sharded(sharded_master, tmp_path):
    return shutil.copytree(sharded_master, tmp_path / "ckpt")


def test_sharded_loads_exactly(sharded):
    assert_loaded_exactly(from_pretrained(sharded), all_tensors(sharded))


def test_index_points_at_missing_shard(sharded):
    shard = "model-00002-of-00003.safetensors"
    (sharded / shard).unlink()
    with pytest.raises(CheckpointError) as info:
        from_pretrained(sharded)
    assert shard in str(info.value) and "model.safetensors.index.json" in str(info.value)


def test_invalid_index(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        from_pretrained(sharded)
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        from_pretrained(sharded)


def test_duplicate_tensor_across_shards(sharded):
    first, second = "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"
    with safe_open(str(sharded / first), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith("weight"))
        tensor = f.get_tensor(name)
    rewrite(sharded / second, lambda t: t.update({name: tensor}))
    with pytest.raises(CheckpointError, match="appears twice") as info:
        from_pretrained(sharded)
    assert name in str(info.value) and second in str(info.value)


def test_truncated_shard_names_the_shard(sharded):
    shard = sharded / "model-00003-of-00003.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(sharded)
    assert shard.name in str(info.value)


def test_missing_tensor_in_shard(sharded):
    shard = sharded / "model-00002-of-00003.safetensors"
    names = []
    rewrite(shard, lambda t: names.append(next(iter(t))) or t.pop(names[0]))
    with pytest.raises(CheckpointError, match="missing 1 tensor") as info:
        from_pretrained(sharded)
    assert names[0] in str(info.value)


# --- successful loads ------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["base", "causal_lm", "sequence_classification", "token_classification",
                                  "question_answering"])
def test_every_parameter_matches_the_file(tmp_path, head):
    ckpt = write_random_checkpoint(tmp_path, head=head, seed=5)
    model = from_pretrained(ckpt)
    assert_loaded_exactly(model, all_tensors(ckpt))
    assert not model.training


def test_no_uninitialized_rows_with_poisoned_allocator(tiny, monkeypatch):
    """Fill the fresh storage with NaN: any row the loader skipped would still hold it."""
    original = torch.nn.Module.to_empty

    def to_nan(self, *, device, recurse=True):
        out = original(self, device=device, recurse=recurse)
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.nn.Module, "to_empty", to_nan)
    model = from_pretrained(tiny)
    for name, p in model.named_parameters():
        assert not torch.isnan(p).any(), name
    assert_loaded_exactly(model, all_tensors(tiny))


def test_qa_checkpoint_with_model_prefix_loads(tmp_path):
    """QA checkpoints have named the decoder both `transformer.` and `model.`."""
    ckpt = write_random_checkpoint(tmp_path, head="question_answering", seed=6)
    tensors = all_tensors(ckpt)
    renamed = {("model." + k[len("transformer."):] if k.startswith("transformer.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, str(ckpt / WEIGHTS))
    assert_loaded_exactly(from_pretrained(ckpt), tensors)


def test_rotary_inv_freq_in_checkpoint_is_ignored(tiny):
    rewrite(tiny / WEIGHTS, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    from_pretrained(tiny)


@pytest.mark.parametrize("file_dtype,load_dtype,expected", [
    ("bfloat16", torch.float32, torch.float32),
    ("float32", torch.bfloat16, torch.bfloat16),
    ("float32", "bf16", torch.bfloat16),
    ("float16", "float32", torch.float32),
    ("bfloat16", None, torch.bfloat16),
    ("float32", None, torch.float32),
])
def test_dtype_cast_on_load(tmp_path, file_dtype, load_dtype, expected):
    ckpt = write_random_checkpoint(tmp_path, dtype=file_dtype, seed=7)
    tensors = all_tensors(ckpt)
    assert {t.dtype for t in tensors.values()} == {getattr(torch, file_dtype)}
    model = from_pretrained(ckpt, dtype=load_dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert_loaded_exactly(model, tensors, dtype=expected)


def test_bad_dtype_argument(tiny):
    with pytest.raises(ValueError, match="int8"):
        from_pretrained(tiny, dtype="int8")
    assert parse_dtype(torch.float16, None) == torch.float16


def test_tied_embeddings_share_storage(tmp_path):
    ckpt = write_random_checkpoint(tmp_path, tie_word_embeddings=True, seed=8)
    tensors = all_tensors(ckpt)
    assert "lm_head.weight" not in tensors
    model = from_pretrained(ckpt)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not any("lm_head" in name for name, _ in model.named_parameters())
    assert_loaded_exactly(model, tensors)


def test_tied_checkpoint_that_also_has_lm_head_loads(tmp_path):
    ckpt = write_random_checkpoint(tmp_path, tie_word_embeddings=True, seed=9)
    embed = load_file(str(ckpt / WEIGHTS))["model.embed_tokens.weight"]
    rewrite(ckpt / WEIGHTS, lambda t: t.update({"lm_head.weight": embed.clone()}))
    model = from_pretrained(ckpt)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, embed)


def test_untied_lm_head_has_its_own_storage(tiny):
    model = from_pretrained(tiny)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, load_file(str(tiny / WEIGHTS))["lm_head.weight"])


def test_architecture_override(tiny):
    assert type(from_pretrained(tiny, architecture="Qwen2ForCausalLM")).__name__ == "Qwen2ForCausalLM"
    # strict: a causal-LM checkpoint is not silently loaded as a headless model
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        from_pretrained(tiny, architecture="Qwen2Model")
    with pytest.raises(CheckpointError, match="Nope"):
        from_pretrained(tiny, architecture="Nope")


def test_loaded_model_runs(tiny):
    model = from_pretrained(tiny)
    assert base_model(model).rotary_emb is not None
    ids = torch.randint(0, 1024, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 7, 1024) and torch.isfinite(logits).all()


# --- memory ---------------------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import resource, sys
    import torch
    from qwen2_model import from_pretrained

    def peak_rss():
        # VmHWM belongs to this program's address space; ru_maxrss would also count the forking
        # parent's (pytest's) RSS, which Linux carries across fork + exec.
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib * 1024

    before, before_ru = peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = from_pretrained(sys.argv[1])
    after, after_ru = peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert all(p.device.type == "cpu" for p in model.parameters())
    print(after - before, (after_ru - before_ru) * 1024)  # ru_maxrss is in KiB on Linux
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units differ off Linux")
def test_peak_memory_is_well_under_twice_the_weights(tmp_path):
    ckpt = write_random_checkpoint(tmp_path, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                                   vocab_size=16384, seed=10)
    size = (ckpt / WEIGHTS).stat().st_size
    assert size > 150e6
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MEASURE, str(ckpt)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    delta, delta_ru = map(int, result.stdout.strip().splitlines()[-1].split())
    assert delta_ru <= delta  # the inherited ru_maxrss can only hide growth, never add to it
    assert delta > 0.9 * size  # the weights themselves are resident: the measure works
    assert delta < 1.6 * size, f"peak RSS grew by {delta / size:.2f}x the {size / 1e6:.0f} MB of weights"
