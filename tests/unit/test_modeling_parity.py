"""Our Qwen2 classes against transformers' own, on checkpoints written by transformers' save_pretrained."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen2_model import from_pretrained  # noqa: E402
from qwen2_model.generation import greedy_generate  # noqa: E402
from qwen2_model.modeling import QAOutput  # noqa: E402

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1)
CONFIGS = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "sliding": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "tied": dict(tie_word_embeddings=True),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # 14-token batch past 8 trained positions, so the dynamic NTK base actually changes
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
}
HEADS = {
    "base": "Qwen2Model",
    "causal_lm": "Qwen2ForCausalLM",
    "seq_cls": "Qwen2ForSequenceClassification",
    "tok_cls": "Qwen2ForTokenClassification",
    "qa": "Qwen2ForQuestionAnswering",
}


def save_hf(tmp_path, head: str, dtype=torch.float32, max_shard_size=None, **overrides):
    cfg = transformers.Qwen2Config(**{**BASE, **overrides}, num_labels=3)
    torch.manual_seed(0)
    model = getattr(transformers, HEADS[head])(cfg).to(dtype).eval()
    with torch.no_grad():  # norms are ones at init; perturb them so a skipped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_path, **kwargs)
    return model


def padded_batch():
    """Two left-padded and one right-padded sequence (pad id 0), and the real-token mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 300, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # left padding
    ids[2, 10:], mask[2, 10:] = 0, 0  # right padding
    return ids, mask


def outputs(model, ids, mask, ours: bool):
    with torch.no_grad():
        out = model(ids, mask) if ours else model(input_ids=ids, attention_mask=mask)
    if isinstance(out, QAOutput):
        return torch.stack([out.start_logits, out.end_logits])
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def compare(ours, ref, mask, head, atol):
    if head == "seq_cls":
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
        return
    real = mask.bool()
    if head == "qa":  # [2, B, S]
        torch.testing.assert_close(ours[:, real], ref[:, real], atol=atol, rtol=0)
    else:  # compare only real (non-padding) positions: padding rows are never read
        torch.testing.assert_close(ours[real], ref[real], atol=atol, rtol=0)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_fp32_logits_match_transformers(tmp_path, head, config_name):
    ref = save_hf(tmp_path, head, **CONFIGS[config_name])
    ours = from_pretrained(tmp_path, dtype="float32")
    assert type(ours).__name__ == HEADS[head]
    ids, mask = padded_batch()
    a, b = outputs(ours, ids, mask, True), outputs(ref, ids, mask, False)
    assert a.shape == b.shape
    compare(a, b, mask, head, atol=1e-4)


@pytest.mark.parametrize("head", ["causal_lm", "seq_cls", "tok_cls", "qa"])
def test_bf16_logits_within_bf16_tolerance(tmp_path, head):
    ref = save_hf(tmp_path, head, dtype=torch.bfloat16)
    ours = from_pretrained(tmp_path)  # dtype from config.json
    assert ours.model.dtype == torch.bfloat16
    ids, mask = padded_batch()
    a, b = outputs(ours, ids, mask, True).float(), outputs(ref, ids, mask, False).float()
    compare(a, b, mask, head, atol=3e-2)


def test_sharded_checkpoint_loads_identically(tmp_path):
    ref = save_hf(tmp_path, "causal_lm", max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = from_pretrained(tmp_path, dtype="float32")
    ids, mask = padded_batch()
    compare(outputs(ours, ids, mask, True), outputs(ref, ids, mask, False), mask, "causal_lm", 1e-4)


@pytest.mark.parametrize("config_name", ["gqa", "sliding", "tied"])
def test_greedy_generation_matches_transformers_generate(tmp_path, config_name):
    ref = save_hf(tmp_path, "causal_lm", **CONFIGS[config_name])
    ours = from_pretrained(tmp_path, dtype="float32")
    prompt = [5, 17, 42, 99, 3, 250, 8]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=0, min_new_tokens=32)[0, len(prompt):].tolist()
    assert len(expected) == 32
    assert greedy_generate(ours, prompt, 32) == expected


@pytest.mark.slow
def test_qwen2_0_5b_shape_matches_transformers(tmp_path):
    """The published Qwen2-0.5B shape (14 heads, 2 KV heads, tied, rope_theta 1e6), bf16, random weights."""
    from qwen2_model.testing import write_random_checkpoint

    write_random_checkpoint(tmp_path, preset="qwen2-0.5b", dtype="bfloat16", num_hidden_layers=4)
    ours = from_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 150000, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    a, b = outputs(ours, ids, mask, True).float(), outputs(ref, ids, mask, False).float()
    assert a.shape == (2, 24, 151936)
    compare(a, b, mask, "causal_lm", atol=3e-2)
    prompt = ids[0, :8].tolist()
    with torch.no_grad():
        expected = ref.generate(ids[:1, :8], max_new_tokens=16, do_sample=False, eos_token_id=None,
                                min_new_tokens=16)[0, 8:].tolist()
    assert greedy_generate(ours, prompt, 16) == expected


def test_attention_backend_choice(tmp_path, caplog):
    import logging

    from qwen2_model.layers import pick_backend

    save_hf(tmp_path, "causal_lm")
    with caplog.at_level(logging.INFO, logger="qwen2_model.layers"):
        model = from_pretrained(tmp_path)  # auto: SDPA without CUDA + flash-attn
    assert model.model.attn_backend == "sdpa"
    assert "attention backend: sdpa" in caplog.text
    with pytest.raises(ValueError, match="flash-attn"):
        pick_backend("flash", "cpu")
    with pytest.raises(ValueError, match="attn_backend"):
        pick_backend("eager", "cpu")
