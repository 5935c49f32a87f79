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
          engine: {max_model_len: 2048, max_num_seqs: 64, ...}   # EngineConfig fields
          deployment: {num_replicas: 1, user_config: {...}, ...} # Serve options of this Router

One Router deployment per model (`router-<name>`; tp > 1 gang-schedules the replica and its TP
workers in one STRICT_PACK placement group), and one Ingress deployment: the FastAPI app
(deployments/http_ingress.py) plus the gRPC methods (GrpcIngressMixin), both over one Frontend.
In serve_config.yaml, per-deployment settings can also be given under `deployments:` by name.

`demo:<head>` paths resolve to `$QWEN2_SERVE_HOME/demo/<head>` (default ~/.cache/qwen2-serve),
written once with qwen2_model.testing.write_random_checkpoint (tiny preset), race-safe.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray import serve

from deployments.grpc_ingress import GrpcIngressMixin
from deployments.http_ingress import app as fastapi_app
from deployments.http_ingress import bind as bind_http
from deployments.router import Router

DEMO_HEADS = ("causal_lm", "sequence_classification", "token_classification", "question_answering", "base")
MODEL_KEYS = {"name", "path", "tp", "dtype", "device", "kv_cache_memory", "gpu_memory_fraction", "block_size",
              "engine", "deployment",
              "pooled_batch_wait_ms", "pooled_max_batch_size", "torch_threads", "num_replicas", "user_config",
              "ray_actor_options", "autoscaling_config", "max_ongoing_requests"}
APP_KEYS = {"models", "api_key", "max_body_bytes", "request_timeout_s", "ingress", "limits"}
DEFAULT_ROUTER_OPTIONS = {"max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.25},
                          "health_check_period_s": 10}
DEFAULT_INGRESS_OPTIONS = {"max_ongoing_requests": 512, "ray_actor_options": {"num_cpus": 0.1}}


def qwen2_serve_home() -> Path:
    return Path(os.environ.get("QWEN2_SERVE_HOME") or Path.home() / ".cache" / "qwen2-serve")


def demo_checkpoint(head: str) -> Path:
    """The embedded demo checkpoint for `head`, written on first use (idempotent, race-safe)."""
    if head not in DEMO_HEADS:
        raise ValueError(f"demo:{head}: unknown head; choose one of {', '.join(DEMO_HEADS)}")
    from qwen2_model.testing import write_random_checkpoint

    target = qwen2_serve_home() / "demo" / head
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{head}-", dir=target.parent))
    try:
        # The model's vocab = the tokenizer's, so the random demo model only emits decodable ids.
        from qwen2_model.testing import write_tokenizer
        tok_dir = tmp / "tok"
        tok_dir.mkdir()
        size = write_tokenizer(tok_dir, None)["size"]
        write_random_checkpoint(tmp, preset="tiny", head=head, tokenizer_dir=tok_dir, vocab_size=size)
        shutil.rmtree(tok_dir)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(path: str | os.PathLike) -> Path:
    path = str(path)
    if path.startswith("demo:"):
        return demo_checkpoint(path.split(":", 1)[1])
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {p} (config.json missing); give a Hugging Face checkpoint "
                                f"directory or demo:<head> ({', '.join(DEMO_HEADS)})")
    return p.resolve()


def _task_of(path: Path) -> tuple[str, dict[int, str], int, int]:
    from qwen2_model.config import Qwen2Config
    from deployments.frontend import TASK_BY_ARCHITECTURE

    config = Qwen2Config.from_pretrained(path)
    return TASK_BY_ARCHITECTURE.get(config.architecture, "generate"), dict(config.id2label), \
        config.max_position_embeddings, config.vocab_size


@serve.deployment(name="Ingress", **DEFAULT_INGRESS_OPTIONS)
@serve.ingress(fastapi_app)
class Ingress(GrpcIngressMixin):
    """HTTP (FastAPI) and gRPC over one Frontend; `routers` maps model name -> Router handle."""

    def __init__(self, models: list[dict], routers: dict, api_key: str | None = None,
                 limits: dict | None = None, request_timeout_s: float = 600):
        from deployments.frontend import Frontend, ModelEntry
        from deployments.protocol import Limits
        from qwen2_model.tokenizer import Qwen2Tokenizer

        entries = []
        for m in models:
            path = resolve_model_path(m["path"])
            task, id2label, max_pos, vocab_size = _task_of(path)
            max_model_len = int((m.get("engine") or {}).get("max_model_len") or max_pos)
            entries.append(ModelEntry(name=m["name"], path=str(path), task=task,
                                      tokenizer=Qwen2Tokenizer.from_pretrained(path), router=routers[m["name"]],
                                      max_model_len=max_model_len, id2label=id2label, vocab_size=vocab_size))
        self.api_key = api_key or None
        self.frontend = Frontend(entries, Limits(**(limits or {})), request_timeout_s=request_timeout_s)
        bind_http(self.frontend, api_key=self.api_key)


def _router_options(m: dict) -> dict[str, Any]:
    opts: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_ROUTER_OPTIONS.items()}
    for key in ("num_replicas", "user_config", "ray_actor_options", "autoscaling_config", "max_ongoing_requests"):
        if m.get(key) is not None:
            opts[key] = m[key]
    opts.update(m.get("deployment") or {})
    if opts.get("autoscaling_config"):
        opts.pop("num_replicas", None)
    tp = int(m.get("tp") or 1)
    if tp > 1:
        try:
            from deployments.workers import router_bundles
        except ImportError as exc:
            raise RuntimeError(f"model {m['name']!r}: tp={tp} needs deployments.workers (tensor-parallel workers), "
                               f"which is not available: {exc}") from exc
        use_gpu = (m.get("device") or ("cuda" if _cuda() else "cpu")).startswith("cuda")
        opts["placement_group_bundles"] = router_bundles(tp, use_gpu)
        opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def build_app(args: dict) -> serve.Application:
    args = dict(args or {})
    unknown = set(args) - APP_KEYS
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; known: {sorted(APP_KEYS)}")
    models = list(args.get("models") or [])
    if not models:
        raise ValueError("args.models: give at least one model ({name, path})")
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
        kwargs = {k: m[k] for k in ("tp", "dtype", "device", "kv_cache_memory", "gpu_memory_fraction", "block_size",
                                    "engine",
                                    "pooled_batch_wait_ms", "pooled_max_batch_size", "torch_threads")
                  if m.get(k) is not None}
        routers[m["name"]] = _router_deployment().options(name=f"router-{m['name']}", **_router_options(m)).bind(
            m["name"], str(m["path"]), **kwargs)
        cleaned.append({"name": m["name"], "path": str(m["path"]), "engine": m.get("engine") or {}})
    limits = dict(args.get("limits") or {})
    if args.get("max_body_bytes") is not None:
        limits["max_body_bytes"] = int(args["max_body_bytes"])
    ingress = Ingress.options(**(args.get("ingress") or {}))
    return ingress.bind(cleaned, routers, api_key=args.get("api_key"), limits=limits,
                        request_timeout_s=float(args.get("request_timeout_s") or 600))


def _router_deployment():
    return serve.deployment(Router)
