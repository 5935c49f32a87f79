"""HTTP ingress end to end: the real app on local Ray Serve, the `openai` client and raw httpx."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch

from deployments.admission import HOLD_S as PROXY_QUEUE_FULL_HOLD_S
from deployments.frontend.core import QUEUE_FULL_HOLD_S

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=f"{serve_app.http_url}/v1", api_key=serve_app.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.http_url, headers=serve_app.headers, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(serve_app):
    """An Engine on the same checkpoint in this process, and its tokenizer: the ground truth."""
    from qwen2_model.engine.engine import Engine, EngineConfig
    from qwen2_model.engine.executor import LocalExecutor
    from qwen2_model.engine.sampling import SamplingParams
    from qwen2_model.tokenizer import Qwen2Tokenizer

    path = serve_app.checkpoints[serve_app.generate_model]
    tok = Qwen2Tokenizer.from_pretrained(path)
    engine = Engine(LocalExecutor(path, kv_cache_memory=8 << 20), EngineConfig(max_model_len=serve_app.max_model_len))

    def greedy(prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        out = engine.generate_all({"r": prompt_ids}, SamplingParams(temperature=0.0, max_tokens=max_tokens))["r"][0]
        return out, tok.decode(out, skip_special_tokens=True)

    return tok, greedy


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


# --- health, models, tokenization ----------------------------------------------------------------


def test_health_and_ready_need_no_key(serve_app):
    assert httpx.get(f"{serve_app.http_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{serve_app.http_url}/ready", timeout=30)
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert set(body["models"]) == set(serve_app.model_names)
    assert body["models"][serve_app.generate_model]["architecture"] == "Qwen2ForCausalLM"


def test_models(client, serve_app):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == set(serve_app.model_names)
    assert models[serve_app.generate_model].owned_by == "qwen2-serve"
    raw = httpx.get(f"{serve_app.http_url}/v1/models", headers=serve_app.headers).json()["data"]
    tasks = {m["id"]: m["task"] for m in raw}
    assert tasks == {serve_app.generate_model: "generate", serve_app.classify_model: "classify",
                     serve_app.ner_model: "classify_tokens", serve_app.qa_model: "answer"}
    assert all(m["max_model_len"] == serve_app.max_model_len for m in raw)
    # the compute dtype each Router chose for this hardware (qwen2_model/hardware.py), and why
    from qwen2_model.config import Qwen2Config
    from qwen2_model.hardware import choose_dtype
    for m in raw:
        expected = choose_dtype(Qwen2Config.from_pretrained(serve_app.checkpoints[m["id"]]).dtype, None)
        assert m["compute_dtype"] == {"dtype": expected.name, "reason": expected.reason}, m
    one = client.models.retrieve(serve_app.qa_model)
    assert one.id == serve_app.qa_model and one.model_dump()["task"] == "answer"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["param"] == "model" and serve_app.generate_model in e.value.body["message"]


def test_tokenize_detokenize(http, serve_app, reference):
    tok, _ = reference
    r = http.post("/tokenize", json={"model": serve_app.generate_model, "prompt": PROMPT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(PROMPT)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == serve_app.max_model_len
    r = http.post("/detokenize", json={"model": serve_app.generate_model, "tokens": body["tokens"]})
    assert r.json() == {"prompt": PROMPT}
    r = http.post("/detokenize", json={"model": serve_app.generate_model, "tokens": [10 ** 7]})
    assert r.status_code == 400 and error_of(r)["param"] == "tokens"


# --- generation ------------------------------------------------------------------------------------


def test_completion_greedy_equals_engine(client, serve_app, reference):
    tok, greedy = reference
    ids, text = greedy(tok.encode(PROMPT), 12)
    resp = client.completions.create(model=serve_app.generate_model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert resp.choices[0].text == text
    assert resp.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert resp.usage.completion_tokens == len(ids)
    assert resp.choices[0].finish_reason in ("length", "stop")


def test_completion_token_prompt_n_and_logprobs(client, serve_app, reference):
    tok, greedy = reference
    ids = tok.encode(PROMPT)
    resp = client.completions.create(model=serve_app.generate_model, prompt=ids, max_tokens=5, temperature=0,
                                     n=2, logprobs=3)
    assert len(resp.choices) == 2
    assert resp.choices[0].text == resp.choices[1].text == greedy(ids, 5)[1]
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    # top-3 per token (the chosen token may add one); distinct tokens can decode to the same text
    # (partial UTF-8), which the OpenAI dict shape merges, so at least one entry each
    assert all(1 <= len(t) <= 3 + 1 for t in lp.top_logprobs)
    # Several prompts in one request: choices ordered prompt-major.
    resp = client.completions.create(model=serve_app.generate_model, prompt=["a b c", "d e f"], max_tokens=3,
                                     temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]


def test_completion_stream_with_usage(client, serve_app, reference):
    tok, greedy = reference
    out_ids, text = greedy(tok.encode(PROMPT), 10)
    stream = client.completions.create(model=serve_app.generate_model, prompt=PROMPT, max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(pieces) == text
    assert finish in ("length", "stop")
    assert finish == ("length" if len(out_ids) == 10 else "stop")
    assert usage is not None and usage.completion_tokens == len(out_ids)
    assert usage.prompt_tokens == len(tok.encode(PROMPT))


def test_chat_and_chat_stream(client, serve_app, reference):
    tok, greedy = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    _, text = greedy(tok.encode(prompt), 8)
    resp = client.chat.completions.create(model=serve_app.generate_model, messages=messages, max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text
    assert resp.usage.prompt_tokens == len(tok.encode(prompt))
    assert len(resp.choices[0].logprobs.content) == resp.usage.completion_tokens
    stream = client.chat.completions.create(model=serve_app.generate_model, messages=messages, max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, roles, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            pieces.append(c.delta.content or "")
    assert "".join(pieces) == text
    assert roles[0] == "assistant"
    assert usage.prompt_tokens == len(tok.encode(prompt))


def test_chat_with_tools_renders_them_and_refuses_what_it_cannot_promise(client, serve_app, reference):
    """The model's own template gets `tools`; a random model writes no <tool_call>, so no calls come back
    (the parsing of calls the model writes: tests/unit/test_tool_calls.py)."""
    tok, greedy = reference
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    assert "get_weather" in prompt
    _, text = greedy(tok.encode(prompt), 8)
    resp = client.chat.completions.create(model=serve_app.generate_model, messages=messages, tools=tools,
                                          max_tokens=8, temperature=0)
    assert resp.usage.prompt_tokens == len(tok.encode(prompt))
    assert resp.choices[0].message.content == text and resp.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError) as e:  # forcing a function the request does not offer
        client.chat.completions.create(model=serve_app.generate_model, messages=messages, tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "nope"}}, max_tokens=8)
    assert e.value.body["param"] == "tool_choice.function.name"


def test_logit_bias_forces_and_bans_tokens(client, serve_app, reference):
    tok, greedy = reference
    ids, text = greedy(tok.encode(PROMPT), 6)
    forced = tok.encode(" fox")[0]
    resp = client.completions.create(model=serve_app.generate_model, prompt=PROMPT, max_tokens=6, temperature=0,
                                     logit_bias={str(forced): 100})
    assert resp.choices[0].text == tok.decode([forced] * 6)
    banned = client.completions.create(model=serve_app.generate_model, prompt=PROMPT, max_tokens=6, temperature=0,
                                       logit_bias={str(ids[0]): -100}, logprobs=0)
    assert banned.choices[0].text != text and tok.decode([ids[0]]) != banned.choices[0].logprobs.tokens[0]
    with pytest.raises(openai.BadRequestError) as e:  # an id past the vocabulary, checked by the engine
        client.completions.create(model=serve_app.generate_model, prompt=PROMPT, max_tokens=2,
                                  logit_bias={str(10**7): 1})
    assert e.value.body["param"] == "logit_bias"


def test_echo_with_logprobs_scores_the_prompt(client, serve_app, reference):
    """lm-eval-harness's loglikelihood request (echo + logprobs + max_tokens=1): the prompt tokens'
    logprobs equal a full forward of the model over the prompt."""
    from qwen2_model import from_pretrained

    tok, greedy = reference
    ids = tok.encode(PROMPT)
    _, first = greedy(ids, 1)
    resp = client.completions.create(model=serve_app.generate_model, prompt=PROMPT, max_tokens=1, temperature=0,
                                     echo=True, logprobs=1)
    choice = resp.choices[0]
    assert choice.text == PROMPT + first and resp.usage.completion_tokens == 1
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    model = from_pretrained(serve_app.checkpoints[serve_app.generate_model])
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].float().log_softmax(-1)  # [S, V]: row q predicts token q + 1
    for q in range(1, len(ids)):
        assert abs(lp.token_logprobs[q] - ref[q - 1, ids[q]].item()) < 1e-3, q
        assert len(lp.top_logprobs[q]) == 1
    stream = client.completions.create(model=serve_app.generate_model, prompt=PROMPT, max_tokens=3, temperature=0,
                                       echo=True, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == PROMPT + greedy(ids, 3)[1]


def test_stop_strings_are_not_emitted(client, serve_app, reference):
    tok, greedy = reference
    _, text = greedy(tok.encode(PROMPT), 24)
    assert len(text) >= 8, text
    stop = text[4:7]
    want = text[:text.find(stop)]
    resp = client.completions.create(model=serve_app.generate_model, prompt=PROMPT, max_tokens=24, temperature=0,
                                     stop=[stop])
    assert resp.choices[0].text == want
    assert resp.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=serve_app.generate_model, prompt=PROMPT, max_tokens=24, temperature=0,
                                       stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_string_stops_generation_in_the_engine(serve_app, reference):
    """A matched stop string ends the request in the router too: it does not run on to max_tokens."""
    import time

    tok, greedy = reference
    _, text = greedy(tok.encode(PROMPT), 24)
    stop = text[4:7]
    model = serve_app.generate_model
    before = serve_app.router_stats(model)
    body = {"model": model, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stop": [stop],
            "ignore_eos": True}
    reply = httpx.post(f"{serve_app.http_url}/v1/completions", json=body, headers=serve_app.headers, timeout=120)
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "stop"
    deadline = time.time() + 30
    while True:
        s = serve_app.router_stats(model)
        if s["running"] == 0 and s["free_kv_blocks"] == s["num_kv_blocks"]:
            break
        assert time.time() < deadline, s
        time.sleep(0.2)
    assert s["generated_tokens"] - before["generated_tokens"] < 100  # far below max_tokens=900
    assert s["finished"].get("abort", 0) > before["finished"].get("abort", 0)


def test_concurrent_requests_share_steps(serve_app, reference):
    tok, greedy = reference
    prompts = [f"request number {i} says {'ab' * (i % 5)}" for i in range(16)]
    alone = [greedy(tok.encode(p), 10)[1] for p in prompts]

    async def run_all():
        async with httpx.AsyncClient(base_url=serve_app.http_url, headers=serve_app.headers, timeout=120) as c:
            rs = await asyncio.gather(*[
                c.post("/v1/completions", json={"model": serve_app.generate_model, "prompt": p, "max_tokens": 10,
                                                "temperature": 0, "ignore_eos": True})
                for p in prompts])
            return [r.json()["choices"][0]["text"] for r in rs]

    before = serve_app.router_stats(serve_app.generate_model)
    together = asyncio.run(run_all())
    after = serve_app.router_stats(serve_app.generate_model)
    # ignore_eos can only lengthen the text: compare on what the engine alone produced.
    assert [t[:len(a)] for t, a in zip(together, alone)] == alone
    assert after["max_batch_seqs"] > 1
    # 16 requests x 10 tokens in far fewer than 160 steps: they ran together.
    assert after["steps"] - before["steps"] < 100


def test_cancelled_stream_stops_and_frees_blocks(serve_app):
    model = serve_app.generate_model
    before = serve_app.router_stats(model)
    with httpx.Client(base_url=serve_app.http_url, headers=serve_app.headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 900,
                                                       "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream
    deadline = time.time() + 30
    while True:
        s = serve_app.router_stats(model)
        if s["running"] == 0 and s["waiting"] == 0 and s["free_kv_blocks"] == s["num_kv_blocks"]:
            break
        assert time.time() < deadline, s
        time.sleep(0.2)
    assert s["finished"].get("abort", 0) > before["finished"].get("abort", 0)
    assert s["generated_tokens"] - before["generated_tokens"] < 600


# --- the one-shot heads ----------------------------------------------------------------------------


def test_classify(http, serve_app):
    r = http.post("/v1/classify", json={"model": serve_app.classify_model, "input": ["good movie", "bad movie"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    for d in body["data"]:
        assert d["num_classes"] == len(d["probs"]) == 3
        assert abs(sum(d["probs"]) - 1) < 1e-4
        assert d["label"] == f"LABEL_{max(range(3), key=d['probs'].__getitem__)}"
    assert body["usage"]["prompt_tokens"] > 0


def test_pooled_requests_are_micro_batched(serve_app):
    async def run_all():
        async with httpx.AsyncClient(base_url=serve_app.http_url, headers=serve_app.headers, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/classify", json={"model": serve_app.classify_model,
                                                                        "input": f"text {i}"}) for i in range(12)])
    singles = [httpx.post(f"{serve_app.http_url}/v1/classify", headers=serve_app.headers,
                          json={"model": serve_app.classify_model, "input": f"text {i}"}).json()["data"][0]["probs"]
               for i in range(3)]
    rs = asyncio.run(run_all())
    assert all(r.status_code == 200 for r in rs)
    for i in range(3):  # padding in a batch does not change the answer
        assert rs[i].json()["data"][0]["probs"] == pytest.approx(singles[i], abs=1e-5)
    assert serve_app.router_stats(serve_app.classify_model)["pooled_max_batch"] > 1


def test_classify_tokens(http, serve_app):
    text = "Alice met Bob in Paris"
    r = http.post("/v1/classify/tokens", json={"model": serve_app.ner_model, "input": text, "aggregation": "simple"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"]
    for t in body["tokens"]:
        assert text[t["start"]:t["end"]] == t["token"]
        assert t["label"] in {"O", "B-ENT", "I-ENT"}
        assert 0 < t["score"] <= 1
    for e in body["entities"]:
        assert e["entity_group"] == "ENT" and text[e["start"]:e["end"]].strip() == e["word"]


def test_answer(http, serve_app):
    """The span equals the brute-force best span of transformers' own QA model on the same checkpoint."""
    import torch
    transformers = pytest.importorskip("transformers")
    from qwen2_model.tokenizer import Qwen2Tokenizer

    context, question = "The Eiffel Tower is in Paris. It was finished in 1889.", "Where is it?"
    r = http.post("/v1/answer", json={"model": serve_app.qa_model, "question": question, "context": context})
    assert r.status_code == 200, r.text
    body = r.json()
    path = serve_app.checkpoints[serve_app.qa_model]
    tok = Qwen2Tokenizer.from_pretrained(path)
    q_ids = tok.encode(question)
    c_ids, offsets = tok.encode_with_offsets(context)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([q_ids + c_ids]))
    ps = out.start_logits[0, len(q_ids):].double().softmax(-1).tolist()  # context positions only
    pe = out.end_logits[0, len(q_ids):].double().softmax(-1).tolist()
    score, i, j = max((ps[i] * pe[j], i, j) for i in range(len(c_ids)) for j in range(i, min(len(c_ids), i + 30)))
    assert (body["start"], body["end"]) == (offsets[i][0], offsets[j][1]), (body, context[offsets[i][0]:offsets[j][1]])
    assert body["answer"] == context[body["start"]:body["end"]]
    assert body["score"] == pytest.approx(score, rel=1e-3)


def test_embeddings(client, serve_app):
    resp = client.embeddings.create(model=serve_app.generate_model, input=["hello world", "goodbye"])
    assert len(resp.data) == 2
    vec = resp.data[0].embedding
    assert len(vec) == 64 and abs(sum(v * v for v in vec) - 1) < 1e-3
    raw = httpx.post(f"{serve_app.http_url}/v1/embeddings", headers=serve_app.headers,
                     json={"model": serve_app.generate_model, "input": "hello world", "encoding_format": "float"})
    assert raw.json()["data"][0]["embedding"] == pytest.approx(vec, abs=1e-5)


def test_bad_input_fails_only_its_own_request(serve_app):
    """A pooled request with an out-of-vocabulary id gets its 400; requests micro-batched with it
    succeed; and a generation with an out-of-vocabulary stop token id is refused before it can reach
    the sampler, leaving the engine healthy."""
    async def run_all():
        async with httpx.AsyncClient(base_url=serve_app.http_url, headers=serve_app.headers, timeout=60) as c:
            return await asyncio.gather(
                c.post("/v1/embeddings", json={"model": serve_app.generate_model, "input": [[1, 2, 99999]]}),
                c.post("/v1/embeddings", json={"model": serve_app.generate_model, "input": "hello world"}),
                c.post("/v1/embeddings", json={"model": serve_app.generate_model, "input": "hello again"}))
    for _ in range(3):
        bad, good1, good2 = asyncio.run(run_all())
        assert bad.status_code == 400 and "outside the vocabulary" in error_of(bad)["message"]
        assert good1.status_code == 200 and good2.status_code == 200
    r = httpx.post(f"{serve_app.http_url}/v1/completions", headers=serve_app.headers,
                   json={"model": serve_app.generate_model, "prompt": "hi", "max_tokens": 4, "min_tokens": 2,
                         "stop_token_ids": [100000000]})
    assert r.status_code == 400 and error_of(r)["param"] == "stop_token_ids"
    ok = httpx.post(f"{serve_app.http_url}/v1/completions", headers=serve_app.headers,
                    json={"model": serve_app.generate_model, "prompt": "hi", "max_tokens": 4})
    assert ok.status_code == 200
    assert httpx.get(f"{serve_app.http_url}/ready", timeout=30).status_code == 200


def test_chat_template_kwargs_cannot_bring_a_template(serve_app):
    for kwargs in ({"chat_template": "{{ raise_exception('ran') }}"}, {"tools": []}, {"add_generation_prompt": False}):
        r = httpx.post(f"{serve_app.http_url}/v1/chat/completions", headers=serve_app.headers,
                       json={"model": serve_app.generate_model, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 2, "chat_template_kwargs": kwargs})
        assert r.status_code == 400, r.text
        assert error_of(r)["param"].startswith("chat_template_kwargs") and "ran" not in error_of(r)["message"]
    ok = httpx.post(f"{serve_app.http_url}/v1/chat/completions", headers=serve_app.headers,
                    json={"model": serve_app.generate_model, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": False}})
    assert ok.status_code == 200


def test_unknown_route_and_method_get_the_error_body(serve_app):
    r = httpx.get(f"{serve_app.http_url}/v1/nope", headers=serve_app.headers)
    assert r.status_code == 404 and "/v1/nope" in error_of(r)["message"]
    r = httpx.get(f"{serve_app.http_url}/v1/completions", headers=serve_app.headers)
    assert r.status_code == 405 and error_of(r)["type"] == "invalid_request_error"


def test_multi_model_side_by_side(serve_app):
    async def run_all():
        async with httpx.AsyncClient(base_url=serve_app.http_url, headers=serve_app.headers, timeout=60) as c:
            return await asyncio.gather(
                c.post("/v1/completions", json={"model": serve_app.generate_model, "prompt": "hi", "max_tokens": 4}),
                c.post("/v1/classify", json={"model": serve_app.classify_model, "input": "hi"}),
                c.post("/v1/completions", json={"model": serve_app.generate_model, "prompt": "yo", "max_tokens": 4}),
                c.post("/v1/classify", json={"model": serve_app.classify_model, "input": "yo"}))
    rs = asyncio.run(run_all())
    assert [r.status_code for r in rs] == [200] * 4
    assert rs[0].json()["model"] == serve_app.generate_model and rs[1].json()["model"] == serve_app.classify_model
    # A model asked for a task it cannot do: 400 naming `model`.
    r = httpx.post(f"{serve_app.http_url}/v1/completions", headers=serve_app.headers,
                   json={"model": serve_app.classify_model, "prompt": "hi"})
    assert r.status_code == 400 and error_of(r)["param"] == "model"


# --- the error contract ------------------------------------------------------------------------------


def test_400_names_the_field(client, serve_app, http):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=serve_app.generate_model, prompt="hi", temperature=-1)
    assert e.value.body["param"] == "temperature"
    r = http.post("/v1/chat/completions", json={"model": serve_app.generate_model, "messages": []})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = http.post("/v1/completions", json={"model": serve_app.generate_model})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_request"
    with pytest.raises(openai.BadRequestError) as e:  # a schema that is not one: named, not ignored
        client.chat.completions.create(model=serve_app.generate_model, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "wat"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema" and "wat" in e.value.body["message"]


def test_400_context_length(client, serve_app):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=serve_app.generate_model, prompt="hi", max_tokens=serve_app.max_model_len)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"


def test_413_body_too_large(http, serve_app):
    big = "a " * serve_app.max_body_bytes
    r = http.post("/v1/completions", json={"model": serve_app.generate_model, "prompt": big})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"

    def chunks():  # no Content-Length: the cap holds on the bytes received
        for _ in range(serve_app.max_body_bytes // 4096 + 2):
            yield b" " * 4096
    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_401_api_key(serve_app):
    url = f"{serve_app.http_url}/v1/models"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and error_of(r)["code"] == "unauthenticated"
    bad = openai.OpenAI(base_url=f"{serve_app.http_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_404_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi")
    assert e.value.body["code"] == "model_not_found"


def test_429_queue_full(serve_app, http):
    router = serve_app.router(serve_app.generate_model)
    router.reconfigure.remote({"max_waiting": 0}).result(timeout_s=30)
    try:
        r = http.post("/v1/completions", json={"model": serve_app.generate_model, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert error_of(r)["code"] == "queue_full"
    finally:
        router.reconfigure.remote({"max_waiting": 1024}).result(timeout_s=30)
    # the ingress and Serve's proxy (deployments/admission.py) keep a "queue full" answer this long
    time.sleep(max(QUEUE_FULL_HOLD_S, PROXY_QUEUE_FULL_HOLD_S) + 0.05)
    r = http.post("/v1/completions", json={"model": serve_app.generate_model, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200


def test_408_timeout(http, serve_app):
    before = serve_app.router_stats(serve_app.generate_model)
    r = http.post("/v1/completions", headers={"x-request-timeout": "0.3"},
                  json={"model": serve_app.generate_model, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True})
    assert r.status_code == 408, r.text
    assert error_of(r)["code"] == "timeout"
    deadline = time.time() + 30
    while True:  # the timed-out request was aborted, not left running
        s = serve_app.router_stats(serve_app.generate_model)
        if s["running"] == 0:
            break
        assert time.time() < deadline
        time.sleep(0.2)
    assert s["generated_tokens"] - before["generated_tokens"] < 900
