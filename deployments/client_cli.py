"""`qwen2-serve client ...`: talk to a running server over gRPC (deployments/client.py).

    qwen2-serve client generate --prompt "Once upon a time" --max-tokens 16 [--stream] [--temperature 0]
    qwen2-serve client chat --message "Hello"             # one user turn through the chat template
    qwen2-serve client classify --input "great film" --input "awful film"
    qwen2-serve client answer --question "Who?" --context "Ada wrote it."
    qwen2-serve client models
    qwen2-serve client health

Common options: --target HOST:PORT (default 127.0.0.1:9000), --api-key (default $QWEN2_SERVE_API_KEY),
--application (Serve application name), --timeout SECONDS, --model. Errors print
"error: CODE: details" to stderr and exit 1. `--json` prints the response message as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

from google.protobuf import json_format

from deployments.client import DEFAULT_TARGET, ClientError, Qwen2ServeClient


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("QWEN2_SERVE_GRPC_TARGET", DEFAULT_TARGET),
                   help="gRPC host:port of the Serve gRPC proxy (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("QWEN2_SERVE_API_KEY"), help="API key (Bearer)")
    p.add_argument("--application", default=None, help="Serve application name, when several run")
    p.add_argument("--timeout", type=float, default=None, help="per-call deadline in seconds")
    p.add_argument("--model", default="", help="model id (default: the served model)")
    p.add_argument("--json", action="store_true", help="print the response message as JSON")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")


def add_client_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `client {generate,chat,classify,answer,models,health}` to a CLI's subparsers.

    Each leaf sets `func` (args -> exit code, errors already printed), as deployments/cli.py expects.
    """
    client = subparsers.add_parser("client", help="call a running server over gRPC",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = client.add_subparsers(dest="client_command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("generate", help="generate text from a prompt")
    _common(p)
    _sampling(p)
    p.add_argument("--prompt", required=True)
    p.set_defaults(func=_guarded(_cmd_generate))

    p = sub.add_parser("chat", help="generate a reply to one user message (chat template applied)")
    _common(p)
    _sampling(p)
    p.add_argument("--message", required=True, help="the user turn")
    p.add_argument("--system", default=None, help="an optional system turn")
    p.set_defaults(func=_guarded(_cmd_generate))

    p = sub.add_parser("classify", help="sequence classification")
    _common(p)
    p.add_argument("--input", action="append", required=True, help="text to classify (repeatable)")
    p.set_defaults(func=_guarded(_cmd_classify))

    p = sub.add_parser("answer", help="extractive question answering")
    _common(p)
    p.add_argument("--question", required=True)
    p.add_argument("--context", required=True)
    p.set_defaults(func=_guarded(_cmd_answer))

    p = sub.add_parser("models", help="list the served models")
    _common(p)
    p.set_defaults(func=_guarded(_cmd_models))

    p = sub.add_parser("health", help="grpc.health.v1 Check")
    _common(p)
    p.set_defaults(func=_guarded(_cmd_health))
    return client


def _guarded(cmd: Any) -> Any:
    """ClientError -> "error: CODE: details" on stderr and exit code 1 (no traceback), whichever
    CLI dispatches the command (qwen2-serve's cli.py calls `args.func(args)`)."""

    @functools.wraps(cmd)
    def run_cmd(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except ClientError as e:
            print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
            return 1

    return run_cmd


def _client(args: argparse.Namespace) -> Qwen2ServeClient:
    return Qwen2ServeClient(args.target, api_key=args.api_key, application=args.application, timeout=args.timeout)


def _print_json(msg: Any) -> None:
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def _cmd_generate(args: argparse.Namespace) -> int:
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "n": args.n, "stop": args.stop}
    if getattr(args, "message", None) is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.message})
        prompt = None
    else:
        messages, prompt = None, args.prompt
    with _client(args) as client:
        if args.stream:
            for msg in client.generate_stream(prompt, args.model, messages=messages, **sampling):
                if args.json:
                    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True)))
                else:
                    print(msg.text, end="", flush=True)
            if not args.json:
                print()
            return 0
        resp = client.generate(prompt, args.model, messages=messages, **sampling)
    if args.json:
        _print_json(resp)
    else:
        for c in resp.choices:
            print(c.text)
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.classify(args.input, args.model)
    if args.json:
        _print_json(resp)
    else:
        for r in resp.results:
            print(f"{r.index}\t{r.label}\t{max(r.probs) if r.probs else 0.0:.4f}")
    return 0


def _cmd_answer(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.answer(args.question, args.context, args.model)
    if args.json:
        _print_json(resp)
    else:
        print(f"{resp.answer}\t(score {resp.score:.4f}, chars {resp.start}-{resp.end})")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.list_models()
    if args.json:
        _print_json(resp)
    else:
        for m in resp.models:
            print(f"{m.id}\t{m.task}\tmax_model_len={m.max_model_len}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health()
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -m deployments.client_cli client generate --prompt ...`
    (the leading `client` is optional here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "client":
        argv = ["client", *argv]
    parser = argparse.ArgumentParser(prog="qwen2-serve")
    add_client_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
