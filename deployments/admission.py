"""Queue-full refused in Serve's proxy process, before any Ray call (issue 16: fast rejection).

A 429 decided at the ingress still costs the proxy's call to the ingress replica, the replica's
call back to the proxy for the request body, and the response stream back: two Ray round trips
through processes that compete with the generating Router for the CPU (tens of ms on a quiet
2-core box, hundreds under load). This module runs inside Serve's proxy and answers generation
requests for a model whose queue is known to be full itself, with the same body, status and
Retry-After the ingress sends.

The view is learned from the answers passing through the proxy, keyed by (route, requested model):
- a 429 (HTTP; the error contract's only 429 is queue_full) or RESOURCE_EXHAUSTED with trailing
  `error-code: queue_full` (gRPC) marks it full for `HOLD_S`;
- while full, requests for it are refused here, except that once the hold is over one request (a
  probe) goes through to find out, the others being refused until its answer: queue full again
  renews the hold, admitted (HTTP 200 / a first gRPC message) clears it, another error lets the next
  request probe. A probe not answered within the probe wait forgets the entry (a refusal comes
  back in one round trip, an admitted request only with its first token): three times the recent
  round trip of the refusals that came back through here (an exponential average), at least the
  hold and at most `MAX_PROBE_WAIT_S`. So after the last queue-full answer, requests are refused
  here for at most HOLD_S + MAX_PROBE_WAIT_S (1.25 s);
- only a client whose credential (the `authorization` header / metadata) the ingress accepted on a
  queue-full answer is refused here (stored as SHA-256 digests): everyone else goes through to the
  ingress, which checks the key, so the proxy never needs the key and never answers a request the
  ingress would have refused with 401.
So a 429 costs the proxy alone, and the Router sees about one request per hold while full. A
refusal here is not counted in `qwen2_errors` (the ingress never sees it).

HTTP: `QueueFullMiddleware`, installed in the proxy with Ray Serve's hook
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.admission.proxy_middlewares` (the CLI and
the e2e fixture set it before starting Ray; without it the ingress's own view still answers).
gRPC: deployments/grpc_api/raw.py wraps Generate and GenerateStream with `GRPC_VIEW`.

Kept light (stdlib, starlette's Middleware, the error contract): Serve's proxy imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from deployments.errors import QUEUE_FULL_MESSAGE, QueueFullError

HOLD_S = float(os.environ.get("QWEN2_SERVE_PROXY_QUEUE_FULL_HOLD_S", "0.25"))  # 0 turns the proxy view off
PROBE_TIMEOUT_S = HOLD_S  # the least a probe's answer is awaited
MAX_PROBE_WAIT_S = 1.0  # the most (a loaded box's refusal round trip can take most of a second)
MAX_BODY_BYTES = 1 << 20  # a body larger than this is passed through unread
MAX_CREDENTIALS = 64  # distinct accepted credentials remembered per entry
MESSAGE = QUEUE_FULL_MESSAGE  # word for word what the ingress says
REFUSED_BY = ("x-qwen2-refused-by", "proxy")  # a header / trailing metadata on the refusals made here
# Ray Serve's hook that installs QueueFullMiddleware in its HTTP proxy (read when the proxy starts).
PROXY_CALLBACK_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.admission.proxy_middlewares"}


def credential_digest(value: str | bytes | None) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return hashlib.sha256(value or b"").digest()


@dataclass
class _Full:
    until: float
    credentials: set[bytes] = field(default_factory=set)
    probe_at: float | None = None


class AdmissionView:
    """Which (route, model) queues are full, as the answers passing through said."""

    def __init__(self, hold_s: float = HOLD_S, probe_timeout_s: float = PROBE_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic):
        self.hold_s = hold_s
        self.probe_timeout_s = probe_timeout_s
        self.refusal_s: float | None = None  # recent round trip of a refusal from behind (EWMA)
        self.clock = clock
        self._full: dict[tuple[str, str], _Full] = {}
        self.refused = 0  # requests answered here (tests and benchmarks read it)

    def watching(self, route: str) -> bool:
        """Whether any model of this route is marked full (only then are bodies read)."""
        return any(r == route for r, _ in self._full)

    def refuse(self, route: str, model: str, credential: bytes) -> bool:
        """True: answer queue-full now. False: forward (possibly as this entry's probe)."""
        key = (route, model)
        entry = self._full.get(key)
        if entry is None or credential not in entry.credentials:
            return False
        now = self.clock()
        if now < entry.until:
            self.refused += 1
            return True
        wait = self.probe_wait()
        if entry.probe_at is None and now < entry.until + wait:
            entry.probe_at = now  # this request goes through and finds out
            return False
        if entry.probe_at is not None and now - entry.probe_at < wait:
            self.refused += 1  # waiting for the probe's answer
            return True
        # Not confirmed in time (the probe was most likely admitted: a refusal answers at once):
        # the view forgets the entry and everything goes through until the next queue-full.
        del self._full[key]
        return False

    def probe_wait(self) -> float:
        """How long a probe's answer is awaited before the entry is forgotten."""
        measured = 3.0 * self.refusal_s if self.refusal_s is not None else 0.0
        return min(MAX_PROBE_WAIT_S, max(self.probe_timeout_s, measured))

    def answered(self, route: str, model: str, credential: bytes, outcome: str,
                 seconds: float | None = None) -> None:
        """A forwarded request's answer: "full" (queue full), "admitted", or "other"; `seconds`:
        how long that answer took (a refusal's round trip sets the probe wait)."""
        key = (route, model)
        if outcome == "full":
            if self.hold_s <= 0:
                return
            if seconds is not None:
                self.refusal_s = seconds if self.refusal_s is None else 0.8 * self.refusal_s + 0.2 * seconds
            entry = self._full.get(key)
            if entry is None:
                entry = self._full[key] = _Full(0.0)
            entry.until = self.clock() + self.hold_s
            entry.probe_at = None
            if len(entry.credentials) < MAX_CREDENTIALS:
                entry.credentials.add(credential)
        elif outcome == "admitted":
            self._full.pop(key, None)
        else:
            entry = self._full.get(key)
            if entry is not None:
                entry.probe_at = None  # told nothing: the next request may probe


VIEW = AdmissionView()  # the HTTP proxy's
GRPC_VIEW = VIEW  # the gRPC proxy's (same process; routes differ, so entries never mix)


def refusal_http() -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The ingress's 429: status, OpenAI error body, headers (Retry-After)."""
    status, body, headers = QueueFullError(MESSAGE, retry_after=1.0).to_http()
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((REFUSED_BY[0].encode(), REFUSED_BY[1].encode()))
    return status, data, raw


def requested_model(body: bytes) -> str | None:
    """The `model` field of a JSON body ("" when absent); None when the body is not a JSON object."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    model = obj.get("model")
    return model if isinstance(model, str) else "" if model is None else None


class QueueFullMiddleware:
    """ASGI middleware for Serve's HTTP proxy: refuses POSTs for a model known to be full; learns
    from every POST's answer (the status of its response start)."""

    def __init__(self, app, view: AdmissionView | None = None):
        self.app = app
        self.view = view or VIEW

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or self.view.hold_s <= 0:
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        start = self.view.clock()
        credential = credential_digest(_header(scope, b"authorization"))
        received: list[bytes] = []  # the body as read (by us or by Serve's proxy), for learning
        size = 0
        complete = False
        replay: list[dict] = []
        if self.view.watching(route):  # a model of this route is full: read the body first
            while True:
                message = await receive()
                replay.append(message)
                if message["type"] != "http.request":
                    break
                size += len(message.get("body", b""))
                if size > MAX_BODY_BYTES:
                    break
                received.append(message.get("body", b""))
                if not message.get("more_body", False):
                    complete = True
                    break
            model = requested_model(b"".join(received)) if complete else None
            if model is not None and self.view.refuse(route, model, credential):
                status, body, headers = refusal_http()
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return

        async def replaying_receive():
            nonlocal size, complete
            if replay:
                return replay.pop(0)
            message = await receive()
            if message["type"] == "http.request" and not complete:
                size += len(message.get("body", b""))
                if size <= MAX_BODY_BYTES:
                    received.append(message.get("body", b""))
                complete = not message.get("more_body", False)
            return message

        async def watching_send(message):
            if message["type"] == "http.response.start":
                status = message.get("status")
                outcome = "full" if status == 429 else "admitted" if status == 200 else "other"
                if outcome == "full" or self.view.watching(route):
                    model = requested_model(b"".join(received)) if complete and size <= MAX_BODY_BYTES else None
                    if model is not None:
                        self.view.answered(route, model, credential, outcome, self.view.clock() - start)
            await send(message)

        await self.app(scope, replaying_receive, watching_send)


def _header(scope, name: bytes) -> bytes | None:
    value = None
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            value = v
    return value


def proxy_middlewares() -> list:
    """Ray Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH), called once in the
    proxy process at its start: also where the proxy yields the CPU to the model (cpu_priority.py)."""
    from starlette.middleware import Middleware

    from deployments.cpu_priority import yield_cpu_to_model

    yield_cpu_to_model()
    return [Middleware(QueueFullMiddleware)]


# --- gRPC (used by deployments/grpc_api/raw.py in the same proxy process) ------------------------


def grpc_credential(context: Any) -> bytes:
    value = None
    for k, v in context.invocation_metadata() or ():
        if k.lower() == "authorization":
            value = v
    return credential_digest(value)


def grpc_outcome(context: Any) -> str:
    """After the RPC: "full" when the ingress answered queue_full, else "other"."""
    try:
        trailing = dict(context.trailing_metadata() or ())
    except Exception:  # noqa: BLE001
        return "other"
    code = trailing.get("error-code")
    return "full" if code in ("queue_full", b"queue_full") else "other"
