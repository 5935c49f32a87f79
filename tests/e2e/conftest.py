"""The shared e2e app: real local Ray + Serve running deployments.app:build_app on free ports.

`serve_app` (session scope) starts Ray (`ray.init(num_cpus=4)`) and Serve as `qwen2-serve run` does by
default (direct ingress: the Ingress replica answers HTTP and gRPC itself on `http_url` /
`grpc_target`; Serve's proxies serve the same app on `proxy_http_url` / `proxy_grpc_target`;
QWEN2_SERVE_E2E_INGRESS=proxy puts the proxies on `http_url` / `grpc_target`, as
`--direct-ingress off`),
serves four tiny random models (a causal LM, a sequence classifier, a token classifier, an
extractive QA model) that require the API key `serve_app.api_key`, yields a `ServeApp`, and
shuts Serve and Ray down at the end of the session. Tests talk to it with real clients only.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

API_KEY = "test-key-0123"
APP_NAME = "qwen2"
GRPC_SERVICERS = [
    "deployments.grpc_api.raw.add_Qwen2ServeServicer_to_server",  # raw request bytes: undecodable -> INVALID_ARGUMENT
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",  # standard grpc.health.v1 Check
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """The first of `n` consecutive ports that are free now (on all interfaces: gRPC binds there)."""
    for _ in range(200):
        first = free_port()
        if first + n > 65535:
            continue
        held = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                held.append(s)
                s.bind(("", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


@dataclass
class ServeApp:
    http_url: str  # "http://127.0.0.1:PORT"
    grpc_target: str  # "127.0.0.1:PORT"
    api_key: str  # every route but /health and /ready needs "Authorization: Bearer <api_key>"
    generate_model: str  # causal LM
    classify_model: str  # sequence classification
    ner_model: str  # token classification
    qa_model: str  # extractive QA
    checkpoints: dict[str, Path] = field(default_factory=dict)  # model name -> checkpoint dir
    max_model_len: int = 1024
    max_body_bytes: int = 256 * 1024
    app_name: str = APP_NAME
    metrics_url: str = ""  # "http://127.0.0.1:PORT/metrics": Ray's Prometheus endpoint (deployments/metrics.py)
    proxy_http_url: str = ""  # Serve's proxy, serving the same app (= http_url with QWEN2_SERVE_E2E_INGRESS=proxy)
    proxy_grpc_target: str = ""

    @property
    def model_names(self) -> list[str]:
        return [self.generate_model, self.classify_model, self.ner_model, self.qa_model]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def router(self, model: str):
        """A Serve handle to the model's Router deployment (stats/info/reconfigure)."""
        from ray import serve
        return serve.get_deployment_handle(f"router-{model}", app_name=self.app_name)

    def router_stats(self, model: str) -> dict:
        return self.router(model).stats.remote().result(timeout_s=30)

    def run_app(self, name: str, args: dict, timeout_s: float = 120) -> str:
        """Deploy another application (deployments.app's `build_app(args)`) on this session's Ray at
        /<name>, wait until it is ready and return its URL. Through Serve's proxy, which routes by prefix:
        an Ingress replica serves only its own app. The caller deletes it (`serve.delete(name)`)."""
        import httpx
        from ray import serve

        from deployments.app import build_app

        serve.run(build_app(args), name=name, route_prefix=f"/{name}")
        url = f"{self.proxy_http_url}/{name}"
        deadline = time.time() + timeout_s
        while httpx.get(f"{url}/ready", timeout=30).status_code != 200:
            assert time.time() < deadline, f"the {name} app did not become ready"
            time.sleep(0.5)
        return url


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory):
    import httpx
    import ray
    from ray import serve

    home = tmp_path_factory.mktemp("qwen2-serve-home")
    os.environ["QWEN2_SERVE_HOME"] = str(home)
    from deployments.app import build_app
    from deployments.checkpoints import demo_checkpoint

    names = {"generate": "qwen2-demo", "classify": "qwen2-demo-classifier", "ner": "qwen2-demo-ner",
             "qa": "qwen2-demo-qa"}
    heads = {"generate": "causal_lm", "classify": "sequence_classification", "ner": "token_classification",
             "qa": "question_answering"}
    checkpoints = {names[k]: demo_checkpoint(heads[k]) for k in names}
    # Served as `qwen2-serve run` serves by default (--direct-ingress on, deployments/cli.py): the
    # Ingress replica itself on http_url / grpc_target, Serve's proxy on proxy_http_url /
    # proxy_grpc_target. QWEN2_SERVE_E2E_INGRESS=proxy: the proxy on both, as --direct-ingress off.
    direct = os.environ.get("QWEN2_SERVE_E2E_INGRESS", "direct") == "direct"
    # Every ingress replica takes a port of the direct-ingress ranges (tests add applications of
    # their own): a block of free ports each, the session's app getting the first.
    http_port, grpc_port = free_ports(8), free_ports(8)
    metrics_port, proxy_http_port, proxy_grpc_port = free_port(), free_port(), free_port()
    if direct:
        from deployments.cli import direct_ingress_env
        os.environ.update(direct_ingress_env(argparse.Namespace(address=None, direct_ingress="on", port=http_port,
                                                                grpc_port=grpc_port), ports=8))
    else:
        proxy_http_port, proxy_grpc_port = http_port, grpc_port
    from deployments.cli import quiet_serve_env
    os.environ.update(quiet_serve_env(argparse.Namespace(address=None)))  # Serve's background work, as the CLI
    app = ServeApp(http_url=f"http://127.0.0.1:{http_port}", grpc_target=f"127.0.0.1:{grpc_port}", api_key=API_KEY,
                   generate_model=names["generate"], classify_model=names["classify"], ner_model=names["ner"],
                   qa_model=names["qa"], checkpoints=checkpoints,
                   metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                   proxy_http_url=f"http://127.0.0.1:{proxy_http_port}", proxy_grpc_target=f"127.0.0.1:{proxy_grpc_port}")
    args = {
        "api_key": API_KEY,
        "max_body_bytes": app.max_body_bytes,
        "request_timeout_s": 120,
        "models": [{"name": name, "path": str(path), "kv_cache_memory": 8 << 20, "torch_threads": 1,
                    "engine": {"max_model_len": app.max_model_len}, "pooled_batch_wait_ms": 20}
                   for name, path in checkpoints.items()],
    }
    # Queue-full refused in Serve's HTTP proxy (deployments/admission.py), as the CLI does.
    from deployments.admission import PROXY_CALLBACK_ENV
    for key, value in PROXY_CALLBACK_ENV.items():
        os.environ.setdefault(key, value)
    # Metrics: exported on metrics_port, pushed to the exporter every second (default 10 s).
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"QWEN2_SERVE_HOME": str(home)}}, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_http_port},
                    grpc_options={"port": proxy_grpc_port, "grpc_servicer_functions": GRPC_SERVICERS})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{app.http_url}/ready", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the e2e app did not become ready")
            time.sleep(0.5)
        yield app
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tensor-parallel tests first: they start and stop their own Ray, which cannot share a driver
    with the session-wide `serve_app` Ray once that has started."""
    items.sort(key=lambda item: 0 if item.path.name.startswith("test_tp") else 1)  # test_tp.py, test_tp_lora.py, test_tp_quantized.py
