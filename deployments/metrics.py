"""Prometheus metrics of qwen2-serve, defined once (DESIGN.md, "Metrics").

Every metric is declared in `SPECS` below: name (prefixed `qwen2_`), type, meaning, labels (always
`model`) and, for histograms, buckets that fit LLM serving (milliseconds to minutes; 1 to 128k
tokens). They are recorded with `ray.serve.metrics` (Counter / Gauge / Histogram), so Ray's metrics
agent exports them on the node's Prometheus endpoint next to Ray Serve's own metrics
(`ray.init(_metrics_export_port=...)`, `ray start --metrics-export-port=...`, or the CLI's
`--metrics-port`). In the scrape, Ray prefixes every name with `ray_` and counters get `_total`,
and Serve adds the `deployment`, `replica` and `application` labels: `MetricSpec.exported` is the
name an operator queries (README.md, "Metrics", lists them all).

Where they are measured:
- The ingress (`deployments/frontend/core.py`, shared by HTTP and gRPC, streaming or not): what the user
  feels. `GenerationMetrics` follows one generation request (time to first token, inter-token
  latency, end-to-end latency, tokens per request, finish reasons, token counters);
  `record_pooled` one classify/embed/answer request; `count_error` one failed request (called where
  a ServeError becomes an HTTP response or a gRPC status, so each failure counts once).
- The Router (`deployments/router.py`): `RouterMetrics` receives a `StepRecord` from the engine
  after every model step (queue time, step times, batch sizes) and, from a background thread once a
  second, samples the engine's state (running, waiting, KV usage, TP workers alive) and turns its
  cumulative counts (prefix-cache queries / hits, preemptions) into counter increments.

Recording never raises: a metrics failure is logged once and serving goes on. Without Ray (unit
tests, the offline engine) the Ray metric objects are no-ops; `set_backend` swaps in a recorder
(tests/memory_metrics.py).

Ray limitation worth knowing: Ray's exporter reports a histogram's `_sum` from bucket midpoints,
so `_sum / _count` is approximate; quantiles (`histogram_quantile` over `_bucket`) and `_count`
are what to chart.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger("ray.serve")

PREFIX = "qwen2_"
EXPORT_PREFIX = "ray_"  # Ray's metrics agent puts this in front of every application metric
MODEL = "model"

# --- buckets ------------------------------------------------------------------------------------

# Request-level latencies: a cached short answer (ms) to a long generation on a busy server (minutes).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0,
                     3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
# Per-token and per-step times: sub-millisecond decode steps to multi-second prefills of long prompts.
STEP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                  0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
# Tokens per request: 1 to the longest Qwen2 context (128k).
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCH_SEQS_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
BATCH_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# --- the metrics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as defined, prefixed qwen2_
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    where: str  # "ingress" | "router": which deployment records it
    tag_keys: tuple[str, ...] = (MODEL,)
    boundaries: tuple[float, ...] | None = None

    @property
    def exported(self) -> str:
        """The metric family name in Ray's Prometheus scrape."""
        return EXPORT_PREFIX + self.name + ("_total" if self.kind == "counter" else "")

    @property
    def series(self) -> tuple[str, ...]:
        """Every sample name the scrape holds for it (histograms: _bucket, _count, _sum)."""
        if self.kind == "histogram":
            return tuple(self.exported + s for s in ("_bucket", "_count", "_sum"))
        return (self.exported,)


def _h(name, description, where, boundaries, tags=(MODEL,)) -> MetricSpec:
    return MetricSpec(name, "histogram", description, where, tags, tuple(float(b) for b in boundaries))


SPECS: tuple[MetricSpec, ...] = (
    # ingress: what the user feels (HTTP and gRPC, streaming and not)
    _h("qwen2_time_to_first_token_seconds", "Time from the request reaching the ingress to its first generated "
       "token (per prompt)", "ingress", LATENCY_BUCKETS_S),
    _h("qwen2_inter_token_latency_seconds", "Time between consecutive generated tokens of one choice, at the "
       "ingress", "ingress", STEP_BUCKETS_S),
    _h("qwen2_e2e_request_latency_seconds", "Time from the request reaching the ingress to its last token (or "
       "result, for classify/embed/answer), successful requests", "ingress", LATENCY_BUCKETS_S),
    _h("qwen2_request_prompt_tokens", "Prompt tokens per generation request", "ingress", TOKEN_BUCKETS),
    _h("qwen2_request_generation_tokens", "Generated tokens per generation request (all choices)", "ingress",
       TOKEN_BUCKETS),
    MetricSpec("qwen2_requests", "counter", "Finished requests by finish_reason: one per generated choice (stop, "
               "length, abort = ended early by the client, a deadline or an error) and one per successful "
               "classify/embed/answer request (pooled)", "ingress", (MODEL, "finish_reason")),
    MetricSpec("qwen2_errors", "counter", "Failed requests by error code (invalid_request, queue_full, timeout, "
               "...); model is empty when the request failed before naming a served model", "ingress",
               (MODEL, "code")),
    MetricSpec("qwen2_prompt_tokens", "counter", "Prompt tokens processed: generation prompts (once prefilled) "
               "and classify/embed/answer inputs", "ingress"),
    MetricSpec("qwen2_generation_tokens", "counter", "Generated tokens delivered to clients", "ingress"),
    # router: the engine
    _h("qwen2_request_queue_time_seconds", "Time a sequence waited in the engine's queue before its first step",
       "router", LATENCY_BUCKETS_S),
    _h("qwen2_prefill_step_seconds", "Duration of engine steps that computed prompt tokens (alone or with "
       "decodes)", "router", STEP_BUCKETS_S),
    _h("qwen2_decode_step_seconds", "Duration of engine steps that only decoded (one token per sequence)", "router",
       STEP_BUCKETS_S),
    _h("qwen2_batch_size_sequences", "Sequences per engine step", "router", BATCH_SEQS_BUCKETS),
    _h("qwen2_batch_size_tokens", "Tokens computed per engine step (prefill chunks + decodes)", "router",
       BATCH_TOKENS_BUCKETS),
    MetricSpec("qwen2_num_running_sequences", "gauge", "Sequences being generated (in the running batch)",
               "router"),
    MetricSpec("qwen2_num_waiting_sequences", "gauge", "Sequences queued, waiting for the engine", "router"),
    MetricSpec("qwen2_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use (0 to 1)", "router"),
    MetricSpec("qwen2_tp_workers_alive", "gauge", "Tensor-parallel workers alive for the replica (tp when healthy, "
               "0 after a worker died; 1 for tp=1)", "router"),
    MetricSpec("qwen2_prefix_cache_queries", "counter", "KV blocks looked up in the prefix cache", "router"),
    MetricSpec("qwen2_prefix_cache_hits", "counter", "KV blocks found in the prefix cache (hit rate = hits / "
               "queries)", "router"),
    MetricSpec("qwen2_preemptions", "counter", "Sequences preempted (KV blocks freed, recomputed later) because the "
               "KV cache ran out", "router"),
)
BY_NAME: dict[str, MetricSpec] = {s.name: s for s in SPECS}

# --- backends -----------------------------------------------------------------------------------


def ray_backend(spec: MetricSpec) -> Any:
    """The ray.serve.metrics object for `spec` (adds Serve's deployment/replica/application labels)."""
    from ray.serve import metrics as sm

    if spec.kind == "counter":
        return sm.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return sm.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    return sm.Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries),
                        tag_keys=spec.tag_keys)


_lock = threading.Lock()
_backend: Callable[[MetricSpec], Any] = ray_backend
_objects: dict[str, Any] = {}
_failed: set[str] = set()


def set_backend(backend: Callable[[MetricSpec], Any]) -> Callable[[MetricSpec], Any]:
    """Record through `backend(spec) -> metric` from now on (tests); returns the previous one."""
    global _backend
    with _lock:
        previous, _backend = _backend, backend
        _objects.clear()
    return previous


def _metric(name: str) -> Any:
    obj = _objects.get(name)
    if obj is None:
        with _lock:
            obj = _objects.get(name)
            if obj is None:
                obj = _objects[name] = _backend(BY_NAME[name])
    return obj


def _record(method: str, name: str, value: float, model: str, tags: dict[str, str] | None) -> None:
    try:
        all_tags = {MODEL: model or ""}
        if tags:
            all_tags.update(tags)
        getattr(_metric(name), method)(value, tags=all_tags)
    except Exception:  # never let metrics break a request or the engine
        if name not in _failed:
            _failed.add(name)
            logger.exception("recording metric %s failed (logged once)", name)


def inc(name: str, value: float, model: str, **tags: str) -> None:
    if value:
        _record("inc", name, value, model, tags)


def observe(name: str, value: float, model: str, **tags: str) -> None:
    _record("observe", name, value, model, tags)


def set_gauge(name: str, value: float, model: str, **tags: str) -> None:
    _record("set", name, value, model, tags)


# --- ingress ------------------------------------------------------------------------------------

# The served model a request resolved to (set by Frontend.resolve), for the `model` label of its
# error. Only names of served models go here: never user input (label cardinality).
_request_model: contextvars.ContextVar[str] = contextvars.ContextVar("qwen2_request_model", default="")


def set_request_model(name: str) -> None:
    _request_model.set(name)


def count_error(code: str, model: str | None = None) -> None:
    """One failed request: call once, where its ServeError becomes an HTTP response or gRPC status."""
    inc("qwen2_errors", 1, _request_model.get() if model is None else model, code=str(code))


def record_pooled(model: str, num_tokens: int, start: float) -> None:
    """One successful classify / classify_tokens / answer / embed request (start: time.monotonic())."""
    observe("qwen2_e2e_request_latency_seconds", time.monotonic() - start, model)
    inc("qwen2_requests", 1, model, finish_reason="pooled")
    inc("qwen2_prompt_tokens", num_tokens, model)


class GenerationMetrics:
    """One generation request (one prompt, n choices) as the ingress streams it."""

    def __init__(self, model: str, num_prompt_tokens: int, start: float | None = None):
        self.model = model
        self.num_prompt_tokens = num_prompt_tokens
        self.start = time.monotonic() if start is None else start
        self.first_token_at: float | None = None
        self.last_token_at: dict[int, float] = {}  # choice -> when its latest token arrived
        self.generated = 0
        self.prefilled = False

    def on_output(self, index: int, num_tokens: int) -> None:
        """A router output for choice `index` carrying `num_tokens` new tokens (may be 0)."""
        now = time.monotonic()
        if not self.prefilled:  # the first output means the prompt went through the model
            self.prefilled = True
            inc("qwen2_prompt_tokens", self.num_prompt_tokens, self.model)
        if num_tokens <= 0:
            return
        if self.first_token_at is None:
            self.first_token_at = now
            observe("qwen2_time_to_first_token_seconds", now - self.start, self.model)
        # One observation per token after a choice's first, whatever the batching: a message that
        # carries k tokens (the engine coalesces outputs when the consumer falls behind) spreads its
        # gap over its k tokens; tokens that came together with the first token waited 0 s.
        last = self.last_token_at.get(index)
        if last is None:
            gaps = [0.0] * (num_tokens - 1)
        else:
            gaps = [(now - last) / num_tokens] * num_tokens
        for gap in gaps:
            observe("qwen2_inter_token_latency_seconds", gap, self.model)
        self.last_token_at[index] = now
        self.generated += num_tokens
        inc("qwen2_generation_tokens", num_tokens, self.model)

    def on_choice_end(self, finish_reason: str) -> None:
        inc("qwen2_requests", 1, self.model, finish_reason=finish_reason)

    def on_request_end(self, completed: bool) -> None:
        """After every choice ended (`completed`) or the request was left early."""
        if completed:
            observe("qwen2_e2e_request_latency_seconds", time.monotonic() - self.start, self.model)
        if self.prefilled:
            observe("qwen2_request_prompt_tokens", self.num_prompt_tokens, self.model)
            observe("qwen2_request_generation_tokens", self.generated, self.model)


# --- router -------------------------------------------------------------------------------------


class RouterMetrics:
    """The engine's metrics for one Router replica.

    `observe_step` is an `Engine.step_observers` entry: it only queues the StepRecord (the engine's
    step thread stays fast); `flush` records the queued steps and samples the engine state, and
    `start` runs it once per `interval_s` in a daemon thread until `stop`.
    """

    def __init__(self, model: str, interval_s: float = 1.0):
        self.model = model
        self.interval_s = interval_s
        self._steps: collections.deque = collections.deque(maxlen=100_000)
        self._seen = {"prefix_queries": 0, "prefix_hits": 0, "preemptions": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()

    def observe_step(self, record: Any) -> None:
        self._steps.append(record)

    def flush(self, stats: Any = None, workers_alive: int | None = None) -> None:
        with self._flush_lock:
            m = self.model
            while self._steps:
                r = self._steps.popleft()
                name = "qwen2_prefill_step_seconds" if r.prefill_tokens > 0 else "qwen2_decode_step_seconds"
                observe(name, r.seconds, m)
                observe("qwen2_batch_size_sequences", r.num_seqs, m)
                observe("qwen2_batch_size_tokens", r.num_tokens, m)
                for q in r.queue_times:
                    observe("qwen2_request_queue_time_seconds", max(q, 0.0), m)
            if stats is not None:
                set_gauge("qwen2_num_running_sequences", stats.running, m)
                set_gauge("qwen2_num_waiting_sequences", stats.waiting, m)
                set_gauge("qwen2_kv_cache_usage_ratio", stats.kv_usage, m)
                for field, name in (("prefix_queries", "qwen2_prefix_cache_queries"),
                                    ("prefix_hits", "qwen2_prefix_cache_hits"),
                                    ("preemptions", "qwen2_preemptions")):
                    now = int(getattr(stats, field))
                    delta, self._seen[field] = now - self._seen[field], now
                    if delta > 0:
                        inc(name, delta, m)
            if workers_alive is not None:
                set_gauge("qwen2_tp_workers_alive", workers_alive, m)

    def start(self, stats_fn: Callable[[], Any], alive_fn: Callable[[], int]) -> None:
        """Flush every `interval_s` in a daemon thread (and once more on `stop`)."""
        def run():
            while True:
                stopping = self._stop.wait(self.interval_s)
                try:
                    self.flush(stats_fn(), alive_fn())
                except Exception:  # the engine went away; keep trying until stopped
                    logger.debug("router metrics flush failed", exc_info=True)
                if stopping:
                    return

        self._thread = threading.Thread(target=run, name=f"qwen2-metrics-{self.model}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
