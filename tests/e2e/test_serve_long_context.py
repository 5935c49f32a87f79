"""Serving options of issue 13 through real Serve and HTTP: `hf_overrides` (YaRN switched on at serve
time: /v1/models shows the derived context, generation runs past the original length; `is_causal:
false`: /v1/embeddings is the bidirectional forward) and start-up refusals naming the numbers.

The app is a second Serve application next to the shared one (conftest's serve_app), on its own
route prefix, deleted at the end."""

from __future__ import annotations

import httpx
import pytest
import torch
import torch.nn.functional as F

from deployments.app import build_app
from qwen2_model.loading import from_pretrained
from qwen2_model.testing import write_random_checkpoint

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
PREFIX = "/issue13"


@pytest.fixture(scope="module")
def long_app(serve_app, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("issue13")
    lm = write_random_checkpoint(root / "lm", preset="tiny", max_position_embeddings=64)
    gte = write_random_checkpoint(root / "gte", preset="tiny", head="base", max_position_embeddings=64)
    args = {"models": [
        {"name": "yarn-lm", "path": str(lm), "hf_overrides": {"rope_scaling": YARN}, "dtype": "float32"},
        {"name": "gte", "path": str(gte), "hf_overrides": {"is_causal": False}, "dtype": "float32"},
    ]}
    serve.run(build_app(args), name="issue13", route_prefix=PREFIX)
    try:
        yield serve_app.proxy_http_url + PREFIX, lm, gte  # a second app: through the proxy
    finally:
        serve.delete("issue13")


def test_models_show_the_yarn_context_and_generation_passes_the_original_length(long_app):
    url, _, _ = long_app
    models = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]}
    assert models["yarn-lm"]["max_model_len"] == 256  # original 64 x factor 4
    prompt = list(range(10, 70))  # 60 tokens; 40 more end at position 100 > 64
    r = httpx.post(f"{url}/v1/completions", json={"model": "yarn-lm", "prompt": prompt, "max_tokens": 40,
                                                    "temperature": 0, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 40
    r = httpx.post(f"{url}/v1/completions", json={"model": "yarn-lm", "prompt": prompt, "max_tokens": 200},
                   timeout=60)
    assert r.status_code == 400 and "256" in r.text  # over the derived context: OpenAI's error, naming it


def test_embeddings_of_a_bidirectional_model_over_http(long_app):
    url, _, gte = long_app
    ids = [5, 6, 7, 8, 9, 10]
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "gte", "input": [ids]}, timeout=60)
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["data"][0]["embedding"])
    with torch.no_grad():
        hidden = from_pretrained(gte, dtype="float32", hf_overrides={"is_causal": False})(torch.tensor([ids]))
        causal = from_pretrained(gte, dtype="float32")(torch.tensor([ids]))
    torch.testing.assert_close(got, F.normalize(hidden[0, -1], dim=-1), atol=1e-5, rtol=1e-4)
    assert (F.normalize(causal[0, -1], dim=-1) - got).abs().max() > 1e-3


def test_start_up_refusals_name_the_numbers(tmp_path):
    lm = write_random_checkpoint(tmp_path / "lm", preset="tiny", max_position_embeddings=64)
    with pytest.raises(ValueError, match="model 'm': max_model_len 1000 is larger than the model supports: 64"):
        build_app({"models": [{"name": "m", "path": str(lm), "engine": {"max_model_len": 1000}}]})
    # with YaRN switched on, 256 is allowed
    build_app({"models": [{"name": "m", "path": str(lm), "engine": {"max_model_len": 256},
                           "hf_overrides": {"rope_scaling": YARN}}]})
    with pytest.raises(ValueError, match="quantization 'int4' is not supported"):
        build_app({"models": [{"name": "m", "path": str(lm), "quantization": "int4"}]})
    with pytest.raises(ValueError, match="hf_overrides must be a mapping"):
        build_app({"models": [{"name": "m", "path": str(lm), "hf_overrides": "[1]"}]})
