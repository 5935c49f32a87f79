"""Reward models served through real Serve, HTTP and gRPC: a second Serve application next to the
shared one (conftest's serve_app), with a reward model and a process reward model, deleted at the end.

HTTP POST /pooling and the gRPC Reward RPC give the plain-torch reference's rewards (transformers'
Qwen2Model + the score head, tests/helpers.py) and, for the process reward model, one probability
pair per step tag; a causal LM asked for rewards is 400 / INVALID_ARGUMENT naming its task; fuzzed
/pooling bodies never get a 5xx."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest
import torch

from deployments.client import Qwen2ServeClient
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc
from qwen2_model.tokenizer import Qwen2Tokenizer
from tests.helpers import HFRewardReference, write_checkpoint

APP = "rewards"


@pytest.fixture(scope="module")
def reward_app(serve_app, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("rewards")
    rm = write_checkpoint(root / "rm", head="reward_model")
    prm = write_checkpoint(root / "prm", head="process_reward_model")
    lm = serve_app.checkpoints[serve_app.generate_model]
    models = [("rm", rm), ("prm", prm), ("lm", lm)]
    args = {"request_timeout_s": 120, "models": [
        {"name": name, "path": str(path), "kv_cache_memory": 1 << 20, "torch_threads": 1, "pooled_batch_wait_ms": 0}
        for name, path in models]}
    started = time.monotonic()
    url = serve_app.run_app(APP, args)
    print(f"reward app ready in {time.monotonic() - started:.1f} s")
    tag = Qwen2Tokenizer.from_pretrained(prm).token_to_id("<extra_0>")
    try:
        yield {"url": url, "rm": rm, "prm": prm, "tag": tag, "grpc": serve_app.proxy_grpc_target}
    finally:
        serve.delete(APP)


def test_http_pooling_serves_both_reward_models(reward_app):
    url, tag = reward_app["url"], reward_app["tag"]
    ids = [5, 6, tag, 7, 8, tag]
    rm = httpx.post(f"{url}/pooling", json={"model": "rm", "input": ids}, timeout=60)
    prm = httpx.post(f"{url}/pooling", json={"model": "prm", "input": ids}, timeout=60)
    assert rm.status_code == 200 and prm.status_code == 200, (rm.text, prm.text)
    logits_rm = HFRewardReference(reward_app["rm"]).logits(torch.tensor([ids]))[0]  # [6, 1]
    logits_prm = HFRewardReference(reward_app["prm"]).logits(torch.tensor([ids]))[0]  # [6, 2]
    torch.testing.assert_close(torch.tensor(rm.json()["data"][0]["data"]), logits_rm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(prm.json()["data"][0]["data"]), logits_prm[[2, 5]].softmax(-1),
                               atol=1e-5, rtol=1e-4)
    r = httpx.post(f"{url}/pooling", json={"model": "lm", "input": "hi"}, timeout=60)
    assert r.status_code == 400 and "cannot do 'reward'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "model"
    r = httpx.post(f"{url}/pooling", json={"model": "prm", "input": [5, 6]}, timeout=60)
    assert r.status_code == 400 and "no step tag" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["task"] == "reward"


def test_grpc_reward_rpc(reward_app):
    tag = reward_app["tag"]
    ids = [9, tag, 10, 11, tag]
    expected = HFRewardReference(reward_app["prm"]).logits(torch.tensor([ids]))[0][[1, 4]].softmax(-1)
    md = (("application", APP),)
    with grpc.insecure_channel(reward_app["grpc"]) as channel:
        stub = pb_grpc.Qwen2ServeStub(channel)
        resp = stub.Reward(pb.RewardRequest(model="prm", input_token_ids=[pb.TokenIds(ids=ids)]), metadata=md,
                           timeout=60)
        got = torch.tensor([list(row.values) for row in resp.data[0].rows])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        with pytest.raises(grpc.RpcError) as err:
            stub.Reward(pb.RewardRequest(model="lm", input=["hi"]), metadata=md, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot do 'reward'" in err.value.details()
    with Qwen2ServeClient(reward_app["grpc"], application=APP, timeout=60) as client:  # the typed client
        rows = client.reward([ids], model="prm").data[0].rows
        torch.testing.assert_close(torch.tensor([list(r.values) for r in rows]), expected, atol=1e-5, rtol=1e-4)
        chat = client.reward(model="prm", messages=[{"role": "user", "content": "1+1?"},
                                                    {"role": "assistant", "content": "2<extra_0>"}])
        assert len(chat.data[0].rows) == 1


def test_pooling_fuzz_never_5xx(reward_app):
    """Random bodies, and valid ones with one or two fields given random values (hypothesis, fixed
    seed), on /pooling: every answer is 200 or a 4xx
    with OpenAI's error body, and the app still serves afterwards."""
    from hypothesis import given
    from hypothesis import strategies as st

    from tests.e2e.test_fuzz import check_http, fuzz_settings, json_values, post, print_outcomes, texts

    url, tag = reward_app["url"], reward_app["tag"]
    ids = st.lists(st.one_of(st.integers(-2, 600), st.just(tag), st.integers(2**31, 2**70)), max_size=6)
    message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), texts),
                                     "content": st.one_of(texts, st.just("a<extra_0>"), json_values)})
    fields = {"model": st.one_of(st.sampled_from(["rm", "prm", "lm"]), st.none(), texts),
              "input": st.one_of(texts, st.lists(texts, max_size=3), ids, st.lists(ids, max_size=3), json_values),
              "messages": st.one_of(st.lists(message, max_size=3), json_values),
              "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), json_values),
              "add_generation_prompt": json_values, "chat_template_kwargs": json_values}
    valid = st.sampled_from([{"model": "rm", "input": "ab"}, {"model": "prm", "input": [5, tag, 6, tag]},
                             {"model": "prm", "messages": [{"role": "assistant", "content": "a<extra_0>"}]}])
    changes = st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: fields[n] for n in names}))
    near = st.tuples(valid, changes).map(lambda vc: {**vc[0], **vc[1]})
    bodies = st.one_of(near, near, json_values)  # two thirds near-valid, so some are served
    with httpx.Client(base_url=url, timeout=60) as http:
        @fuzz_settings(80)  # as test_fuzz.py's near-valid HTTP bodies in CI (4 x CI_EXAMPLES)
        @given(body=bodies)
        def fuzz(body):
            check_http(post(http, "/pooling", body))

        fuzz()
        print_outcomes("http")  # status counts, e.g. "http /pooling 200 n"
        r = http.post("/pooling", json={"model": "prm", "input": [5, tag]})
        assert r.status_code == 200 and len(r.json()["data"][0]["data"]) == 1
