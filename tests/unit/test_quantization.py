"""GPTQ / AWQ checkpoints and --quantization int8.

The packers follow the published layouts (checked here against hand-worked int32 values); random
checkpoints packed by `write_quantized_checkpoint` must give the logits of transformers' Qwen2 on the
float checkpoint holding the dequantized weights, with every kernel (dequant-at-load, torch's packed
int4 / int8 CPU kernels), and greedy tokens identical.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen2_model.config import ConfigError, Qwen2Config  # noqa: E402
from qwen2_model.engine.engine import Engine, EngineConfig  # noqa: E402
from qwen2_model.engine.executor import LocalExecutor  # noqa: E402
from qwen2_model.engine.sampling import SamplingParams  # noqa: E402
from qwen2_model.generation import greedy_generate  # noqa: E402
from qwen2_model.loading import CheckpointError, from_pretrained  # noqa: E402
from qwen2_model.modeling import check_tp_split  # noqa: E402
from qwen2_model.quantization import packing, weight_bytes  # noqa: E402
from qwen2_model.testing import write_quantized_checkpoint, write_random_checkpoint  # noqa: E402

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


# --- the published bit layouts, worked by hand ------------------------------------------------------

def test_gptq_layout_worked_example():
    # input rows 0..7 of one output column hold 0..7: packed along rows, lowest bits first
    q = torch.arange(8).reshape(8, 1)
    assert packing.pack_rows(q, 4).item() == 0x76543210
    # AutoGPTQ stores zeros minus one: a symmetric 4-bit zero of 8 is 0x77777777 per int32
    _, qzeros = packing.gptq_pack(torch.zeros(8, 8, dtype=torch.int64), torch.full((1, 8), 8), 4)
    assert qzeros.item() == 0x77777777
    # 8-bit: four values per int32; a value with the top bit set makes a negative int32
    assert packing.pack_rows(torch.tensor([[1], [2], [3], [200]]), 8).item() == 0xC8030201 - (1 << 32)
    q2, z2 = packing.gptq_unpack(packing.pack_rows(q, 4), qzeros, 4)
    assert q2.flatten().tolist() == list(range(8)) and z2.flatten().tolist() == [8] * 8


def test_awq_layout_worked_example():
    # one input row, output columns 0..7 holding 0..7: AWQ stores value [0,2,4,6,1,3,5,7][k] at nibble k
    q = torch.arange(8).reshape(1, 8)
    qweight, qzeros = packing.awq_pack(q, q)
    assert qweight.item() == 0x75316420 and qzeros.item() == 0x75316420
    q2, z2 = packing.awq_unpack(qweight, qzeros)
    assert q2.tolist() == q.tolist() and z2.tolist() == q.tolist()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(0)
    p = 32 // bits
    values = torch.randint(0, 2 ** bits, (4 * p, 3 * p), generator=g)
    assert torch.equal(packing.unpack_rows(packing.pack_rows(values, bits), bits), values.int())
    assert torch.equal(packing.unpack_cols(packing.pack_cols(values, bits), bits), values.int())


# --- quantized checkpoints against transformers on the dequantized weights ---------------------------

CASES = {
    "gptq4-g32": dict(method="gptq", bits=4, group_size=32),
    "gptq4-g64-asym": dict(method="gptq", bits=4, group_size=64, sym=False),
    "gptq4-g128-act": dict(method="gptq", bits=4, group_size=128, desc_act=True),
    "gptq4-g32-act-asym": dict(method="gptq", bits=4, group_size=32, desc_act=True, sym=False),
    "gptq4-perchannel": dict(method="gptq", bits=4, group_size=-1),
    "gptq8-g64": dict(method="gptq", bits=8, group_size=64),
    "gptq8-g32-act": dict(method="gptq", bits=8, group_size=32, desc_act=True),
    "gptq8-perchannel": dict(method="gptq", bits=8, group_size=-1),
    "awq-g32": dict(method="awq", bits=4, group_size=32, sym=False),
    "awq-g128": dict(method="awq", bits=4, group_size=128, sym=False),
}
# the packed kernel of each case (8-bit with groups has none: dequant)
AUTO_KERNEL = {"gptq8-g64": "DequantKernel", "gptq8-g32-act": "DequantKernel", "gptq8-perchannel": "Int8Kernel"}


def kernels_of(model) -> set[str]:
    return {type(m.quant.kernel).__name__ for m in model.modules() if getattr(m, "quant", None) is not None}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    made = {}

    def get(case: str):
        if case not in made:
            root = tmp_path_factory.mktemp(case)
            path = write_quantized_checkpoint(root / "q", reference_dir=root / "ref", dtype="float32",
                                              **CASES[case], **SHAPE)
            made[case] = (path, root / "ref")
        return made[case]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_logits_match_dequantized_transformers(quantized, case):
    path, ref_path = quantized(case)
    ref = transformers.Qwen2ForCausalLM.from_pretrained(ref_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    for kernel in ("dequant", "packed"):
        if kernel == "packed" and AUTO_KERNEL.get(case) == "DequantKernel":
            with pytest.raises(CheckpointError, match="no packed CPU kernel for gptq 8-bit"):
                from_pretrained(path, quant_kernel=kernel)
            continue
        model = from_pretrained(path, quant_kernel=kernel)
        assert kernels_of(model) == {"DequantKernel" if kernel == "dequant" else AUTO_KERNEL.get(case, "Int4Kernel")}
        with torch.no_grad():
            torch.testing.assert_close(model(ids), expected, atol=2e-5, rtol=1e-4)
        prompt = ids[0, :5].tolist()
        assert greedy_generate(model, prompt, 12) == ref.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 5:].tolist()


def test_auto_kernel_is_packed_only_for_bf16_compute(quantized):
    path, _ = quantized("gptq4-g32")
    assert kernels_of(from_pretrained(path, dtype="float32")) == {"DequantKernel"}
    assert kernels_of(from_pretrained(path, dtype="bfloat16")) == {"Int4Kernel"}


def test_packed_kernels_hold_less_memory_than_dequantized(quantized):
    path, _ = quantized("gptq4-g32")
    packed, dense = from_pretrained(path, quant_kernel="packed"), from_pretrained(path, quant_kernel="dequant")
    linears = sum(m.quant.kernel.nbytes() for m in packed.modules() if getattr(m, "quant", None) is not None)
    dense_linears = sum(m.quant.kernel.nbytes() for m in dense.modules() if getattr(m, "quant", None) is not None)
    assert linears * 5 < dense_linears  # 4 bits + a float32 (scale, zero) pair per 32 weights vs 32 bits
    assert weight_bytes(packed) < weight_bytes(dense)


def test_quantized_checkpoint_generates_through_the_engine(quantized):
    path, ref_path = quantized("gptq4-g128-act")
    prompts = {"a": [5, 6, 7, 8, 9], "b": list(range(30, 70))}
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    config = EngineConfig(max_num_batched_tokens=16)  # prompt "b" in chunks: paged attention over chunks
    ours = Engine(LocalExecutor(path, kv_cache_memory=1 << 20), config).generate_all(prompts, params)
    ref = Engine(LocalExecutor(ref_path, kv_cache_memory=1 << 20), config).generate_all(prompts, params)
    assert ours == ref


def test_gptq_v2_format_has_no_zero_offset(tmp_path, quantized):
    path, ref_path = quantized("gptq4-g64-asym")
    v2 = tmp_path / "v2"
    v2.mkdir()
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    for name in [n for n in tensors if n.endswith("qzeros")]:  # v2: zeros stored as they are
        zeros = packing.unpack_cols(tensors[name], 4) + 1
        tensors[name] = packing.pack_cols(zeros, 4)
    save_file(tensors, v2 / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (v2 / "config.json").write_text(json.dumps(config))
    ids = torch.arange(10, 30).reshape(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(v2)(ids), from_pretrained(ref_path)(ids), atol=2e-5, rtol=1e-4)


# --- refusals ----------------------------------------------------------------------------------------

def _with_qc(tmp_path, quantized, **fields):
    path, _ = quantized("gptq4-g32")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(fields)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return Qwen2Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("fields, message", [
    (dict(quant_method="bitsandbytes"), "quant_method 'bitsandbytes' is not supported"),
    (dict(bits=3), "bits 3 is not supported"),
    (dict(lm_head=True), "lm_head"),
    (dict(dynamic={"-:.*down": {}}), "dynamic"),
    (dict(quant_method="awq", version="gemv"), "version 'gemv'"),
    (dict(group_size=100), "group_size must be -1 or a positive multiple of 8"),
])
def test_unsupported_quantization_configs_are_refused(tmp_path, quantized, fields, message):
    from qwen2_model.loading import quantization_scheme
    config = _with_qc(tmp_path, quantized, **fields)
    with pytest.raises(ConfigError, match=message):
        quantization_scheme(config, None)


def test_int8_on_an_already_quantized_checkpoint_is_refused(quantized):
    path, _ = quantized("gptq4-g32")
    with pytest.raises(ConfigError, match="already quantized"):
        from_pretrained(path, quantization="int8")
    with pytest.raises(ConfigError, match="quantization 'fp4' is not supported"):
        from_pretrained(path, quantization="fp4")


def test_wrong_packed_shape_names_the_tensor(tmp_path, quantized):
    path, _ = quantized("gptq4-g32")
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64  # scales in the file are for group 32
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor .model.layers.\d+.[a-z_.]+.(qzeros|scales). .*\[4, \d+\] \(group_size 64\)"):
        from_pretrained(bad)


def test_tp_split_off_group_boundaries_fails_naming_the_numbers():
    """Qwen2-72B's intermediate 29568 with group 128 at tp=8: 3696 rows per rank is not a multiple of
    128 (Qwen's GPTQ/AWQ releases pad it to 29696 = 232 x 128 for that reason)."""
    def config(intermediate):
        qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
        return Qwen2Config(hidden_size=8192, intermediate_size=intermediate, num_attention_heads=64,
                           num_key_value_heads=8, num_hidden_layers=1, vocab_size=1000,
                           extra={"quantization_config": qc})
    with pytest.raises(ValueError, match=r"down_proj input size 29568 over tensor_parallel_size 8 gives 3696 "
                                         r"per rank.*multiple of 128"):
        check_tp_split(config(29568), 8)
    check_tp_split(config(29696), 8)
    check_tp_split(config(29568), 1)


def test_tp_split_check_also_guards_the_loader(quantized):
    from qwen2_model.parallel import ParallelContext
    path, _ = quantized("gptq4-g128-act")  # o_proj: 128 inputs, 64 per rank at tp=2 < group 128
    with pytest.raises(ValueError, match="o_proj input size 128 over tensor_parallel_size 2 gives 64"):
        from_pretrained(path, ctx=ParallelContext(0, 2))


# --- --quantization int8 -----------------------------------------------------------------------------

def test_int8_weight_only_is_close_to_fp32(tmp_path):
    path = write_random_checkpoint(tmp_path, preset="tiny", **SHAPE)
    fp32, int8 = from_pretrained(path), from_pretrained(path, quantization="int8")
    assert kernels_of(int8) == {"Int8Kernel"} and not kernels_of(fp32)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = fp32(ids), int8(ids)
    # per-channel int8 of N(0, 0.02) weights: relative weight error ~ 1/254 of the row max
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    assert weight_bytes(int8) < weight_bytes(fp32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_packed_rows_and_dequantized_rows_agree(dtype):
    """Few rows take `_weight_int8pack_mm`, many rows the dequantized matmul (INT8_DEQUANT_ROWS): the
    same rows give the same product either way, and both equal x (q s)^T."""
    from qwen2_model.quantization.linear import INT8_DEQUANT_ROWS, Int8Weight

    g = torch.Generator().manual_seed(0)
    layer = Int8Weight((0.02 * torch.randn(96, 64, generator=g)).to(dtype))
    x = torch.randn(INT8_DEQUANT_ROWS[dtype] + 4, 64, generator=g).to(dtype)
    k = layer.kernel
    reference = x.float() @ (k.weight.float() * k.scales.float()[:, None]).t()
    many = layer(x, None)  # dequantized path
    few = torch.cat([layer(x[i:i + 2], None) for i in range(0, len(x), 2)])  # packed path, 2 rows a call
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(many.float(), reference, **tol)
    torch.testing.assert_close(few.float(), reference, **tol)
