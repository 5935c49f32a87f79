"""One token stream per Ingress replica and Router replica, carrying a whole step's outputs at once.

Without it every generation request is one Serve streaming call, so a decode step of 32 streams
sends 32 messages from the Router to the Ingress: 32 pickles, 32 gRPC frames and 32 hops between
Serve's event loops on each side. With it (the app arg `shared_stream`, on by default) each Ingress
replica holds one long-lived call, `Router.subscribe(ingress_id)`, per Router deployment (Serve
puts it on one of the deployment's replicas), and that replica sends on it one message per step:
every output of that step for that Ingress's requests, as `(request_id, RequestOutput)` pairs.

A request still makes its own `Router.generate` call, so Serve routes it as before (power of two
choices, multiplexed adapters), and cancelling that call still aborts the request on the replica
that runs it. The Ingress passes `via=<its id>` only when its shared stream is up; the replica that
receives the call uses the shared stream if it has one from that Ingress (it answers
`ViaSharedStream()` on the request's own call and the outputs follow on the shared one) and streams
the outputs on the request's own call otherwise (another replica, a stream that just closed). A
request's outputs therefore always come on one stream, in order. Errors, and the end of the
request, still come on its own call.

Failure and lifetime:
- The shared stream breaks (the Ingress or the Router replica died, a network error): the Router
  fails the requests that rode it (UnavailableError on their own calls, which aborts them in the
  engine), the Ingress fails their local queues the same way, and a request `REOPEN_AFTER_S` later
  opens a new one (those in between stream on their own calls).
- The Router ends a shared stream that carried nothing for `IDLE_CLOSE_S`, so a replica being
  drained or shut down is not held by a call that never ends; the Ingress reopens it on demand.

The Router side (`SharedStreamSink`) imports nothing of Ray; the Ingress side (`SharedStream`) calls
the Router through whatever handle it is given.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncIterator

from deployments.errors import UnavailableError

logger = logging.getLogger("ray.serve")

# A shared stream with no request on it for this long is ended by the Router (reopened on demand).
IDLE_CLOSE_S = 5.0
# After a shared stream failed, the Ingress waits this long before opening another (requests in
# the meantime stream on their own calls).
REOPEN_AFTER_S = 1.0

LOST = "the Router's shared token stream to this ingress was lost; retry the request"


@dataclasses.dataclass(frozen=True)
class ViaSharedStream:
    """The first (and only) message on a request's own call when its outputs go on the shared stream."""


# --- Router side ---------------------------------------------------------------------------------


class SharedStreamSink:
    """One Ingress's shared stream on a Router replica: the requests riding it `put` their outputs;
    `batches()` yields them, one list per event-loop turn, i.e. one per engine step (AsyncEngine
    hands a step's outputs to the loop in one callback, so its riders all wake in the same turn)."""

    def __init__(self, idle_close_s: float | None = None):
        self.idle_close_s = IDLE_CLOSE_S if idle_close_s is None else idle_close_s
        self.riders = 0  # requests whose outputs go here
        self.closed = False
        self._pending: list[tuple[str, Any]] = []
        self._wake = asyncio.Event()

    def put(self, request_id: str, output: Any) -> None:
        if self.closed:
            raise UnavailableError(LOST)
        self._pending.append((request_id, output))
        self._wake.set()

    async def batches(self) -> AsyncIterator[list[tuple[str, Any]]]:
        """[] first (the sink is registered: requests may ride it), then each turn's outputs; ends
        after `idle_close_s` without riders or outputs."""
        yield []
        quiet_since = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(self.idle_close_s):
                    await self._wake.wait()
            except TimeoutError:
                if self.riders or self._pending:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= self.idle_close_s:
                    return
                continue
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch:
                quiet_since = time.monotonic()
                yield batch


# --- Ingress side --------------------------------------------------------------------------------


class SharedStream:
    """The Ingress's end of its shared stream to one Router deployment: opened on first use, read by
    one task that hands each output to the queue of its request."""

    def __init__(self, router: Any, stream_options: dict, ingress_id: str | None = None):
        self.router = router  # the deployment's handle
        self.stream_options = stream_options
        self.ingress_id = ingress_id or uuid.uuid4().hex
        self.up = False  # the Router registered it: requests may ask to ride it
        self.queues: dict[str, asyncio.Queue] = {}  # request id -> its outputs (or an error)
        self._task: asyncio.Task | None = None
        self._failed_at = 0.0

    def via(self, request_id: str) -> str | None:
        """The id to pass as `generate(..., via=)` and a queue registered for `request_id`, when the
        stream is up (else None: the request streams on its own call). Opens the stream if needed."""
        if self._task is None or self._task.done():
            if time.monotonic() - self._failed_at >= REOPEN_AFTER_S:
                # In a context of its own, not the request's that opened it: Serve cancels the
                # handle calls a request made when that request is cancelled (a client leaving).
                self._task = asyncio.get_running_loop().create_task(self._read(), context=contextvars.Context())
            return None
        if not self.up or request_id in self.queues:
            return None
        self.queues[request_id] = asyncio.Queue()
        return self.ingress_id

    def release(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    async def _read(self) -> None:
        failure: BaseException | None = None
        try:
            call = self.router.options(**self.stream_options).subscribe.remote(self.ingress_id)
            async for batch in call:
                self.up = True
                for request_id, output in batch:
                    queue = self.queues.get(request_id)
                    if queue is not None:
                        queue.put_nowait(output)
        except asyncio.CancelledError:
            failure = UnavailableError(LOST)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the call ends the stream
            failure = UnavailableError(LOST)
            self._failed_at = time.monotonic()
            logger.warning("shared token stream %s ended: %s", self.ingress_id, exc)
        finally:
            self.up = False
            # Requests that rode it cannot get their outputs any more. (Requests registered but
            # answered on their own call never read their queue.) The Router ended a stream only
            # when nothing rode it, so a normal end fails nobody who waits.
            for queue in self.queues.values():
                queue.put_nowait(failure or UnavailableError(LOST))


class RouterOutputs:
    """A request's outputs from the Router: on its own call, or, once the Router answered
    `ViaSharedStream()`, from its queue of the shared stream; errors from either."""

    def __init__(self, call: Any, shared: SharedStream | None, request_id: str):
        self.call = call  # the request's own streaming call (cancel() aborts it on its replica)
        self._shared = shared
        self._request_id = request_id
        self._queue: asyncio.Queue | None = None
        self._watch: asyncio.Task | None = None

    async def next(self) -> Any:
        """The next RequestOutput; StopAsyncIteration when the own call ended with the outputs on it."""
        if self._queue is None:
            out = await self.call.__anext__()
            if not isinstance(out, ViaSharedStream):
                return out
            self._queue = self._shared.queues[self._request_id]
            self._watch = asyncio.get_running_loop().create_task(self._watch_call())
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _watch_call(self) -> None:
        """The own call says nothing more on the shared path but the request's error (or its end)."""
        try:
            async for _ in self.call:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the reader as is
            self._queue.put_nowait(exc)

    def close(self, cancel: bool) -> None:
        """Done with the request; `cancel`: it is being left early (the own call is cancelled too).
        Otherwise the watcher sees the own call end by itself."""
        if cancel and self._watch is not None:
            self._watch.cancel()
        if self._shared is not None:
            self._shared.release(self._request_id)
