"""The gRPC contract: committed stubs are reproducible, messages round-trip, the service is complete."""

from __future__ import annotations

import pytest

from protos import generate as gen
from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc


def test_stubs_are_reproducible(tmp_path):
    written = gen.generate(tmp_path)
    assert len(written) == 3
    for proto in gen.PROTO_FILES:
        for rel in gen.generated_paths(proto):
            fresh = (tmp_path / rel).read_bytes()
            committed = (gen.REPO_ROOT / rel).read_bytes()
            assert fresh == committed, f"{rel} is stale: run `python protos/generate.py`"
    assert gen.stale_files() == []


def test_grpc_module_imports_messages_by_package_path():
    source = (gen.REPO_ROOT / "protos/qwen2_serve/v1/qwen2_serve_pb2_grpc.py").read_text()
    assert "from protos.qwen2_serve.v1 import qwen2_serve_pb2" in source


EXPECTED_RPCS = {
    # name: (input, output, server_streaming)
    "Generate": ("GenerateRequest", "GenerateResponse", False),
    "GenerateStream": ("GenerateRequest", "GenerateStreamResponse", True),
    "Classify": ("ClassifyRequest", "ClassifyResponse", False),
    "ClassifyTokens": ("ClassifyTokensRequest", "ClassifyTokensResponse", False),
    "AnswerQuestion": ("AnswerQuestionRequest", "AnswerQuestionResponse", False),
    "Embed": ("EmbedRequest", "EmbedResponse", False),
    "Reward": ("RewardRequest", "RewardResponse", False),
    "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
    "Detokenize": ("DetokenizeRequest", "DetokenizeResponse", False),
    "ListModels": ("ListModelsRequest", "ListModelsResponse", False),
}


def test_service_has_every_rpc_with_the_right_streaming_kind():
    service = pb.DESCRIPTOR.services_by_name["Qwen2Serve"]
    assert service.full_name == "qwen2_serve.v1.Qwen2Serve"
    assert set(service.methods_by_name) == set(EXPECTED_RPCS)
    for name, (inp, out, server_streaming) in EXPECTED_RPCS.items():
        m = service.methods_by_name[name]
        assert m.input_type.name == inp
        assert m.output_type.name == out
        assert m.client_streaming is False
        assert m.server_streaming is server_streaming, name
    # The servicer base and the stub expose the same methods.
    for name in EXPECTED_RPCS:
        assert hasattr(pb_grpc.Qwen2ServeServicer, name)
    assert callable(pb_grpc.add_Qwen2ServeServicer_to_server)


def test_optional_fields_track_presence():
    req = pb.GenerateRequest(prompt="hi")
    for name in ("n", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "logprobs"):
        assert not req.HasField(name), name
    req.temperature = 0.0  # explicit greedy must be distinguishable from "unset"
    assert req.HasField("temperature")
    assert pb.EmbedRequest().HasField("normalize") is False
    assert pb.TokenizeRequest().HasField("add_special_tokens") is False


MESSAGES = [
    pb.GenerateRequest(
        model="qwen2", prompt="Hello", n=2, max_tokens=8, min_tokens=1, temperature=0.7, top_p=0.9, top_k=40,
        min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5, seed=-3,
        stop=["\n", "END"], stop_token_ids=[151643], ignore_eos=True, logprobs=5,
    ),
    pb.GenerateRequest(prompt_token_ids=[1, 2, 3]),
    pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]),
    pb.GenerateResponse(
        id="cmpl-1", model="qwen2",
        choices=[pb.Choice(index=0, text="hey", token_ids=[5, 6], finish_reason="stop", logprobs=[
            pb.TokenLogprob(token_id=5, token="he", logprob=-0.25,
                            top_logprobs=[pb.TopLogprob(token_id=5, token="he", logprob=-0.25)]),
        ])],
        usage=pb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    ),
    pb.GenerateStreamResponse(id="cmpl-1", model="qwen2", index=1, text="y", token_ids=[6], finish_reason="length",
                              usage=pb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)),
    pb.ClassifyRequest(model="cls", input=["good", "bad"]),
    pb.ClassifyResponse(id="c", model="cls", results=[pb.ClassificationResult(index=0, label="POS", probs=[0.25, 0.75],
                                                                                 num_classes=2)],
                        usage=pb.Usage(prompt_tokens=4, total_tokens=4)),
    pb.ClassifyTokensRequest(model="ner", input="Alice in Paris", aggregation="simple"),
    pb.ClassifyTokensResponse(
        tokens=[pb.TokenLabel(token="Alice", label="B-PER", score=0.5, start=0, end=5)],
        entities=[pb.Entity(entity_group="PER", score=0.5, word="Alice", start=0, end=5)],
    ),
    pb.AnswerQuestionRequest(model="qa", question="Where?", context="In Paris."),
    pb.AnswerQuestionResponse(answer="Paris", score=0.5, start=3, end=8),
    pb.EmbedRequest(model="emb", input=["a", "b"], pooling="mean", normalize=False),
    pb.EmbedResponse(model="emb", data=[pb.Embedding(index=0, values=[0.5, -0.25])], usage=pb.Usage(prompt_tokens=2)),
    pb.RewardRequest(model="prm", input_token_ids=[pb.TokenIds(ids=[1, 2, 151651])]),
    pb.RewardRequest(messages=[pb.ChatMessage(role="user", content="1+1?")], add_generation_prompt=True),
    pb.RewardResponse(id="pool-1", model="prm", data=[pb.RewardResult(index=0, rows=[pb.FloatRow(values=[0.25, 0.75])])],
                      usage=pb.Usage(prompt_tokens=3, total_tokens=3)),
    pb.TokenizeRequest(model="qwen2", text="hi", add_special_tokens=False),
    pb.TokenizeResponse(token_ids=[6023], count=1, max_model_len=32768),
    pb.DetokenizeRequest(model="qwen2", token_ids=[6023]),
    pb.DetokenizeResponse(text="hi"),
    pb.ListModelsRequest(),
    pb.ListModelsResponse(models=[pb.ModelCard(id="qwen2", task="generate", max_model_len=32768, owned_by="me")]),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(msg):
    wire = msg.SerializeToString()
    back = type(msg).FromString(wire)
    assert back == msg
    # Presence of optional fields survives the wire too.
    for field in msg.DESCRIPTOR.fields:
        if field.has_presence and not field.is_repeated:
            assert back.HasField(field.name) == msg.HasField(field.name), field.name


def test_double_fields_keep_json_values_exact():
    # Float knobs are doubles so 0.7 over gRPC equals 0.7 over JSON (a float32 would not).
    back = pb.GenerateRequest.FromString(pb.GenerateRequest(temperature=0.7, top_p=0.9).SerializeToString())
    assert back.temperature == 0.7 and back.top_p == 0.9
