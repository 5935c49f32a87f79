"""deployments/admission.py: the proxy's queue-full view and its ASGI middleware, without Ray.

The middleware is driven the way uvicorn and Serve's proxy drive it: a scope, a receive channel
with the body, a send that records the answer; the app behind it stands in for Serve's proxy
(it reads the body and answers with the status the ingress would have sent).
"""

from __future__ import annotations

import asyncio
import json

from deployments.admission import AdmissionView, QueueFullMiddleware, credential_digest, requested_model

ROUTE = "/v1/completions"
KEY = credential_digest(b"Bearer k")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_view_refuses_a_full_model_only_to_an_accepted_credential():
    clock = Clock()
    view = AdmissionView(hold_s=0.25, probe_timeout_s=0.25, clock=clock)
    assert not view.refuse(ROUTE, "m", KEY)  # nothing known
    view.answered(ROUTE, "m", KEY, "full")
    assert view.refuse(ROUTE, "m", KEY)
    assert not view.refuse(ROUTE, "m", credential_digest(b"Bearer other"))  # the ingress checks that one
    assert not view.refuse(ROUTE, "other-model", KEY)
    assert not view.refuse("/v1/chat/completions", "m", KEY)  # routes are learned separately


def test_after_the_hold_one_probe_at_a_time_finds_out():
    clock = Clock()
    view = AdmissionView(hold_s=0.25, probe_timeout_s=0.25, clock=clock)
    view.answered(ROUTE, "m", KEY, "full")
    clock.now += 0.3
    assert not view.refuse(ROUTE, "m", KEY)  # the probe goes through
    assert view.refuse(ROUTE, "m", KEY) and view.refuse(ROUTE, "m", KEY)  # others wait for its answer
    view.answered(ROUTE, "m", KEY, "full")  # still full: held again
    clock.now += 0.1
    assert view.refuse(ROUTE, "m", KEY)
    clock.now += 0.2
    assert not view.refuse(ROUTE, "m", KEY)  # next probe
    view.answered(ROUTE, "m", KEY, "other")  # told nothing (e.g. a 400): the next request probes
    assert not view.refuse(ROUTE, "m", KEY)
    assert view.refuse(ROUTE, "m", KEY)
    clock.now += 0.26  # that probe did not answer in time (admitted, most likely): forgotten
    assert not view.refuse(ROUTE, "m", KEY) and not view.refuse(ROUTE, "m", KEY)
    assert not view.watching(ROUTE)


def test_an_admitted_probe_clears_and_an_old_entry_is_forgotten():
    clock = Clock()
    view = AdmissionView(hold_s=0.25, probe_timeout_s=0.25, clock=clock)
    view.answered(ROUTE, "m", KEY, "full")
    clock.now += 0.3
    assert not view.refuse(ROUTE, "m", KEY)
    view.answered(ROUTE, "m", KEY, "admitted")  # room again: nothing is refused
    assert not view.refuse(ROUTE, "m", KEY) and not view.watching(ROUTE)
    view.answered(ROUTE, "m", KEY, "full")
    clock.now += 0.6  # long after hold + probe timeout, nobody probed: the entry is stale
    assert not view.refuse(ROUTE, "m", KEY) and not view.refuse(ROUTE, "m", KEY)


def test_the_probe_wait_follows_the_refusals_round_trip():
    clock = Clock()
    view = AdmissionView(hold_s=0.25, probe_timeout_s=0.25, clock=clock)
    view.answered(ROUTE, "m", KEY, "full", seconds=0.3)  # a loaded box: refusals take 0.3 s
    assert abs(view.probe_wait() - 0.9) < 1e-9
    clock.now += 0.3
    assert not view.refuse(ROUTE, "m", KEY)  # the probe
    clock.now += 0.6
    assert view.refuse(ROUTE, "m", KEY)  # its answer may still be on its way
    view.answered(ROUTE, "m", KEY, "full", seconds=5.0)
    assert view.probe_wait() == 1.0  # never more than MAX_PROBE_WAIT_S


def test_hold_zero_turns_the_view_off():
    view = AdmissionView(hold_s=0.0)
    view.answered(ROUTE, "m", KEY, "full")
    assert not view.refuse(ROUTE, "m", KEY)


def test_requested_model():
    assert requested_model(b'{"model": "m", "prompt": "x"}') == "m"
    assert requested_model(b'{"prompt": "x"}') == ""
    assert requested_model(b'{"model": 3}') is None
    assert requested_model(b"[1]") is None and requested_model(b"\xff") is None


class Ingress:
    """Stands in for Serve's proxy + the ingress: reads the whole body, answers `status`."""

    def __init__(self, status: int):
        self.status, self.bodies = status, []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def post(app, body: bytes, auth: bytes = b"Bearer k", chunks: int = 1) -> tuple[int, dict, bytes]:
    scope = {"type": "http", "method": "POST", "path": ROUTE, "headers": [(b"authorization", auth)]}
    size = max(1, len(body) // chunks)
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, b"".join(
        m.get("body", b"") for m in sent[1:])


def test_middleware_learns_from_a_429_and_refuses_the_next_itself():
    clock = Clock()
    view = AdmissionView(hold_s=0.25, clock=clock)
    ingress = Ingress(429)
    app = QueueFullMiddleware(ingress, view)
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    assert post(app, body)[0] == 429 and len(ingress.bodies) == 1  # the ingress answered
    status, headers, data = post(app, body)
    assert status == 429 and len(ingress.bodies) == 1  # answered in the "proxy"
    assert headers["retry-after"] == "1" and headers["x-qwen2-refused-by"] == "proxy"
    err = json.loads(data)["error"]
    assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
    # another credential, another model: forwarded, with the whole body (read here, then replayed)
    post(app, body, auth=b"Bearer x")
    other = json.dumps({"model": "n", "prompt": "a" * 1000}).encode()
    post(app, other, chunks=7)
    assert ingress.bodies[1:] == [body, other]


def test_middleware_clears_on_an_admitted_probe():
    clock = Clock()
    view = AdmissionView(hold_s=0.25, clock=clock)
    ingress = Ingress(429)
    app = QueueFullMiddleware(ingress, view)
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    post(app, body)
    clock.now += 0.3
    ingress.status = 200
    assert post(app, body)[0] == 200  # the probe was admitted
    assert post(app, body)[0] == 200 and len(ingress.bodies) == 3  # nothing refused any more


def test_get_and_other_routes_pass_untouched():
    view = AdmissionView(hold_s=0.25)
    view.answered(ROUTE, "m", KEY, "full")
    ingress = Ingress(200)
    app = QueueFullMiddleware(ingress, view)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(m):
        sent.append(m)

    asyncio.run(app({"type": "http", "method": "GET", "path": ROUTE, "headers": []}, receive, send))
    assert sent[0]["status"] == 200
