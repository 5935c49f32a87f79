"""`qwen2-serve`: the command line.

    qwen2-serve demo                       # tiny random demo models, local Ray, HTTP :8000 + gRPC :9000
    qwen2-serve run --model PATH [...]     # serve checkpoints (repeat --model for several)
    qwen2-serve client ...                 # gRPC client (deployments/client_cli.py), when installed

`demo` and `run` start a local Ray (or join one with --address), run the application of
deployments/app.py, print how to call it, and block until Ctrl-C; then Serve and Ray shut down.
Prometheus metrics (deployments/metrics.py: ray_qwen2_*, next to Ray Serve's ray_serve_*) are
exported by Ray on --metrics-port at /metrics; with --address, on the port that cluster was started
with (`ray start --metrics-export-port`).

Listening sockets (README, "Security"): with the default --host 127.0.0.1 the local Ray is a
loopback-only cluster (`local_ray_env`): GCS, raylet, workers, agents and the metrics endpoint listen
on 127.0.0.1 only; HTTP listens on --host; Ray Serve's gRPC proxy on all interfaces (it has no bind
address). A --host that exposes the server leaves Ray on the machine's routable address.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

GRPC_SERVICERS = [
    "deployments.grpc_api.raw.add_Qwen2ServeServicer_to_server",  # raw request bytes: undecodable -> INVALID_ARGUMENT
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",  # standard grpc.health.v1 Check
]
APP_NAME = "qwen2"
DEMO_MODELS = [
    ("qwen2-demo", "demo:causal_lm"),
    ("qwen2-demo-classifier", "demo:sequence_classification"),
    ("qwen2-demo-ner", "demo:token_classification"),
    ("qwen2-demo-qa", "demo:question_answering"),
]


def _add_server_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: %(default)s; 0.0.0.0 to expose)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    g.add_argument("--grpc-port", type=int, default=9000,
                   help="gRPC port (default: %(default)s; 0 turns gRPC off). Ray Serve's gRPC server listens on "
                        "all interfaces (it has no bind address): set --api-key on a shared network")
    g.add_argument("--api-key", default=os.environ.get("QWEN2_SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and /ready "
                        "(default: $QWEN2_SERVE_API_KEY, or no key)")
    g.add_argument("--metrics-port", type=int, default=8080,
                   help="port of Ray's Prometheus metrics endpoint, http://HOST:PORT/metrics (default: "
                        "%(default)s; with --address the cluster's own `ray start --metrics-export-port` applies)")
    g.add_argument("--address", default=None,
                   help="join a running Ray cluster (e.g. 'auto') instead of starting a local one")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    g.add_argument("--direct-ingress", choices=["on", "off"], default="on",
                   help="on a local Ray, on: the Ingress replica answers --port and --grpc-port itself (Ray Serve's "
                        "direct ingress), so requests and streamed tokens skip Serve's proxy process (measured +10%% "
                        "at 32 streams on 2 cores); off: through Serve's proxy, as on a cluster; ignored with "
                        "--address (default: %(default)s)")
    g.add_argument("--max-body-bytes", type=int, default=None, help="request body cap in bytes (default: 1 MiB)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds before a request fails with 408 (default: %(default)s)")
    # frontend.core's ROUTER_STREAMS / DEFAULT_ROUTER_STREAM, spelled out: importing it pulls in torch, and
    # --help stays fast (tests/unit/test_router_stream.py keeps the two equal).
    g.add_argument("--router-stream", choices=["grpc", "ray"], default="grpc",
                   help="how tokens travel from a Router replica to the Ingress: grpc, over Serve's inter-deployment "
                        "gRPC server (less CPU per token); ray, as Ray streaming objects, for clusters whose nodes "
                        "reach each other only on Ray's ports (default: %(default)s)")
    g.add_argument("--shared-stream", choices=["on", "off"], default="on",
                   help="on: one token stream per Router replica carries each engine step's tokens of all of "
                        "the Ingress's requests as one message; off: one stream per request (default: %(default)s)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (applied to every --model)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree per replica (default: %(default)s)")
    g.add_argument("--replicas", type=int, default=1, help="Router replicas per model (data parallel; default: %(default)s)")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: the checkpoint's torch_dtype)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when present, else cpu)")
    g.add_argument("--kv-cache-memory", type=int, default=256 << 20,
                   help="KV cache bytes per replica (default: %(default)s)")
    g.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="CUDA only: size the KV cache as this fraction (0-1] of the GPU memory free after "
                        "loading the weights, instead of --kv-cache-memory")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: what the model supports: max_position_embeddings, or with "
                        "YaRN rope_scaling original_max_position_embeddings x factor; a larger value is refused)")
    g.add_argument("--quantization", default=None, choices=["int8"],
                   help="weight-only int8 at load, one scale per output channel (off by default; GPTQ and AWQ "
                        "checkpoints are recognized from config.json and need no flag)")
    g.add_argument("--hf-overrides", type=_json_object, default=None, metavar="JSON",
                   help="config.json fields to replace, as vLLM's: e.g. '{\"rope_scaling\": {\"rope_type\": \"yarn\", "
                        "\"factor\": 4.0, \"original_max_position_embeddings\": 32768}}' or '{\"is_causal\": false}'")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per engine step, prefill chunks included (default: %(default)s)")
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="queued requests per replica before 429 (default: %(default)s)")
    g.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="at most this many prompt tokens in a step while sequences decode (default: no fixed cap)")
    g.add_argument("--prefill-step-ratio", type=float, default=2.0,
                   help="while sequences decode, a step with prompt tokens takes at most this many times a "
                        "decode-only step (measured; 0 turns it off; default: %(default)s)")
    g.add_argument("--prefill-drain-steps", type=int, default=4,
                   help="while more requests wait for their prompts than sequences decode, a step may carry 1/N "
                        "of the pending prompt tokens whatever --prefill-step-ratio allows, so a burst prefills in "
                        "big chunks (0 turns it off; default: %(default)s)")
    g.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed message: 1 sends each token as it comes; k sends a stream's first "
                        "token at once, then every k (fewer messages through Serve, the ingress and the proxy: "
                        "more throughput on a CPU the model fills; default: %(default)s)")
    g.add_argument("--frontend-cpu-priority", choices=["idle", "normal"], default="idle",
                   help="on a local Ray, Serve's proxy and the Ingress run at idle CPU priority, so they use the "
                        "cycles the model's threads leave instead of preempting them (deployments/cpu_priority.py); "
                        "ignored with --address (default: %(default)s)")
    g.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads per Router replica (default: the local machine's CPUs (--num-cpus) shared "
                        "among the replicas; with --address, each replica's node's CPUs)")
    g.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwq"],
                   help="reasoning models (QwQ, DeepSeek-R1-Distill-Qwen): chat answers' <think> part goes to "
                        "reasoning_content, and structured output starts after </think>")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2-serve", description="Serve the Qwen2 family on Ray Serve "
                                     "(OpenAI-compatible HTTP + gRPC).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="serve tiny random demo models locally (no download)",
                          description="Write the demo checkpoints if absent (a causal LM 'qwen2-demo' and small "
                                      "classifier, NER and QA models), start local Ray + Serve, print a curl line "
                                      "and a gRPC call, and block until Ctrl-C.")
    _add_server_options(demo)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="serve one or more checkpoints",
                         description="Serve Hugging Face Qwen2 checkpoints (directories with config.json and "
                                     "safetensors), or demo:<head>. Repeat --model for several models.")
    run.add_argument("--model", action="append", required=True, metavar="PATH",
                     help="checkpoint directory or demo:<head> (repeatable)")
    run.add_argument("--name", action="append", default=[], metavar="NAME",
                     help="served model name, one per --model in order (default: the directory name)")
    run.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                     help="a LoRA adapter (PEFT directory) of the first --model, served as model NAME or "
                          "BASE:NAME (repeatable)")
    run.add_argument("--lora-dir", default=None, metavar="DIR",
                     help="adapters of the first --model loaded on demand: DIR/NAME is served as model NAME")
    run.add_argument("--max-loras", type=int, default=None,
                     help="LoRA adapters one replica holds at once (least recently used evicted; default 4)")
    _add_model_options(run)
    _add_server_options(run)
    run.set_defaults(func=cmd_run)

    from deployments.client_cli import add_client_commands

    add_client_commands(sub)
    return parser


def _engine_options(args) -> dict:
    engine = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
              "max_waiting": args.max_waiting, "max_prefill_tokens": args.max_prefill_tokens,
              "prefill_step_ratio": args.prefill_step_ratio or None,
              "prefill_drain_steps": args.prefill_drain_steps or None, "stream_interval": args.stream_interval}
    if args.max_model_len:
        engine["max_model_len"] = args.max_model_len
    return engine


def _default_name(path: str) -> str:
    if path.startswith("demo:"):
        head = path.split(":", 1)[1]
        return "qwen2-demo" if head == "causal_lm" else f"qwen2-demo-{head}"
    return Path(path).expanduser().resolve().name


def _json_object(text: str) -> dict:
    """--hf-overrides: a JSON object, or a clear argparse error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of config.json fields, got {text}")
    return value


def app_args_for_run(args) -> dict:
    if args.name and len(args.name) != len(args.model):
        raise SystemExit(f"qwen2-serve run: give one --name per --model ({len(args.model)} models, "
                         f"{len(args.name)} names)")
    if args.stream_interval < 1:
        raise SystemExit(f"qwen2-serve run: --stream-interval must be >= 1, got {args.stream_interval}")
    names = args.name or [_default_name(p) for p in args.model]
    models = []
    for name, path in zip(names, args.model):
        models.append({"name": name, "path": path, "tp": args.tp, "dtype": args.dtype, "device": args.device,
                       "kv_cache_memory": args.kv_cache_memory, "block_size": args.block_size,
                       "gpu_memory_fraction": args.gpu_memory_fraction,
                       "quantization": args.quantization, "hf_overrides": args.hf_overrides,
                       "engine": _engine_options(args), "num_replicas": args.replicas,
                       "torch_threads": _torch_threads(args),
                       "reasoning_parser": getattr(args, "reasoning_parser", None)})
    if args.lora or args.lora_dir or args.max_loras:
        from deployments.lora_adapters import parse_lora_arg

        try:
            models[0]["loras"] = dict(parse_lora_arg(item) for item in args.lora)
        except ValueError as exc:
            raise SystemExit(f"qwen2-serve run: {exc}") from None
        models[0]["lora_dir"] = args.lora_dir
        if args.max_loras:
            models[0]["max_loras_per_replica"] = args.max_loras
            models[0]["engine"]["max_loras"] = args.max_loras
    return _with_server_args({"models": models}, args)


def _torch_threads(args) -> int | None:
    """The Router's torch threads: the machine's cores shared among the replicas of a model (its
    Ray share is a fraction of a CPU, for which Ray would set one thread); None on a cluster, where
    each replica takes its own node's CPUs (deployments/router.py router_torch_threads)."""
    if args.torch_threads:
        return args.torch_threads
    if args.address:
        return None
    cpus = args.num_cpus
    if not cpus:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cpus) // max(1, args.replicas))


def app_args_for_demo(args) -> dict:
    models = [{"name": name, "path": path, "engine": {"max_model_len": 2048}} for name, path in DEMO_MODELS]
    return _with_server_args({"models": models}, args)


def _with_server_args(app_args: dict, args) -> dict:
    if args.api_key:
        app_args["api_key"] = args.api_key
    if args.max_body_bytes:
        app_args["max_body_bytes"] = args.max_body_bytes
    app_args["request_timeout_s"] = args.request_timeout
    app_args["router_stream"] = args.router_stream
    app_args["shared_stream"] = args.shared_stream == "on"
    return app_args


def curl_line(args, model: str = "qwen2-demo") -> str:
    body = json.dumps({"model": model, "prompt": "Hello, my name is", "max_tokens": 16})
    auth = f" -H {shlex.quote('Authorization: Bearer ' + args.api_key)}" if args.api_key else ""
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    return (f"curl -s http://{host}:{args.port}/v1/completions -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(body)}")


def grpc_address(args) -> str:
    return f"gRPC {args.host}:{args.grpc_port}" if args.grpc_port else "gRPC off"


def grpc_line(args, model: str = "qwen2-demo") -> str:
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    key = f" --api-key {shlex.quote(args.api_key)}" if args.api_key else ""
    return f"qwen2-serve client generate --target {host}:{args.grpc_port} --model {model}{key} --prompt 'Hello, my name is'"


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Ray 2.x maps a loopback node IP back to the routable one (services.resolve_ip_for_localhost) unless
# it believes clusters are off, which this variable says (it is also what Ray does on macOS/Windows):
# then the node IP is 127.0.0.1 and every Ray process binds its ports to it.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def local_ray_env(args) -> dict[str, str]:
    """Environment for the local Ray: loopback-only unless --host exposes the server or --address joins one."""
    if args.address or args.host not in LOOPBACK_HOSTS:
        return {}
    return dict(RAY_LOOPBACK_ENV)


# Ray Serve's direct ingress: each ingress replica serves HTTP and gRPC on ports of its own, taken from
# these ranges (upper bound excluded). The CLI's one Ingress replica gets exactly --port and --grpc-port.
DIRECT_INGRESS_ON = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DIRECT_INGRESS_HTTP = ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT")
DIRECT_INGRESS_GRPC = ("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT")
# Serve holds a stopping direct-ingress replica open this long (default 30 s) so a load balancer can
# take it out first; the CLI's replica has none in front of it.
DIRECT_INGRESS_DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def direct_ingress_env(args, ports: int = 1) -> dict[str, str]:
    """Environment for the local Ray that puts the Ingress replica itself on --port and --grpc-port
    (docs/architecture.md "Direct ingress"): a request then crosses client -> Ingress -> Router
    instead of client -> proxy -> Ingress -> Router, and each streamed token one Ray hop fewer.
    Empty with --direct-ingress off, and with --address (a cluster's processes keep their own
    environment: an operator sets these variables on `ray start`). `ports`: the width of each range
    from the user's port (one per ingress replica; the CLI runs one)."""
    if args.address or getattr(args, "direct_ingress", "on") != "on":
        return {}
    env = {DIRECT_INGRESS_ON: "1", DIRECT_INGRESS_HTTP[0]: str(args.port), DIRECT_INGRESS_HTTP[1]: str(args.port + ports),
           DIRECT_INGRESS_DRAIN: "0"}
    if args.grpc_port:
        env.update({DIRECT_INGRESS_GRPC[0]: str(args.grpc_port), DIRECT_INGRESS_GRPC[1]: str(args.grpc_port + ports)})
    return env


# Ray Serve's periodic work, slowed where a local box gains from it: the controller's reconcile loop
# (default every 0.1 s: ~30 ms of CPU a second, the largest share of an idle server's ~105; at 32
# streams it took ~16 ms/s every 0.5 s and ~13 every 1 s, and the GCS calls it makes fall with it)
# and each replica's and handle's export of cached Serve metrics (default 0.1 s; Ray's metrics agent
# reports every 10 s anyway). On a machine the model fills, every millisecond another process runs
# stalls the model's OpenMP threads (docs/architecture.md "The served path under load"). Ray's log
# monitor globs the session's log folder for new files on every 0.1 s pass while it holds fewer than
# the threshold's files (1000); with 0 it globs every 0.5 s (LOG_NAME_UPDATE_INTERVAL_S) and still
# forwards new lines of the files it knows every 0.1 s: 9.0 -> 4.3 ms of CPU a second on an idle
# demo server.
SERVE_CONTROL_LOOP = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"
SERVE_METRICS_EXPORT = "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"
LOG_MONITOR_GLOB = "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"
# The raylet's 100 ms timers (250 ms for the memory monitor), every 1 s instead: resource reports to
# the GCS, the memory-pressure GC check, the object manager's timer (transfers between nodes: none
# on one box), the OOM monitor, reaping idle workers, the object store's disk check. On an idle demo
# server the raylet woke 63-66 times a second instead of 108-114 and took 4.2 instead of 8.0-9.3 ms
# of CPU a second; at 32 streams 4.0-4.6 instead of 7.7-8.7 (docs/architecture.md).
RAYLET_TIMERS = {f"RAY_{name}": "1000" for name in (
    "raylet_report_resources_period_milliseconds", "raylet_check_gc_period_milliseconds",
    "object_manager_timer_freq_ms", "memory_monitor_refresh_ms", "kill_idle_workers_interval_ms",
    "local_fs_monitor_interval_ms")}
QUIET_SERVE_ENV = {SERVE_CONTROL_LOOP: "1.0", SERVE_METRICS_EXPORT: "1000", LOG_MONITOR_GLOB: "0", **RAYLET_TIMERS}


def quiet_serve_env(args) -> dict[str, str]:
    """Environment for the local Ray that cuts Serve's background CPU (QUIET_SERVE_ENV); empty with
    --address (a cluster's processes keep their own environment). A variable already set wins."""
    if args.address:
        return {}
    return {k: v for k, v in QUIET_SERVE_ENV.items() if k not in os.environ}


def proxy_ports(args, direct: bool) -> tuple[int, int]:
    """(HTTP, gRPC) ports of Serve's proxy. With direct ingress Serve still starts a proxy on the
    head node; it gets free ports of its own and the Ingress replica takes the user's (gRPC 0: off)."""
    if not direct:
        return args.port, args.grpc_port
    return _free_port(args.host), (_free_port("0.0.0.0") if args.grpc_port else 0)


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_and_block(app_args: dict, args, banner) -> int:
    env = local_ray_env(args)
    direct = direct_ingress_env(args)
    os.environ.update({**env, **direct, **quiet_serve_env(args)})  # before Ray reads it, and inherited by Ray's processes
    from deployments.admission import PROXY_CALLBACK_ENV

    for key, value in PROXY_CALLBACK_ENV.items():  # queue-full refused in Serve's proxy (deployments/admission.py)
        os.environ.setdefault(key, value)
    if not args.address and getattr(args, "frontend_cpu_priority", "idle") == "idle":  # deployments/cpu_priority.py
        from deployments.cpu_priority import ENV, IDLE
        os.environ.setdefault(ENV, IDLE)
    import ray
    from ray import serve

    if env:
        import ray._private.ray_constants as ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the variable was set

    from deployments.app import build_app

    # Demo checkpoints are written (or found) here, before Ray starts, so errors read plainly.
    app = build_app(app_args)
    # address="local": always a fresh local cluster, never one some other `ray start` left running.
    init_kwargs = {"address": "local", "_metrics_export_port": args.metrics_port, "include_dashboard": False}
    if args.address:
        init_kwargs = {"address": args.address}
    elif args.num_cpus:
        init_kwargs["num_cpus"] = args.num_cpus
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(**init_kwargs)
    try:
        http_port, grpc_port = proxy_ports(args, bool(direct))
        grpc_options = {"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICERS if args.grpc_port else []}
        serve.start(http_options={"host": args.host, "port": http_port}, grpc_options=grpc_options)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        banner()
        if args.address:
            print("Prometheus metrics: /metrics on the cluster's metrics export port (ray start --metrics-export-port)",
                  flush=True)
        else:
            print(f"Prometheus metrics: http://127.0.0.1:{args.metrics_port}/metrics", flush=True)
        if args.grpc_port and not args.api_key:
            print(f"Note: gRPC port {args.grpc_port} listens on all interfaces (Ray Serve's gRPC proxy has no bind "
                  f"address) and no API key is set: use --api-key, or --grpc-port 0, on a shared network.",
                  flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            pass
        print("Shutting down...", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print("Stopped.", flush=True)
    return 0


def cmd_demo(args) -> int:
    app_args = app_args_for_demo(args)

    def banner():
        print(f"qwen2-serve demo is up: HTTP http://{args.host}:{args.port}  {grpc_address(args)}", flush=True)
        print("Models: " + ", ".join(name for name, _ in DEMO_MODELS) + " (tiny random weights: the text is noise)")
        print("Try:")
        print(f"  {curl_line(args)}")
        if args.grpc_port:
            print(f"  {grpc_line(args)}", flush=True)

    return serve_and_block(app_args, args, banner)


def cmd_run(args) -> int:
    app_args = app_args_for_run(args)
    first = app_args["models"][0]["name"]

    def banner():
        print(f"qwen2-serve is up: HTTP http://{args.host}:{args.port}  {grpc_address(args)}", flush=True)
        print("Models: " + ", ".join(m["name"] for m in app_args["models"]))
        print("Try:")
        print(f"  {curl_line(args, first)}", flush=True)

    return serve_and_block(app_args, args, banner)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
