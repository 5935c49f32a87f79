"""`build_app(args)`: the Serve application, the import path of serve_config.yaml and the CLI.

    import_path: deployments.app:build_app
    args:
      api_key: null                 # or a key: every route but /health and /ready then needs it
      max_body_bytes: 1048576
      request_timeout_s: 600
      ingress: {num_replicas: 1}    # Serve options of the Ingress deployment
      models:
        - name: qwen2-demo
          path: demo:causal_lm      # a checkpoint directory, or demo:<head> (written on first use)
          tp: 1
          dtype: null               # default: the checkpoint's torch_dtype
          device: null              # default: cuda when present, else cpu
          kv_cache_memory: 268435456
          gpu_memory_fraction: null # CUDA: KV cache = this fraction of free GPU memory after loading (overrides kv_cache_memory)
          block_size: 16
          quantization: null        # int8: weight-only int8 at load (GPTQ/AWQ checkpoints need nothing)
          hf_overrides: null        # config.json fields to replace, e.g. {rope_scaling: {rope_type: yarn, ...}}
          engine: {max_model_len: 2048, max_num_seqs: 64, ...}   # EngineConfig fields
          deployment: {num_replicas: 1, user_config: {...}, ...} # Serve options of this Router
          loras: {sql: /adapters/sql}  # LoRA adapters (PEFT dirs) by name; requests say model "sql" or "qwen2-demo:sql"
          lora_dir: null            # a directory whose subdirectories are adapters loaded on demand by name
          max_loras_per_replica: null  # adapters one Router replica holds (LRU; default engine.max_loras = 4)

      limits: {max_n: 16, max_logprobs: 20, ...}  # deployments/frontend/requests.py Limits: checked
                                    # by the ingress and, for sampling, by every Router's engine

One Router deployment per model (`router-<name>`; tp > 1 gang-schedules the replica and its TP
workers in one STRICT_PACK placement group), and one Ingress deployment: the FastAPI app
(deployments/http_api) plus the gRPC methods (deployments/grpc_api), both over one Frontend
(deployments/frontend). In serve_config.yaml, per-deployment settings can also be given under
`deployments:` by name. Nothing is built when this module is imported: `build_app` builds the
FastAPI app and the deployments. Paths (`demo:<head>` too): deployments/checkpoints.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve

from deployments.lora_adapters import AdapterCatalog
from deployments.checkpoints import model_facts, resolve_model_path
from deployments.frontend.core import DEFAULT_ROUTER_STREAM, Frontend, ModelEntry, check_router_stream
from deployments.frontend.reasoning import PARSERS as REASONING_PARSERS
from deployments.frontend.requests import Limits
from deployments.grpc_api.servicer import GrpcIngressMixin
from deployments.http_api import app as http_app
from deployments.router import Router
from qwen2_model.hardware import with_huge_pages

MODEL_KEYS = {"name", "path", "tp", "dtype", "device", "kv_cache_memory", "gpu_memory_fraction", "block_size",
              "engine", "deployment", "reasoning_parser", "quantization", "hf_overrides",
              "pooled_batch_wait_ms", "pooled_max_batch_size", "torch_threads", "num_replicas", "user_config",
              "ray_actor_options", "autoscaling_config", "max_ongoing_requests",
              "loras", "lora_dir", "max_loras_per_replica"}
APP_KEYS = {"models", "api_key", "max_body_bytes", "request_timeout_s", "ingress", "limits", "router_stream",
            "shared_stream"}
DEFAULT_ROUTER_OPTIONS = {"max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.25},
                          "health_check_period_s": 10}
DEFAULT_INGRESS_OPTIONS = {"max_ongoing_requests": 512, "ray_actor_options": {"num_cpus": 0.1}}


class Ingress(GrpcIngressMixin):
    """HTTP (FastAPI) and gRPC over one Frontend; `routers` maps model name -> Router handle.
    (`build_app` makes it a Serve deployment with the FastAPI app as its ingress.)"""

    def __init__(self, models: list[dict], routers: dict, api_key: str | None = None,
                 limits: dict | None = None, request_timeout_s: float = 600,
                 router_stream: str = DEFAULT_ROUTER_STREAM, shared_stream: bool = True):
        from deployments.cpu_priority import yield_cpu_to_model
        from qwen2_model.generation_config import read_generation_config
        from qwen2_model.tokenizer import Qwen2Tokenizer

        yield_cpu_to_model()  # on a machine the model fills, when the CLI asks (deployments/cpu_priority.py)

        entries = []
        for m in models:
            facts = model_facts(m["path"], m.get("engine"), m.get("hf_overrides"))
            entries.append(ModelEntry(name=m["name"], path=str(facts.path), architecture=facts.architecture,
                                      task=facts.task, tokenizer=Qwen2Tokenizer.from_pretrained(facts.path),
                                      router=routers[m["name"]], max_model_len=facts.max_model_len,
                                      id2label=facts.id2label, vocab_size=facts.vocab_size,
                                      step_tag_id=facts.step_tag_id,
                                      sampling_defaults=read_generation_config(facts.path).sampling_defaults(),
                                      reasoning_parser=m.get("reasoning_parser")))
        self.api_key = api_key or None
        adapters = {m["name"]: AdapterCatalog.from_config(m["name"], m.get("loras"), m.get("lora_dir"))
                    for m in models}
        self.frontend = Frontend(entries, Limits(**(limits or {})), request_timeout_s=request_timeout_s,
                                 adapters=adapters, router_stream=router_stream, shared_stream=shared_stream)
        http_app.bind(self.frontend, api_key=self.api_key)


def _with_huge_pages(actor_options: dict | None) -> dict:
    """The Router's actor options with its runtime_env's env_vars carrying hardware.HUGE_PAGES_ENV
    (the variable must be there when the worker process starts; an operator's own value wins)."""
    options = dict(actor_options or {})
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = with_huge_pages(runtime_env.get("env_vars"))
    options["runtime_env"] = runtime_env
    return options


def _router_options(m: dict) -> dict[str, Any]:
    opts: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_ROUTER_OPTIONS.items()}
    for key in ("num_replicas", "user_config", "ray_actor_options", "autoscaling_config", "max_ongoing_requests"):
        if m.get(key) is not None:
            opts[key] = m[key]
    opts.update(m.get("deployment") or {})
    opts["ray_actor_options"] = _with_huge_pages(opts.get("ray_actor_options"))
    if opts.get("autoscaling_config"):
        opts.pop("num_replicas", None)
    tp = int(m.get("tp") or 1)
    if tp > 1:
        from deployments.workers import router_bundles

        use_gpu = (m.get("device") or ("cuda" if _cuda() else "cpu")).startswith("cuda")
        opts["placement_group_bundles"] = router_bundles(tp, use_gpu)
        opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


def _check_load_options(m: dict) -> None:
    """Fail on the driver, naming the model and the problem, before any replica starts: hf_overrides
    that do not make a valid config, a max_model_len above the (RoPE-scaled) context, an unknown
    --quantization, or one on an already quantized checkpoint."""
    from qwen2_model.config import ConfigError
    from qwen2_model.loading import quantization_scheme

    overrides = m.get("hf_overrides")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"model {m['name']!r}: hf_overrides must be a mapping of config.json fields, got {overrides!r}")
    try:
        facts = model_facts(m["path"], m.get("engine"), overrides)
        from qwen2_model.config import Qwen2Config
        quantization_scheme(Qwen2Config.from_pretrained(facts.path, overrides=overrides), m.get("quantization"))
    except ConfigError as exc:
        raise ValueError(f"model {m['name']!r}: {exc}") from None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_app(args: dict) -> serve.Application:
    args = dict(args or {})
    unknown = set(args) - APP_KEYS
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; known: {sorted(APP_KEYS)}")
    router_stream = check_router_stream(args.get("router_stream") or DEFAULT_ROUTER_STREAM)
    shared_stream = args.get("shared_stream", True)
    if not isinstance(shared_stream, bool):
        raise ValueError(f"shared_stream must be true or false, got {shared_stream!r}")
    models = list(args.get("models") or [])
    if not models:
        raise ValueError("args.models: give at least one model ({name, path})")
    limits = dict(args.get("limits") or {})
    if args.get("max_body_bytes") is not None:
        limits["max_body_bytes"] = int(args["max_body_bytes"])
    known_limits = {f.name for f in dataclasses.fields(Limits)}
    if set(limits) - known_limits:
        raise ValueError(f"unknown limits {sorted(set(limits) - known_limits)}; known: {sorted(known_limits)}")
    routers, cleaned = {}, []
    for m in models:
        m = dict(m)
        bad = set(m) - MODEL_KEYS
        if bad:
            raise ValueError(f"model {m.get('name')!r}: unknown keys {sorted(bad)}; known: {sorted(MODEL_KEYS)}")
        if not m.get("name") or not m.get("path"):
            raise ValueError(f"each model needs a name and a path, got {m}")
        if m["name"] in routers:
            raise ValueError(f"duplicate model name {m['name']!r}")
        resolve_model_path(m["path"])  # fail early, and write demo checkpoints on the driver
        _check_load_options(m)
        kwargs = {k: m[k] for k in ("tp", "dtype", "device", "kv_cache_memory", "gpu_memory_fraction", "block_size",
                                    "engine", "quantization", "hf_overrides",
                                    "pooled_batch_wait_ms", "pooled_max_batch_size", "torch_threads",
                                    "loras", "lora_dir", "max_loras_per_replica")
                  if m.get(k) is not None}
        routers[m["name"]] = serve.deployment(Router).options(name=f"router-{m['name']}", **_router_options(m)).bind(
            m["name"], str(m["path"]), limits=limits, **kwargs)
        if m.get("reasoning_parser") not in (None, *REASONING_PARSERS):
            raise ValueError(f"model {m['name']!r}: reasoning_parser must be one of {list(REASONING_PARSERS)}, "
                             f"got {m['reasoning_parser']!r}")
        # LoRA adapters: checked here (names, base collisions) so a bad config fails at start-up
        AdapterCatalog.from_config(m["name"], m.get("loras"), m.get("lora_dir"))
        cleaned.append({"name": m["name"], "path": str(m["path"]), "engine": m.get("engine") or {},
                        "reasoning_parser": m.get("reasoning_parser"),
                        "loras": m.get("loras"), "lora_dir": m.get("lora_dir"),
                        "hf_overrides": m.get("hf_overrides")})
    ingress = serve.deployment(name="Ingress", **DEFAULT_INGRESS_OPTIONS)(serve.ingress(http_app.create_app())(Ingress))
    ingress = ingress.options(**(args.get("ingress") or {}))
    return ingress.bind(cleaned, routers, api_key=args.get("api_key"), limits=limits,
                        request_timeout_s=float(args.get("request_timeout_s") or 600), router_stream=router_stream,
                        shared_stream=shared_stream)
