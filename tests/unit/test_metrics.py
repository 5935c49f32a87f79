"""deployments/metrics.py without Ray: the definitions match DESIGN.md, the recorders record what
they should (through MemoryBackend), the engine's step observer hook, and the monitoring files
(Grafana dashboard, Prometheus scrape config) only query metrics that exist."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from deployments import metrics
from deployments.metrics import BY_NAME, SPECS, GenerationMetrics, RouterMetrics
from tests.memory_metrics import MemoryBackend

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deployments" / "monitoring"

# DESIGN.md "Metrics", each item -> our name
DESIGN = {
    "histogram": ["qwen2_time_to_first_token_seconds", "qwen2_inter_token_latency_seconds",
                  "qwen2_e2e_request_latency_seconds", "qwen2_request_queue_time_seconds",
                  "qwen2_prefill_step_seconds", "qwen2_decode_step_seconds", "qwen2_request_prompt_tokens",
                  "qwen2_request_generation_tokens", "qwen2_batch_size_sequences", "qwen2_batch_size_tokens"],
    "gauge": ["qwen2_num_running_sequences", "qwen2_num_waiting_sequences", "qwen2_kv_cache_usage_ratio",
              "qwen2_tp_workers_alive"],
    "counter": ["qwen2_requests", "qwen2_errors", "qwen2_prompt_tokens", "qwen2_generation_tokens",
                "qwen2_prefix_cache_queries", "qwen2_prefix_cache_hits", "qwen2_preemptions"],
}


@pytest.fixture
def backend():
    mem = MemoryBackend()
    previous = metrics.set_backend(mem)
    yield mem
    metrics.set_backend(previous)


def test_definitions_match_design():
    assert {k: sorted(s.name for s in SPECS if s.kind == k) for k in DESIGN} == \
        {k: sorted(v) for k, v in DESIGN.items()}
    assert len(BY_NAME) == len(SPECS)
    for s in SPECS:
        assert s.name.startswith("qwen2_") and s.tag_keys[0] == "model", s
        assert s.description and s.where in ("ingress", "router")
        assert not s.name.endswith("_total")  # Ray adds _total to counters
        assert s.exported == "ray_" + s.name + ("_total" if s.kind == "counter" else "")
        if s.kind == "histogram":
            b = s.boundaries
            assert b and list(b) == sorted(set(b)) and b[0] > 0, s
        else:
            assert s.boundaries is None
    assert BY_NAME["qwen2_requests"].tag_keys == ("model", "finish_reason")
    assert BY_NAME["qwen2_errors"].tag_keys == ("model", "code")


def test_buckets_fit_llm_serving():
    ttft = BY_NAME["qwen2_time_to_first_token_seconds"].boundaries
    assert ttft[0] <= 0.01 and ttft[-1] >= 300  # milliseconds to minutes
    itl = BY_NAME["qwen2_inter_token_latency_seconds"].boundaries
    assert itl[0] <= 0.001 and itl[-1] >= 10
    tokens = BY_NAME["qwen2_request_prompt_tokens"].boundaries
    assert tokens[0] == 1 and tokens[-1] >= 131072  # Qwen2's longest context


def test_ray_metrics_work_without_ray():
    # Every metric's ray.serve.metrics object builds and records without a cluster (no-ops there).
    # Called directly: `_record` swallows errors, so going through it could not fail.
    record = {"counter": "inc", "gauge": "set", "histogram": "observe"}
    for spec in SPECS:
        obj = metrics.ray_backend(spec)
        getattr(obj, record[spec.kind])(1.0, tags={k: "x" for k in spec.tag_keys})
    # And through the module's recorders, nothing was logged as failed.
    metrics._failed.clear()
    metrics.inc("qwen2_requests", 1, "m", finish_reason="stop")
    metrics.observe("qwen2_time_to_first_token_seconds", 0.1, "m")
    metrics.set_gauge("qwen2_kv_cache_usage_ratio", 0.5, "m")
    metrics.count_error("invalid_request")
    assert not metrics._failed


def test_generation_metrics(backend):
    rm = GenerationMetrics("m", num_prompt_tokens=7, start=time.monotonic() - 0.25)
    rm.on_output(0, 1)
    rm.on_output(1, 1)
    rm.on_output(0, 1)
    rm.on_output(0, 2)
    rm.on_output(1, 0)  # an abort output: no token
    rm.on_choice_end("length")
    rm.on_choice_end("abort")
    rm.on_request_end(completed=True)
    assert backend.total("qwen2_prompt_tokens", model="m") == 7  # once, at the first output
    assert backend.total("qwen2_generation_tokens", model="m") == 5
    assert backend.count("qwen2_time_to_first_token_seconds") == 1
    assert backend.last("qwen2_time_to_first_token_seconds") >= 0.25
    # one per token after a choice's first: choice 0 has 4 tokens (the last two in one message), choice 1 one
    assert backend.count("qwen2_inter_token_latency_seconds") == 3
    assert backend.total("qwen2_requests", finish_reason="length") == 1
    assert backend.total("qwen2_requests", finish_reason="abort") == 1
    assert backend.count("qwen2_e2e_request_latency_seconds") == 1
    assert backend.last("qwen2_request_prompt_tokens") == 7
    assert backend.last("qwen2_request_generation_tokens") == 5


def test_inter_token_latency_counts_every_token_of_a_coalesced_message(backend):
    """The engine coalesces a choice's queued outputs into one message when the consumer falls
    behind: the histogram still counts tokens - 1 per choice, and the gap is split over the tokens."""
    rm = GenerationMetrics("m", num_prompt_tokens=3)
    rm.on_output(0, 3)  # first message: 3 tokens that arrived together -> 2 gaps of 0 s
    assert backend.count("qwen2_inter_token_latency_seconds") == 2
    assert backend.last("qwen2_inter_token_latency_seconds") == 0.0
    rm.last_token_at[0] -= 0.4  # the next message comes 0.4 s later with 4 tokens
    rm.on_output(0, 4)
    assert backend.count("qwen2_inter_token_latency_seconds") == 6
    assert 0.1 <= backend.last("qwen2_inter_token_latency_seconds") < 0.2


def test_generation_metrics_failed_before_prefill(backend):
    rm = GenerationMetrics("m", num_prompt_tokens=7)
    rm.on_choice_end("abort")
    rm.on_request_end(completed=False)
    assert backend.total("qwen2_prompt_tokens") == 0
    assert backend.count("qwen2_e2e_request_latency_seconds") == 0
    assert backend.count("qwen2_request_prompt_tokens") == 0


def test_errors_and_pooled(backend):
    import contextvars

    def request():
        metrics.count_error("invalid_request")  # before any model was resolved
        metrics.set_request_model("served")
        metrics.count_error("queue_full")

    contextvars.copy_context().run(request)
    assert backend.values["qwen2_errors"] == [(1, {"model": "", "code": "invalid_request"}),
                                              (1, {"model": "served", "code": "queue_full"})]
    metrics.record_pooled("cls", 12, time.monotonic())
    assert backend.total("qwen2_requests", model="cls", finish_reason="pooled") == 1
    assert backend.total("qwen2_prompt_tokens", model="cls") == 12
    assert backend.count("qwen2_e2e_request_latency_seconds", model="cls") == 1


def test_recording_failures_are_swallowed():
    class Broken:
        def __call__(self, spec):
            raise RuntimeError("no metrics today")

    previous = metrics.set_backend(Broken())
    try:
        metrics.inc("qwen2_requests", 1, "m", finish_reason="stop")
        GenerationMetrics("m", 3).on_output(0, 1)
    finally:
        metrics.set_backend(previous)


def test_router_metrics_flush(backend):
    from qwen2_model.engine.engine import StepRecord

    rm = RouterMetrics("m")
    rm.observe_step(StepRecord(0.2, 2, 30, 29, 1, [0.5, 0.25]))
    rm.observe_step(StepRecord(0.01, 2, 2, 0, 2, []))
    stats = SimpleNamespace(running=2, waiting=3, kv_usage=0.4, prefix_queries=10, prefix_hits=4, preemptions=1)
    rm.flush(stats, 1)
    assert backend.values["qwen2_prefill_step_seconds"] == [(0.2, {"model": "m"})]
    assert backend.values["qwen2_decode_step_seconds"] == [(0.01, {"model": "m"})]
    assert [v for v, _ in backend.values["qwen2_batch_size_sequences"]] == [2, 2]
    assert [v for v, _ in backend.values["qwen2_batch_size_tokens"]] == [30, 2]
    assert [v for v, _ in backend.values["qwen2_request_queue_time_seconds"]] == [0.5, 0.25]
    assert backend.last("qwen2_num_running_sequences") == 2
    assert backend.last("qwen2_num_waiting_sequences") == 3
    assert backend.last("qwen2_kv_cache_usage_ratio") == 0.4
    assert backend.last("qwen2_tp_workers_alive") == 1
    # cumulative engine counts -> increments by delta
    stats.prefix_queries, stats.prefix_hits = 15, 4
    rm.flush(stats, 0)
    assert [v for v, _ in backend.values["qwen2_prefix_cache_queries"]] == [10, 5]
    assert backend.total("qwen2_prefix_cache_hits") == 4
    assert backend.total("qwen2_preemptions") == 1
    assert backend.last("qwen2_tp_workers_alive") == 0
    assert backend.count("qwen2_prefill_step_seconds") == 1  # steps are recorded once


def test_router_metrics_thread(backend):
    stats = SimpleNamespace(running=1, waiting=0, kv_usage=0.1, prefix_queries=0, prefix_hits=0, preemptions=0)
    rm = RouterMetrics("m", interval_s=0.02)
    rm.start(lambda: stats, lambda: 2)
    deadline = time.time() + 5
    while backend.count("qwen2_tp_workers_alive") < 2 and time.time() < deadline:
        time.sleep(0.01)
    rm.stop()
    assert backend.last("qwen2_tp_workers_alive") == 2
    assert not rm._thread.is_alive()


def test_engine_step_observer(tmp_path):
    """The engine hands every step to its observers: queue time once per sequence, prefill vs decode."""
    from qwen2_model.engine.engine import Engine, EngineConfig
    from qwen2_model.engine.executor import LocalExecutor
    from qwen2_model.engine.sampling import SamplingParams
    from qwen2_model.testing import write_random_checkpoint

    write_random_checkpoint(tmp_path, preset="tiny")
    engine = Engine(LocalExecutor(tmp_path, kv_cache_memory=4 << 20),
                    EngineConfig(max_model_len=256, max_num_batched_tokens=16))
    records = []
    engine.step_observers.append(records.append)
    engine.step_observers.append(lambda r: 1 / 0)  # a broken observer must not stop the engine
    prompts = {"a": list(range(1, 40)), "b": list(range(5, 10))}
    out = engine.generate_all(prompts, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    assert all(len(v[0]) == 4 for v in out.values())
    assert len(records) == engine.stats.steps
    assert sum(len(r.queue_times) for r in records) == 2 and all(q >= 0 for r in records for q in r.queue_times)
    # prompt tokens are computed once each (chunked at 16), then every token but the last is decoded
    assert sum(r.prefill_tokens for r in records) == 39 + 5
    assert sum(r.decode_seqs for r in records) == 2 * 3
    assert sum(r.num_tokens for r in records) == 39 + 5 + 2 * 3
    assert all(r.num_seqs >= 1 and r.seconds > 0 for r in records)
    assert any(r.prefill_tokens == 0 for r in records)  # pure decode steps exist


# --- monitoring files ---------------------------------------------------------------------------

EXPORTED_SERIES = {name for s in SPECS for name in s.series}


def _queried_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(ray_qwen2_[a-z0-9_]+)", expr))


def test_grafana_dashboard_queries_existing_metrics():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = set().union(*(_queried_names(e) for e in exprs))
    assert used and used <= EXPORTED_SERIES, used - EXPORTED_SERIES
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for signal in ("throughput", "time to first token", "inter-token", "queue", "kv cache", "errors"):
        assert signal in titles, signal
    joined = " ".join(exprs)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}" in joined
    # the main signals are all charted
    for name in ("qwen2_time_to_first_token_seconds", "qwen2_inter_token_latency_seconds",
                 "qwen2_generation_tokens", "qwen2_kv_cache_usage_ratio", "qwen2_errors",
                 "qwen2_num_waiting_sequences", "qwen2_num_running_sequences", "qwen2_preemptions",
                 "qwen2_prefix_cache_hits"):
        assert any(n.startswith(BY_NAME[name].exported) for n in used), name


def test_prometheus_scrape_config():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["qwen2-serve"]["static_configs"][0]["targets"] == ["127.0.0.1:8080"]  # the CLI's default port
    assert all(j.get("static_configs") or j.get("file_sd_configs") for j in jobs.values())


def test_readme_lists_every_metric():
    readme = (ROOT / "README.md").read_text()
    for s in SPECS:
        assert s.exported in readme, s.exported
