"""A small typed Python client for the Qwen2Serve gRPC API (protos/qwen2_serve/v1).

    from deployments.client import Qwen2ServeClient, ClientError

    with Qwen2ServeClient("127.0.0.1:9000", api_key="sk-...") as client:
        print(client.generate("Once upon a time", max_tokens=16, temperature=0).choices[0].text)
        for msg in client.generate_stream("Hi", max_tokens=8):
            print(msg.text, end="", flush=True)

Every call returns the generated response message (see qwen2_serve_pb2.pyi for fields) and raises
`ClientError` (with the gRPC `code`, `details`, and `retry_after` for a full queue) on failure.
`application` selects the Serve application when several run behind one proxy; `timeout` is the
per-call deadline in seconds (a call's own `timeout=` overrides it), sent to the server as its
`x-request-timeout` as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb
from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:9000"

# GenerateRequest's sampling fields and the Python types they take.
SAMPLING_FIELDS: dict[str, type] = {
    "n": int, "max_tokens": int, "min_tokens": int, "temperature": float, "top_p": float, "top_k": int,
    "min_p": float, "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
    "seed": int, "stop": list, "stop_token_ids": list, "ignore_eos": bool, "logprobs": int, "logit_bias": dict,
    "echo": bool,
}


class ClientError(Exception):
    """A failed call: `code` (grpc.StatusCode), `details` (names the field for INVALID_ARGUMENT)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[tuple[str, str]] = ()):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata or ())

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before retrying (RESOURCE_EXHAUSTED for a full queue), if the server said."""
        for key, value in self.trailing_metadata:
            if key == "retry-after":
                try:
                    return float(value)
                except ValueError:
                    return None
        return None

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ClientError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else ()
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", trailing or ())


def build_generate_request(
    prompt: str | Sequence[int] | None = None,
    model: str = "",
    *,
    messages: Iterable[Mapping[str, str] | tuple[str, str]] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """Keyword arguments -> GenerateRequest. A list of ints as `prompt` means token ids.

    Sampling keywords are GenerateRequest's names (vLLM's); None leaves a field unset (the server
    default); `stop` takes a string or a list of strings. `tools` (OpenAI's tool objects, chat
    only) travel as JSON; the model's calls come back in each choice's `tool_calls`.
    """
    req = pb.GenerateRequest(model=model or "", tool_choice=tool_choice or "")
    if tools is not None:
        req.tools_json = json.dumps(list(tools))
    if isinstance(prompt, str):
        req.prompt = prompt
    elif prompt is not None:
        req.prompt_token_ids.extend(int(t) for t in prompt)
    if prompt_token_ids is not None:
        req.prompt_token_ids.extend(int(t) for t in prompt_token_ids)
    for m in messages or ():
        role, content = (m["role"], m.get("content") or "") if isinstance(m, Mapping) else m
        req.messages.add(role=role, content=content)
    for name, value in sampling.items():
        if name not in SAMPLING_FIELDS:
            raise TypeError(f"unknown sampling argument {name!r}; known: {', '.join(SAMPLING_FIELDS)}")
        if value is None:
            continue
        if name == "stop":
            req.stop.extend([value] if isinstance(value, str) else list(value))
        elif name == "stop_token_ids":
            req.stop_token_ids.extend(int(t) for t in value)
        elif name == "logit_bias":
            req.logit_bias.update({int(t): float(b) for t, b in value.items()})
        else:
            setattr(req, name, SAMPLING_FIELDS[name](value))
    return req


class GenerateStream:
    """Iterator over GenerateStreamResponse messages; `cancel()` stops generation on the server."""

    def __init__(self, call: Any):
        self._call = call

    def __iter__(self) -> Iterator[pb.GenerateStreamResponse]:
        try:
            yield from self._call
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                return  # we cancelled it ourselves
            raise ClientError.from_rpc_error(e) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()


class Qwen2ServeClient:
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        api_key: str | None = None,
        application: str | None = None,
        timeout: float | None = None,
        *,
        channel: grpc.Channel | None = None,
        max_message_bytes: int = 64 << 20,
    ):
        self.target = target
        self.timeout = timeout
        self._own_channel = channel is None
        self._channel = channel or grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ])
        self._stub = pb_grpc.Qwen2ServeStub(self._channel)
        md = []
        if application:
            md.append(("application", application))
        if api_key:
            md.append(("authorization", f"Bearer {api_key}"))
        self._metadata = tuple(md)

    # -- plumbing -------------------------------------------------------------------------------

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        timeout = timeout if timeout is not None else self.timeout
        metadata = self._metadata
        if timeout is not None:
            # The deadline also goes to the server as its request timeout, so generation stops
            # there even if the call's cancellation does not reach the server.
            metadata += (("x-request-timeout", f"{max(timeout, 0.001):.3f}"),)
        return {"metadata": metadata, "timeout": timeout}

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, **self._kw(timeout))
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None

    # -- RPCs -----------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int] | None = None, model: str = "", *,
                 messages: Iterable[Mapping[str, str]] | None = None, timeout: float | None = None,
                 **sampling: Any) -> pb.GenerateResponse:
        req = build_generate_request(prompt, model, messages=messages, **sampling)
        return self._unary(self._stub.Generate, req, timeout)

    def generate_stream(self, prompt: str | Sequence[int] | None = None, model: str = "", *,
                        messages: Iterable[Mapping[str, str]] | None = None, timeout: float | None = None,
                        **sampling: Any) -> GenerateStream:
        req = build_generate_request(prompt, model, messages=messages, **sampling)
        return GenerateStream(self._stub.GenerateStream(req, **self._kw(timeout)))

    def chat(self, messages: Iterable[Mapping[str, str]], model: str = "", **kwargs: Any) -> pb.GenerateResponse:
        return self.generate(None, model, messages=messages, **kwargs)

    def classify(self, inputs: str | Sequence[str], model: str = "", *,
                 timeout: float | None = None) -> pb.ClassifyResponse:
        batch = [inputs] if isinstance(inputs, str) else list(inputs)
        return self._unary(self._stub.Classify, pb.ClassifyRequest(model=model, input=batch), timeout)

    def classify_tokens(self, text: str, model: str = "", aggregation: str = "none", *,
                        timeout: float | None = None) -> pb.ClassifyTokensResponse:
        req = pb.ClassifyTokensRequest(model=model, input=text, aggregation=aggregation)
        return self._unary(self._stub.ClassifyTokens, req, timeout)

    def answer(self, question: str, context: str, model: str = "", *,
               timeout: float | None = None) -> pb.AnswerQuestionResponse:
        req = pb.AnswerQuestionRequest(model=model, question=question, context=context)
        return self._unary(self._stub.AnswerQuestion, req, timeout)

    def embed(self, inputs: str | Sequence[str], model: str = "", pooling: str = "last",
              normalize: bool = True, *, timeout: float | None = None) -> pb.EmbedResponse:
        batch = [inputs] if isinstance(inputs, str) else list(inputs)
        req = pb.EmbedRequest(model=model, input=batch, pooling=pooling, normalize=normalize)
        return self._unary(self._stub.Embed, req, timeout)

    def reward(self, inputs: str | Sequence[str] | Sequence[Sequence[int]] | None = None, model: str = "", *,
               messages: Iterable[Mapping[str, str]] | None = None, add_generation_prompt: bool = False,
               timeout: float | None = None) -> pb.RewardResponse:
        """Reward models: texts, token-id lists, or one conversation (`messages`) -> per input the rows
        (a reward per token, or a process reward model's probabilities per step tag)."""
        req = pb.RewardRequest(model=model, add_generation_prompt=add_generation_prompt)
        if messages is not None:
            req.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        if isinstance(inputs, str):
            req.input.append(inputs)
        elif inputs is not None:
            for item in inputs:
                if isinstance(item, str):
                    req.input.append(item)
                else:
                    req.input_token_ids.append(pb.TokenIds(ids=[int(t) for t in item]))
        return self._unary(self._stub.Reward, req, timeout)

    def tokenize(self, text: str, model: str = "", add_special_tokens: bool | None = None, *,
                 timeout: float | None = None) -> pb.TokenizeResponse:
        req = pb.TokenizeRequest(model=model, text=text)
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        return self._unary(self._stub.Tokenize, req, timeout)

    def detokenize(self, token_ids: Sequence[int], model: str = "", *,
                   timeout: float | None = None) -> pb.DetokenizeResponse:
        req = pb.DetokenizeRequest(model=model, token_ids=[int(t) for t in token_ids])
        return self._unary(self._stub.Detokenize, req, timeout)

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check -> "SERVING" | "NOT_SERVING" | ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        resp = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> Qwen2ServeClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
