"""Reward models (qwen2_model/reward.py) against a plain-torch reference, and served through the real
Frontend, HTTP app and gRPC servicer over an in-process Router (no Ray; tests/e2e/test_serve_rewards.py
is the real Serve path).

The reference is transformers' own Qwen2Model on the same random checkpoint plus the published
score head (Linear, ReLU, Linear) in plain torch (tests/helpers.py: HFRewardReference), since
transformers ships no class for these trust_remote_code models.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from types import SimpleNamespace

import httpx
import pytest
import torch

from deployments.checkpoints import model_facts
from deployments.errors import InvalidRequestError
from deployments.frontend.core import Frontend, ModelEntry
from deployments.grpc_api import servicer as S
from deployments.http_api import app as http_app
from deployments.router import Router
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from qwen2_model import from_pretrained
from qwen2_model.engine.executor import LocalExecutor
from qwen2_model.engine.model_runner import PooledInput
from qwen2_model.reward import DEFAULT_STEP_TAG_ID, step_tag_id
from qwen2_model.tasks import EMBED, REWARD, can_run, task_of
from qwen2_model.tokenizer import Qwen2Tokenizer
from tests.helpers import HFRewardReference
from tests.scripted_router import ScriptedRouter

pytest.importorskip("transformers")

RM, PRM = "reward_model", "process_reward_model"


def tag_of(path) -> int:
    return Qwen2Tokenizer.from_pretrained(path).token_to_id("<extra_0>")


def batch(tag: int):
    """Three right-padded rows (pad id 0): tags first, in the middle and last; one tag; none."""
    rows = [[tag, 5, 6, tag, 7, 8, 9, tag], [11, 12, tag, 13, 14], [20, 21, 22]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return rows, ids, mask


@pytest.mark.parametrize("head", [RM, PRM])
def test_logits_equal_transformers_decoder_plus_the_head(checkpoints, head):
    path = checkpoints(head)
    ref = HFRewardReference(path)
    model = from_pretrained(path)
    assert type(model).__name__ == {RM: "Qwen2ForRewardModel", PRM: "Qwen2ForProcessRewardModel"}[head]
    _, ids, mask = batch(tag_of(path) or 3)
    with torch.no_grad():
        ours = model(ids, mask)
    expected = ref.logits(ids, mask)
    assert ours.shape == expected.shape == (3, 8, 1 if head == RM else 2)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)
    assert expected[real].std(0).min() > 1e-2  # the rewards differ from token to token: a row mix-up shows


def test_reward_model_returns_a_reward_per_real_token(checkpoints):
    path = checkpoints(RM)
    rows, ids, mask = batch(7)
    expected = HFRewardReference(path).logits(ids, mask)
    pooled = from_pretrained(path).pooled(ids, mask)
    assert [len(p) for p in pooled] == [len(r) for r in rows]
    for i, p in enumerate(pooled):
        torch.testing.assert_close(torch.tensor(p), expected[i, :len(rows[i])], atol=1e-4, rtol=1e-4)


def test_process_reward_model_pools_exactly_the_step_tags(checkpoints):
    path = checkpoints(PRM)
    tag = tag_of(path)
    assert step_tag_id(from_pretrained(path).config) == tag != DEFAULT_STEP_TAG_ID  # written to config.json
    rows, ids, mask = batch(tag)
    expected = HFRewardReference(path).logits(ids, mask).softmax(-1)
    pooled = from_pretrained(path).pooled(ids, mask)
    assert [len(p) for p in pooled] == [3, 1, 0]  # one row per tag, none for the row without
    for i, row in enumerate(rows):
        at = [j for j, t in enumerate(row) if t == tag]
        if at:
            torch.testing.assert_close(torch.tensor(pooled[i]), expected[i, at], atol=1e-5, rtol=1e-4)
            assert all(abs(sum(p) - 1) < 1e-5 for p in pooled[i])


def test_step_tag_follows_config_and_overrides(checkpoints):
    path = checkpoints(PRM)
    rows, ids, mask = batch(tag_of(path))
    every = from_pretrained(path, hf_overrides={"step_tag_id": None}).pooled(ids, mask)
    assert [len(p) for p in every] == [len(r) for r in rows]  # null: every real token (vLLM's StepPool)
    other = from_pretrained(path, hf_overrides={"step_tag_id": 12}).pooled(ids, mask)
    assert [len(p) for p in other] == [0, 1, 0]
    torch.testing.assert_close(torch.tensor(other[1][0]), torch.tensor(every[1][1]))  # token 12 sits at index 1
    for bad in (-1, "x", 10 ** 9):
        with pytest.raises(ValueError, match="step_tag_id"):
            from_pretrained(path, hf_overrides={"step_tag_id": bad})


def test_task_table():
    for arch in ("Qwen2ForRewardModel", "Qwen2ForProcessRewardModel"):
        assert task_of(arch) == REWARD and can_run(arch, REWARD) and can_run(arch, EMBED)
    for arch in ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2Model"):
        assert not can_run(arch, REWARD)


def test_engine_runs_the_heads_own_pooling(checkpoints):
    path = checkpoints(PRM)
    rows, ids, mask = batch(tag_of(path))
    executor = LocalExecutor(path, kv_cache_memory=1 << 20)
    got = executor.run_pooled(PooledInput(REWARD, rows))
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(from_pretrained(path).pooled(ids, mask)[0]),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot run the pooled task 'classify'"):
        executor.run_pooled(PooledInput("classify", rows))


# ---------------------------------------------------------------------------------------------
# Served: the real Frontend over an in-process Router


class InProcessHandle:
    """What the Frontend awaits on a Serve handle (`handle.pooled.remote(...)`), on a Router object."""

    def __init__(self, router: Router):
        self.pooled = SimpleNamespace(remote=router.pooled)


@pytest.fixture(scope="module")
def served(checkpoints):
    routers, entries = [], []
    for name, head in (("rm", RM), ("prm", PRM)):
        path = checkpoints(head)
        facts = model_facts(path)
        router = Router(name, str(path), kv_cache_memory=1 << 20, torch_threads=1, pooled_batch_wait_ms=0)
        routers.append(router)
        entries.append(ModelEntry(name, path=str(path), architecture=facts.architecture, task=facts.task,
                                  tokenizer=Qwen2Tokenizer.from_pretrained(path), router=InProcessHandle(router),
                                  max_model_len=facts.max_model_len, vocab_size=facts.vocab_size,
                                  step_tag_id=facts.step_tag_id))
    lm = ModelEntry("lm", path="", architecture="Qwen2ForCausalLM", task="generate", tokenizer=entries[0].tokenizer,
                    router=ScriptedRouter([1]), max_model_len=64)
    frontend = Frontend([lm] + entries)
    yield SimpleNamespace(frontend=frontend, tag=entries[1].step_tag_id, rm=checkpoints(RM), prm=checkpoints(PRM))
    for router in routers:
        router.metrics.stop()
        router.async_engine.shutdown()


def post_all(frontend: Frontend, bodies: list[dict]) -> list[httpx.Response]:
    http_app.bind(frontend)

    async def go():
        transport = httpx.ASGITransport(app=http_app.create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as http:
            return [await http.post("/pooling", json=b) for b in bodies]

    try:
        return asyncio.run(go())
    finally:
        http_app.bind(None)


def reference_rows(path, ids: list[int], step_tag: int | None):
    logits = HFRewardReference(path).logits(torch.tensor([ids]))[0]
    if step_tag is None:
        return logits
    return logits.softmax(-1)[[j for j, t in enumerate(ids) if t == step_tag]]


def test_http_pooling_route(served):
    tag = served.tag
    text = f"step one{served.frontend.by_name['prm'].tokenizer.decode([tag])}step two<extra_0>"
    ids = [5, 6, tag, 7, tag]
    rm, prm, prm_text, prm64, chat = post_all(served.frontend, [
        {"model": "rm", "input": [ids, [9, 10]]},
        {"model": "prm", "input": ids},
        {"model": "prm", "input": text},
        {"model": "prm", "input": ids, "encoding_format": "base64"},
        {"model": "prm", "messages": [{"role": "user", "content": "1+1?"},
                                      {"role": "assistant", "content": "two<extra_0>so 2<extra_0>"}]},
    ])
    for r in (rm, prm, prm_text, prm64, chat):
        assert r.status_code == 200, r.text
    body = rm.json()
    assert body["object"] == "list" and body["id"].startswith("pool-") and body["model"] == "rm"
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "pooling"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
    torch.testing.assert_close(torch.tensor(body["data"][0]["data"]), reference_rows(served.rm, ids, None),
                               atol=1e-4, rtol=1e-4)
    steps = torch.tensor(prm.json()["data"][0]["data"])
    torch.testing.assert_close(steps, reference_rows(served.prm, ids, tag), atol=1e-5, rtol=1e-4)
    assert len(prm_text.json()["data"][0]["data"]) == 2  # `<extra_0>` in text is the tag token
    raw = base64.b64decode(prm64.json()["data"][0]["data"])
    assert torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw)).view(-1, 2).tolist() == steps.tolist()
    assert len(chat.json()["data"][0]["data"]) == 2  # the template renders the turns; two steps scored


@pytest.mark.parametrize("body, status, words", [
    ({"model": "lm", "input": "hi"}, 400, "generate model and cannot do 'reward'"),
    ({"model": "prm", "input": [5, 6, 7]}, 400, "no step tag"),
    ({"model": "prm", "input": [[5, 6, 7], [1]]}, 400, "input.0"),
    ({"model": "prm", "input": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "Exactly one"),
    ({"model": "prm"}, 400, "Exactly one"),
    ({"model": "rm", "input": [10 ** 6]}, 400, "outside the vocabulary"),
    ({"model": "nope", "input": "x"}, 404, "nope"),
])
def test_http_pooling_errors(served, body, status, words):
    [r] = post_all(served.frontend, [body])
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


class Ctx:
    def __init__(self):
        self.code = self.details = None

    def invocation_metadata(self):
        return []

    def set_code(self, c):
        self.code = c

    def set_details(self, d):
        self.details = d

    def set_trailing_metadata(self, t):
        pass


class Ingress(S.GrpcIngressMixin):
    def __init__(self, frontend):
        self.frontend = frontend


def test_grpc_reward_rpc(served):
    import grpc

    ingress, tag = Ingress(served.frontend), served.tag
    ids = [5, 6, tag, 7, tag]

    async def calls():
        ok, errors = [], []
        for req in (pb.RewardRequest(model="prm", input_token_ids=[pb.TokenIds(ids=ids)]),
                    pb.RewardRequest(model="rm", input=["ab", "c"]),
                    pb.RewardRequest(model="prm", messages=[pb.ChatMessage(role="assistant", content="a<extra_0>")])):
            ctx = Ctx()
            ok.append((await ingress.Reward(req.SerializeToString(), ctx), ctx.code))
        for req in (pb.RewardRequest(model="lm", input=["hi"]), pb.RewardRequest(model="prm", input=["no tag"]),
                    pb.RewardRequest(model="prm"), pb.RewardRequest(model="prm", input=["a"], messages=[
                        pb.ChatMessage(role="user", content="a")])):
            ctx = Ctx()
            await ingress.Reward(req.SerializeToString(), ctx)
            errors.append((ctx.code, ctx.details))
        return ok, errors

    ok, errors = asyncio.run(calls())
    assert all(code is None for _, code in ok)
    prm, rm, chat = (resp for resp, _ in ok)
    steps = torch.tensor([list(r.values) for r in prm.data[0].rows])
    torch.testing.assert_close(steps, reference_rows(served.prm, ids, tag), atol=1e-5, rtol=1e-4)
    assert prm.model == "prm" and prm.usage.prompt_tokens == len(ids)
    tok = served.frontend.by_name["rm"].tokenizer
    assert [len(d.rows) for d in rm.data] == [len(tok.encode("ab")), len(tok.encode("c"))]
    assert all(len(r.values) == 1 for r in rm.data[0].rows)
    assert len(chat.data[0].rows) == 1
    assert [code for code, _ in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 4
    assert "cannot do 'reward'" in errors[0][1] and "no step tag" in errors[1][1]
    assert "Exactly one" in errors[2][1] and "Exactly one" in errors[3][1]


def test_frontend_checks_the_tag_before_the_router_is_called(served):
    entry = served.frontend.by_name["prm"]
    with pytest.raises(InvalidRequestError, match=r"'input.1'.*step tag"):
        asyncio.run(served.frontend.reward(entry, [[served.tag], [1, 2]]))
