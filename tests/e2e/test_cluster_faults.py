"""Faults at cluster level, on a two-node local Ray cluster (`ray.cluster_utils.Cluster`).

    .venv/bin/python -m pytest -m cluster tests/e2e/test_cluster_faults.py -s

Behind the `cluster` marker (a few minutes on 2 cores; it starts its own cluster, so it runs alone,
never next to the session-wide `serve_app`). Two Router replicas of the demo causal LM, one per node
(`max_replicas_per_node=1`); the Ingress and the HTTP proxy on the head node.

- Node loss: streams in flight on both replicas, then the worker node is removed without grace.
  Its in-flight streams end with an error (503 body in the stream, or the connection cut) within
  10 s, the head's streams finish normally, new requests keep being served by the head, and once a
  replacement node joins, Serve brings the second replica back there. Times are printed.
- Rollout: under steady streaming load, the application is redeployed with a changed Router config
  (a rolling replacement of both replicas); no request is lost or cut (every stream completes with
  its finish_reason), and the rollout time is printed.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(max_num_seqs: int = 8) -> dict:
    return {"models": [{"name": "qwen2-demo", "path": "demo:causal_lm", "kv_cache_memory": 16 << 20,
                        "torch_threads": 1, "engine": {"max_model_len": 1024, "max_num_seqs": max_num_seqs},
                        "deployment": {"num_replicas": 2, "max_replicas_per_node": 1,
                                       "graceful_shutdown_timeout_s": 60, "health_check_period_s": 2}}],
            "ingress": {"ray_actor_options": {"num_cpus": 0.1, "resources": {"head": 0.01}}}}


def stream(url: str, max_tokens: int, results: list, timeout: float = 120) -> None:
    """One streamed completion -> results.append((seconds, outcome)); outcome 'ok', 'error', 'cut'."""
    start = time.monotonic()
    body = {"model": "qwen2-demo", "prompt": "Tell me a story", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    outcome = "cut"
    try:
        with httpx.Client(timeout=timeout) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                outcome = f"http {r.status_code}"
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome = f"error {chunk['error']['code']}"
                elif chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    outcome = "ok"
    except httpx.HTTPError:
        outcome = "cut"
    results.append((time.monotonic() - start, outcome))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    if "cluster" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a few minutes: pytest -m cluster tests/e2e/test_cluster_faults.py")
    if ray.is_initialized():
        pytest.skip("needs its own Ray: run alone with -m cluster")
    os.environ["QWEN2_SERVE_HOME"] = str(tmp_path_factory.mktemp("home"))
    from deployments.app import build_app
    from deployments.checkpoints import demo_checkpoint

    demo_checkpoint("causal_lm")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
    worker = c.add_node(num_cpus=2)
    ray.init(address=c.address, log_to_driver=False,
             runtime_env={"env_vars": {"QWEN2_SERVE_HOME": os.environ["QWEN2_SERVE_HOME"]}})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        serve.run(build_app(app_args()), name="qwen2", route_prefix="/")
        yield {"cluster": c, "worker": worker, "url": f"http://127.0.0.1:{port}", "build_app": build_app}
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def replica_nodes() -> dict[str, str]:
    """Router replica actor name -> node id, for live replicas.

    From this driver's own GCS connection (`ray._private.state.actors`), not the state API, which
    picks "the latest" Ray instance on the machine when several run (other agents' clusters)."""
    import ray._private.state as state

    return {a["Name"]: a["Address"]["NodeID"] for a in state.actors().values()
            if a["State"] == "ALIVE" and "router-qwen2-demo" in (a["Name"] or "")}


def test_node_loss_fails_its_streams_fast_and_serve_recovers(cluster):
    c, url = cluster["cluster"], cluster["url"]
    nodes = replica_nodes()
    assert len(set(nodes.values())) == 2, f"replicas not on two nodes: {nodes}"
    ends: list = []

    def timed(i):
        out: list = []
        stream(url, 1000, out)
        ends.append((time.monotonic(), out[0][1]))

    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(timed, i) for i in range(6)]
        time.sleep(2)  # streams running on both replicas (1000 tokens take several seconds)
        killed_at = time.monotonic()
        c.remove_node(cluster["worker"], allow_graceful=False)
        for f in futures:
            f.result(timeout=180)
    failed = [round(t - killed_at, 1) for t, o in ends if o != "ok"]
    print(f"\nnode removed: stream outcomes {[o for _, o in ends]}; the failed ones ended {failed} s after it")
    assert any(o == "ok" for _, o in ends), "the head's streams must finish"
    assert failed, "streams on the dead node must fail"
    assert max(failed) <= 10, f"in-flight streams on the dead node must fail within 10 s: {failed}"
    assert all(o in ("error unavailable", "cut") for _, o in ends if o != "ok"), ends

    # New requests are served by the surviving replica.
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": "qwen2-demo", "prompt": "hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    print(f"first request after the node loss: 200 in {time.monotonic() - t0:.2f} s")

    # A replacement node joins: Serve brings the second replica back there.
    c.add_node(num_cpus=2)
    deadline = time.monotonic() + 240
    while len(set(replica_nodes().values())) < 2:
        assert time.monotonic() < deadline, f"Serve did not bring the replica back: {replica_nodes()}"
        time.sleep(1)
    print(f"second replica back {time.monotonic() - killed_at:.1f} s after the node loss (node added at once)")


def test_rollout_under_streaming_load_loses_nothing(cluster):
    from ray import serve

    url = cluster["url"]
    deadline = time.monotonic() + 240
    while len(replica_nodes()) < 2:
        assert time.monotonic() < deadline
        time.sleep(1)
    stop = threading.Event()
    results: list = []

    def load():
        while not stop.is_set():
            stream(url, 48, results)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    before = set(replica_nodes())
    t0 = time.monotonic()
    serve.run(cluster["build_app"](app_args(max_num_seqs=6)), name="qwen2", route_prefix="/")  # a changed config
    while set(replica_nodes()) & before:
        assert time.monotonic() - t0 < 300, "rollout did not finish"
        time.sleep(0.5)
    rollout_s = time.monotonic() - t0
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    outcomes = [o for _, o in results]
    print(f"\nrollout (both Router replicas replaced) took {rollout_s:.1f} s; {len(outcomes)} streams during it: "
          f"{ {o: outcomes.count(o) for o in set(outcomes)} }")
    assert outcomes and all(o == "ok" for o in outcomes), outcomes
