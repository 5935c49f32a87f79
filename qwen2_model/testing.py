"""Writers of random-weight Qwen2 checkpoints in the Hugging Face layout, for tests, benchmarks and the demo.

`write_random_checkpoint(out_dir, preset="tiny", head="causal_lm")` writes config.json,
model.safetensors (or shards + index) and tokenizer files, without transformers: the demo runs it
on a fresh install. Presets: `tiny` (fast tests) and `qwen2-0.5b` (the published Qwen2-0.5B shape).
The tokenizer is the real Qwen vocabulary when `tokenizer_dir` is given, else a small byte-level
BPE trained on the spot (qwen2_model/tokenizer_training.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import Qwen2Config

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
                 tie_word_embeddings=False, rms_norm_eps=1e-6),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072,
                       rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       sliding_window=131072, max_window_layers=24),
}
HEADS = {
    "base": "Qwen2Model",
    "causal_lm": "Qwen2ForCausalLM",
    "sequence_classification": "Qwen2ForSequenceClassification",
    "token_classification": "Qwen2ForTokenClassification",
    "question_answering": "Qwen2ForQuestionAnswering",
    "reward_model": "Qwen2ForRewardModel",
    "process_reward_model": "Qwen2ForProcessRewardModel",
}
REWARD_LABELS = {"reward_model": 1, "process_reward_model": 2}  # fixed by the class (qwen2_model/reward.py)
STEP_TAG = "<extra_0>"  # the process reward model's step separator (Qwen2.5-Math-PRM's token 151651)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def tensor_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint for config.architectures[0], named as transformers names it."""
    arch = config.architecture
    E, D = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    prefix = {"Qwen2Model": "", "Qwen2ForQuestionAnswering": "transformer."}.get(arch, "model.")
    shapes = {f"{prefix}embed_tokens.weight": (config.vocab_size, E), f"{prefix}norm.weight": (E,)}
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}layers.{i}."
        shapes.update({
            layer + "input_layernorm.weight": (E,), layer + "post_attention_layernorm.weight": (E,),
            layer + "self_attn.q_proj.weight": (q, E), layer + "self_attn.q_proj.bias": (q,),
            layer + "self_attn.k_proj.weight": (kv, E), layer + "self_attn.k_proj.bias": (kv,),
            layer + "self_attn.v_proj.weight": (kv, E), layer + "self_attn.v_proj.bias": (kv,),
            layer + "self_attn.o_proj.weight": (E, q),
            layer + "mlp.gate_proj.weight": (config.intermediate_size, E),
            layer + "mlp.up_proj.weight": (config.intermediate_size, E),
            layer + "mlp.down_proj.weight": (E, config.intermediate_size),
        })
    if arch == "Qwen2ForCausalLM" and not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, E)
    elif arch == "Qwen2ForSequenceClassification":
        shapes["score.weight"] = (config.num_labels, E)
    elif arch == "Qwen2ForTokenClassification":
        shapes.update({"score.weight": (config.num_labels, E), "score.bias": (config.num_labels,)})
    elif arch == "Qwen2ForQuestionAnswering":
        shapes.update({"qa_outputs.weight": (2, E), "qa_outputs.bias": (2,)})
    elif arch in ("Qwen2ForRewardModel", "Qwen2ForProcessRewardModel"):  # score = Linear, ReLU, Linear
        labels = 1 if arch == "Qwen2ForRewardModel" else 2
        shapes.update({"score.0.weight": (E, E), "score.0.bias": (E,),
                       "score.2.weight": (labels, E), "score.2.bias": (labels,)})
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):  # near 1, but not exactly, so a skipped norm weight shows
        return (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
    return (0.02 * torch.randn(shape, generator=generator) if not name.endswith("bias")
            else 0.1 * torch.randn(shape, generator=generator)).to(dtype)


def write_tokenizer(out_dir: Path, tokenizer_dir: str | Path | None) -> dict[str, int]:
    """Copies (or trains) tokenizer files; returns the special token ids."""
    from tokenizers import Tokenizer

    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    else:
        from .tokenizer_training import train_byte_level_bpe
        train_byte_level_bpe(out_dir)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    return {"size": tok.get_vocab_size(with_added_tokens=True), "endoftext": tok.token_to_id("<|endoftext|>"),
            "im_end": tok.token_to_id("<|im_end|>")}


def add_step_tag(out_dir: Path) -> int:
    """The id of the step tag `<extra_0>` in out_dir's tokenizer.json, added as a special token at the
    end of the vocabulary when missing (Qwen2.5-Math-PRM's vocabulary has it; Qwen2's does not)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    if tok.token_to_id(STEP_TAG) is None:
        tok.add_special_tokens([AddedToken(STEP_TAG, special=True, normalized=False)])
        tok.save(str(out_dir / "tokenizer.json"))
    return tok.token_to_id(STEP_TAG)


def write_random_checkpoint(out_dir: str | Path, preset: str = "tiny", head: str = "causal_lm",
                            dtype: str = "float32", seed: int = 0, tokenizer_dir: str | Path | None = None,
                            num_shards: int = 1, num_labels: int = 3, **overrides) -> Path:
    """Write a random-weight checkpoint in the Hugging Face layout; returns the directory.

    Reward heads: num_labels is the class's (1 or 2); a process reward model's tokenizer gets the
    step tag `<extra_0>` and config.json its `step_tag_id` when that is not the default 151651."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = write_tokenizer(out, tokenizer_dir)
    if head in REWARD_LABELS:
        num_labels = REWARD_LABELS[head]
    if head == "process_reward_model":
        from .reward import DEFAULT_STEP_TAG_ID
        tag = add_step_tag(out)
        special["size"] = max(special["size"], tag + 1)
        if tag != DEFAULT_STEP_TAG_ID:
            overrides.setdefault("step_tag_id", tag)
    fields = dict(PRESETS[preset])
    fields.setdefault("vocab_size", max(1024, special["size"]))
    fields.update(overrides)
    known = {f.name for f in dataclasses.fields(Qwen2Config)}
    extra = {k: fields.pop(k) for k in list(fields) if k not in known}  # e.g. step_tag_id
    if fields["vocab_size"] < special["size"]:
        raise ValueError(f"vocab_size {fields['vocab_size']} is smaller than the tokenizer's {special['size']} tokens")
    labels = {i: label for i, label in enumerate(["O", "B-ENT", "I-ENT", "NEG", "POS"][:num_labels])} \
        if head == "token_classification" else {i: f"LABEL_{i}" for i in range(num_labels)}
    config = Qwen2Config(architectures=[HEADS[head]], torch_dtype=dtype, eos_token_id=special["endoftext"],
                         bos_token_id=special["endoftext"], pad_token_id=special["endoftext"] if head != "causal_lm" else None,
                         id2label=labels, num_labels=len(labels), extra=extra, **fields)
    config.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": special["endoftext"]}) + "\n")

    generator = torch.Generator().manual_seed(seed)
    torch_dtype = config.dtype
    shapes = tensor_shapes(config)
    names = list(shapes)
    shards = [names[i::num_shards] for i in range(num_shards)]  # interleaved, so layers span files
    for old in out.glob("*.safetensors"):
        old.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if num_shards == 1 else f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], generator, torch_dtype) for name in shard}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        del tensors
    if num_shards > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def write_random_lora(out_dir: str | Path, base_dir: str | Path, r: int = 8, lora_alpha: float = 16,
                      target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"),
                      use_rslora: bool = False, seed: int = 0, scale: float = 0.05) -> Path:
    """A random LoRA adapter for the checkpoint at `base_dir`, in PEFT's layout (adapter_config.json +
    adapter_model.safetensors), without peft: for benchmarks and the demo. B is nonzero (unlike
    PEFT's initialisation) so the adapter changes the output."""
    from .lora import CONFIG_FILE, WEIGHTS_FILE, full_shapes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config.from_pretrained(base_dir)
    shapes = full_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(config.num_hidden_layers):
        for module in target_modules:
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{module}"
            out_f, in_f = shapes[module]
            tensors[f"{key}.lora_A.weight"] = (scale * torch.randn(r, in_f, generator=generator)).to(config.dtype)
            tensors[f"{key}.lora_B.weight"] = (scale * torch.randn(out_f, r, generator=generator)).to(config.dtype)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir), "r": r,
        "lora_alpha": lora_alpha, "use_rslora": use_rslora, "target_modules": list(target_modules),
        "bias": "none", "lora_dropout": 0.0, "rank_pattern": {}, "alpha_pattern": {}}, indent=2) + "\n")
    return out


# --- quantized checkpoints (GPTQ / AWQ) -----------------------------------------------------------

QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Projections that read the same input share GPTQ's act-order permutation (it comes from that input).
_SAME_INPUT = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
               "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up", "self_attn.o_proj": "o", "mlp.down_proj": "down"}


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor):
    """Round-to-nearest quantization of W [out, in] per (group, output channel), GPTQ's grid.

    Returns q [in, out] int, zeros [groups, out] int, scales [groups, out] float16. Symmetric: zero
    (2^bits)/2 and scale 2 max|w| / maxq, as GPTQ's Quantizer; asymmetric: min/max range."""
    maxq = 2 ** bits - 1
    wt = w.float().t()  # [in, out]
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, w.shape[0])
    zeros = torch.empty(groups, w.shape[0], dtype=torch.int64)
    for g in range(groups):
        rows = wt[g_idx == g]  # [group, out]
        lo, hi = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        if sym:
            scale = (torch.maximum(hi.abs(), lo.abs()) * 2 / maxq).clamp(min=1e-8)
            zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
        else:
            scale = ((hi - lo) / maxq).clamp(min=1e-8)
            zero = torch.round(-lo / scale).to(torch.int64).clamp(0, maxq)
        scales[g], zeros[g] = scale, zero
    scales = scales.half()  # what the checkpoint stores; the grid below uses the stored value
    s, z = scales.float()[g_idx], zeros[g_idx]
    q = torch.clamp(torch.round(wt / s) + z, 0, maxq).to(torch.int64)
    return q, zeros, scales


def write_quantized_checkpoint(out_dir: str | Path, method: str = "gptq", bits: int = 4, group_size: int = 32,
                               desc_act: bool = False, sym: bool = True, reference_dir: str | Path | None = None,
                               seed: int = 0, **kwargs) -> Path:
    """A random checkpoint whose decoder linears are GPTQ (v1 format) or AWQ (gemm) quantized, written
    in the published layout (qwen2_model/quantization/packing.py) with config.json's quantization_config.

    Weights are round-to-nearest on GPTQ's grid (not GPTQ's error-compensating solver: the layout,
    not the quality, is under test); with `desc_act` each input gets a random act-order permutation
    (`g_idx`). `reference_dir`: also write the float checkpoint with the dequantized weights, the model
    the quantized one must match. Other kwargs go to write_random_checkpoint (preset, head, ...)."""
    from safetensors import safe_open

    from .quantization import packing

    if method not in ("gptq", "awq"):
        raise ValueError(f"method must be 'gptq' or 'awq', got {method!r}")
    if method == "awq" and (bits != 4 or desc_act or sym):
        raise ValueError("AWQ gemm checkpoints are 4-bit, zero-point (sym=False), without act-order")
    out = write_random_checkpoint(out_dir, seed=seed, dtype=kwargs.pop("dtype", "float16"), **kwargs)
    files = sorted(out.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError("write_quantized_checkpoint writes single-file checkpoints (num_shards=1)")
    with safe_open(str(files[0]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    generator = torch.Generator().manual_seed(seed + 1)
    reference = dict(tensors)
    perms: dict[tuple[str, str], torch.Tensor] = {}
    for name in list(tensors):
        module = next((m for m in QUANTIZED_LINEARS if name.endswith(f"{m}.weight")), None)
        if module is None:
            continue
        w = tensors.pop(name)  # [out, in]
        prefix = name[: -len(".weight")]
        n_in = w.shape[1]
        group = group_size if group_size != -1 else n_in
        if desc_act:
            key = (prefix.rsplit(".", 2)[0], _SAME_INPUT[module])
            if key not in perms:
                perms[key] = torch.randperm(n_in, generator=generator)
            # act-order: rows quantized in permuted order, groups consecutive in that order
            g_idx = torch.empty(n_in, dtype=torch.int64)
            g_idx[perms[key]] = torch.arange(n_in) // group
        else:
            g_idx = torch.arange(n_in) // group
        q, zeros, scales = quantize_rtn(w, bits, group_size, sym, g_idx)
        if method == "gptq":
            qweight, qzeros = packing.gptq_pack(q, zeros, bits)
            tensors[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        else:
            qweight, qzeros = packing.awq_pack(q, zeros, bits)
        tensors.update({f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales})
        reference[name] = packing.dequantize(q, zeros, scales, g_idx).to(w.dtype)
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
              "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq"}
    else:
        qc = {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if reference_dir is not None:
        ref = Path(reference_dir)
        ref.mkdir(parents=True, exist_ok=True)
        for item in out.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy(item, ref / item.name)
        del config["quantization_config"]
        (ref / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(reference, str(ref / files[0].name), metadata={"format": "pt"})
    return out
