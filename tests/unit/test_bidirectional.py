"""Bidirectional embedding models (gte-Qwen2: a Qwen2Model trained with non-causal attention,
`is_causal: false` in config.json or via hf_overrides): the engine's embeddings equal transformers'
Qwen2Model run with a bidirectional mask we build ourselves, with the same pooling (last token, as
gte-Qwen2-instruct's sentence-transformers config says, or mean)."""

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from qwen2_model.engine.engine import Engine  # noqa: E402
from qwen2_model.engine.executor import LocalExecutor  # noqa: E402
from qwen2_model.engine.model_runner import PooledInput  # noqa: E402
from qwen2_model.loading import CheckpointError, from_pretrained  # noqa: E402

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, bos_token_id=1)
INPUTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], list(range(100, 130))]


@pytest.fixture(scope="module")
def gte(tmp_path_factory):
    """A Qwen2Model checkpoint with `is_causal: false` (what gte-Qwen2 style configs declare)."""
    path = tmp_path_factory.mktemp("gte")
    torch.manual_seed(0)
    model = transformers.Qwen2Model(transformers.Qwen2Config(**BASE)).eval()
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["is_causal"] = False
    (path / "config.json").write_text(json.dumps(config))
    return path, model


def reference(model, inputs, pooling: str, causal: bool) -> torch.Tensor:
    """transformers' Qwen2Model, one sequence at a time, with an explicit [1, 1, S, S] mask."""
    out = []
    for ids in inputs:
        S = len(ids)
        mask = torch.ones(1, 1, S, S, dtype=torch.bool)
        if causal:
            mask = mask.tril()
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), attention_mask=mask).last_hidden_state[0]  # [S, E]
        out.append(hidden[-1] if pooling == "last" else hidden.mean(0))
    return F.normalize(torch.stack(out), dim=-1)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_equal_transformers_bidirectional_forward(gte, pooling):
    path, model = gte
    engine = Engine(LocalExecutor(path, dtype="float32"))
    # one padded batch: the short inputs are right-padded, padding keys must stay hidden both ways
    ours = torch.tensor(engine.run_pooled(PooledInput("embed", INPUTS, pooling, normalize=True)))
    expected = reference(model, INPUTS, pooling, causal=False)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    # the causal forward gives other vectors: the test tells the two apart
    assert (reference(model, INPUTS, pooling, causal=True) - expected).abs().max() > 1e-3


def test_is_causal_override_switches_attention(gte):
    path, model = gte
    causal = from_pretrained(path, dtype="float32", hf_overrides={"is_causal": True})
    bidirectional = from_pretrained(path, dtype="float32")
    ids = torch.tensor([INPUTS[0]])
    with torch.no_grad():
        a, b = causal(ids), bidirectional(ids)
    assert (a - b).abs().max() > 1e-3
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones(1, 1, 7, 7, dtype=torch.bool).tril()).last_hidden_state
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-4)


def test_a_bidirectional_causal_lm_is_refused(gte):
    path, _ = gte
    with pytest.raises(CheckpointError, match="is_causal: false .* serve it as an embedding model"):
        from_pretrained(path, architecture="Qwen2ForCausalLM")
