"""How the Ingress asks a Router for its token stream (the app arg `router_stream`): over Serve's
inter-deployment gRPC by default, as Ray streaming objects with "ray", and a bad value refused at
start-up with a message that names the arg."""

from __future__ import annotations

import pytest

from tests.scripted_router import ScriptedRouter, openai_call


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    from qwen2_model.tokenizer import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(qwen_tokenizer_dir)


def _stream(tokenizer, frontend_kw: dict) -> tuple[str, ScriptedRouter]:
    router = ScriptedRouter(tokenizer.encode("one two three"), "stop")

    async def call(client):
        return await client.completions.create(model="m", prompt="Hi", max_tokens=8, stream=True)

    chunks = openai_call(tokenizer, router, call, frontend_kw)
    return "".join(c.choices[0].text for c in chunks if c.choices), router


@pytest.mark.parametrize("frontend_kw, by_reference", [({}, False), ({"router_stream": "grpc"}, False),
                                                      ({"router_stream": "ray"}, True)])
def test_the_generate_stream_uses_the_chosen_transport(tokenizer, frontend_kw, by_reference):
    text, router = _stream(tokenizer, frontend_kw)
    assert text == "one two three"
    assert router.handle_options == [{"stream": True, "_by_reference": by_reference}]


def test_an_unknown_transport_is_refused_by_name():
    from deployments.app import build_app
    from deployments.frontend.core import Frontend

    with pytest.raises(ValueError, match=r"router_stream must be one of \['grpc', 'ray'\], got 'tcp'"):
        build_app({"models": [{"name": "m", "path": "demo:causal_lm"}], "router_stream": "tcp"})
    with pytest.raises(ValueError, match="router_stream"):
        Frontend([object()], router_stream="tcp")


def test_the_cli_passes_its_flag_to_the_app():
    from deployments.cli import app_args_for_run, build_parser
    from deployments.frontend.core import DEFAULT_ROUTER_STREAM, ROUTER_STREAMS

    def app_args(*flags):
        return app_args_for_run(build_parser().parse_args(["run", "--model", "demo:causal_lm", *flags]))

    assert app_args()["router_stream"] == DEFAULT_ROUTER_STREAM == "grpc"
    for name in ROUTER_STREAMS:  # the CLI's spelled-out choices cover the Frontend's transports
        assert app_args("--router-stream", name)["router_stream"] == name
    with pytest.raises(SystemExit):
        app_args("--router-stream", "tcp")
