"""One error contract for both ingresses (DESIGN.md, "Wire contract").

Every failure a client can see is a `ServeError` with an `ErrorCode`; the code alone decides the
HTTP status, the gRPC status code and the OpenAI error `type`, so HTTP and gRPC can never drift:

    code                      HTTP               gRPC
    invalid_request           400                INVALID_ARGUMENT   (`param` names the field)
    context_length_exceeded   400                INVALID_ARGUMENT
    body_too_large            413                RESOURCE_EXHAUSTED
    unauthenticated           401                UNAUTHENTICATED
    model_not_found           404                NOT_FOUND
    queue_full                429 + Retry-After  RESOURCE_EXHAUSTED
    timeout                   408                DEADLINE_EXCEEDED
    unavailable               503                UNAVAILABLE
    internal                  500                INTERNAL

HTTP bodies are OpenAI's `{"error": {"message", "type", "param", "code"}}`, so the `openai` client
raises its matching exception (BadRequestError, AuthenticationError, NotFoundError, ...).

Also here: `to_serve_error` (whatever a Router call raised, Ray's wrappers included -> the
ServeError to show), turning a pydantic ValidationError into an invalid_request that names the
field, and the API-key check (constant-time).
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import math
from dataclasses import dataclass
from typing import Any

import grpc


class ErrorCode(str, enum.Enum):
    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    BODY_TOO_LARGE = "body_too_large"
    UNAUTHENTICATED = "unauthenticated"
    MODEL_NOT_FOUND = "model_not_found"
    QUEUE_FULL = "queue_full"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


@dataclass(frozen=True)
class _Mapping:
    http_status: int
    grpc_code: grpc.StatusCode
    openai_type: str  # OpenAI's error `type`; clients switch on the status, humans read this


ERROR_TABLE: dict[ErrorCode, _Mapping] = {
    ErrorCode.INVALID_REQUEST: _Mapping(400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: _Mapping(400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    ErrorCode.BODY_TOO_LARGE: _Mapping(413, grpc.StatusCode.RESOURCE_EXHAUSTED, "invalid_request_error"),
    ErrorCode.UNAUTHENTICATED: _Mapping(401, grpc.StatusCode.UNAUTHENTICATED, "authentication_error"),
    ErrorCode.MODEL_NOT_FOUND: _Mapping(404, grpc.StatusCode.NOT_FOUND, "invalid_request_error"),
    ErrorCode.QUEUE_FULL: _Mapping(429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error"),
    ErrorCode.TIMEOUT: _Mapping(408, grpc.StatusCode.DEADLINE_EXCEEDED, "timeout_error"),
    ErrorCode.UNAVAILABLE: _Mapping(503, grpc.StatusCode.UNAVAILABLE, "service_unavailable_error"),
    ErrorCode.INTERNAL: _Mapping(500, grpc.StatusCode.INTERNAL, "server_error"),
}


class ServeError(Exception):
    """A failure with a client-facing meaning. Subclasses fix `code`; raise those."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        # Messages quote client input; a lone surrogate in it would make the error itself
        # unencodable (UTF-8 JSON, gRPC details), so it is written as its escape.
        message = _encodable(message)
        super().__init__(message)
        self.message = message
        self.param = None if param is None else _encodable(param)
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return ERROR_TABLE[self.code].http_status

    def grpc_status(self) -> grpc.StatusCode:
        return ERROR_TABLE[self.code].grpc_code

    def grpc_details(self) -> str:
        # gRPC has no `param` slot; put the field name first so it is always visible.
        return f"{self.param}: {self.message}" if self.param else self.message

    def grpc_trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        # Mirrors the HTTP Retry-After header for clients that want to back off precisely.
        return (("retry-after", self._retry_after_header()),) if self.retry_after is not None else ()

    def to_http(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, OpenAI error body, extra headers)."""
        body = {
            "error": {
                "message": self.message,
                "type": ERROR_TABLE[self.code].openai_type,
                "param": self.param,
                "code": self.code.value,
            }
        }
        headers = {"Retry-After": self._retry_after_header()} if self.retry_after is not None else {}
        return self.http_status, body, headers

    def _retry_after_header(self) -> str:
        # HTTP's Retry-After takes whole seconds; round up so clients never retry too early.
        return str(max(1, math.ceil(self.retry_after or 0)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r})"


def _encodable(text: str) -> str:
    """`text` with lone surrogates written as backslash escapes ("\\ud800"), so it encodes as UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class InvalidRequestError(ServeError):
    code = ErrorCode.INVALID_REQUEST


class ContextLengthExceededError(ServeError):
    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED


class BodyTooLargeError(ServeError):
    code = ErrorCode.BODY_TOO_LARGE


class UnauthenticatedError(ServeError):
    code = ErrorCode.UNAUTHENTICATED


class ModelNotFoundError(ServeError):
    code = ErrorCode.MODEL_NOT_FOUND

    def __init__(self, model: str, *, available: list[str] | None = None):
        hint = f"; available: {', '.join(available)}" if available else ""
        super().__init__(f"The model '{model}' does not exist{hint}", param="model")


BUSY = "The server is busy"  # how every queue-full message starts (Serve's gRPC proxy matches on it)
QUEUE_FULL_MESSAGE = f"{BUSY} (the model's queue is full); retry later"


class QueueFullError(ServeError):
    code = ErrorCode.QUEUE_FULL

    def __init__(self, message: str = f"{BUSY}; retry later", *, retry_after: float = 1.0):
        super().__init__(message, retry_after=retry_after)


class RequestTimeoutError(ServeError):
    code = ErrorCode.TIMEOUT


class UnavailableError(ServeError):
    code = ErrorCode.UNAVAILABLE


class InternalError(ServeError):
    code = ErrorCode.INTERNAL


ERROR_CLASSES: dict[ErrorCode, type[ServeError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        ContextLengthExceededError,
        BodyTooLargeError,
        UnauthenticatedError,
        ModelNotFoundError,
        QueueFullError,
        RequestTimeoutError,
        UnavailableError,
        InternalError,
    )
}


def to_serve_error(exc: BaseException) -> ServeError:
    """Whatever a Router call raised -> the ServeError to show the client.

    A replica's ServeError comes back wrapped by Ray (a RayTaskError that is also an instance of
    the original class, with the original as `cause`): the plain one is returned. Ray's own
    failures map to 429 / 503; a timeout to 408; anything else is internal (500).
    """
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:  # RayTaskError(cause=...) chains
        if isinstance(cur, ServeError):
            cause = getattr(cur, "cause", None)
            return cause if isinstance(cause, ServeError) else cur
        cur = getattr(cur, "cause", None) or cur.__cause__
        seen += 1
    name = type(exc).__name__
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    if isinstance(exc, sex.BackPressureError):
        return QueueFullError(f"{BUSY} ({exc}); retry later", retry_after=1.0)
    if isinstance(exc, (rex.RayActorError, rex.ActorDiedError, rex.ActorUnavailableError)):
        return UnavailableError(f"The model replica is not available: {name}")
    if isinstance(exc, sex.DeploymentUnavailableError):
        return UnavailableError(str(exc))
    if isinstance(exc, rex.TaskCancelledError):
        return UnavailableError("The request was cancelled")
    if isinstance(exc, asyncio.TimeoutError):
        return RequestTimeoutError("The request timed out")
    return InternalError(f"Internal error: {name}: {exc}")


# ---------------------------------------------------------------------------------------------
# pydantic -> invalid_request

# Where FastAPI's RequestValidationError says the error sits; not part of the field path.
_REQUEST_PARTS = {"body", "query", "path", "header", "cookie"}


def _is_union_tag(part: object) -> bool:
    # pydantic puts the union member it tried into `loc` ("list[int]", "str", "function-after[...]");
    # those are types, not fields, and would confuse a client reading `param`.
    if not isinstance(part, str):
        return False
    return "[" in part or part in {"str", "int", "float", "bool", "list", "dict", "none", "tagged-union"}


def _field_path(loc: tuple | list) -> str | None:
    parts = list(loc)
    if parts and parts[0] in _REQUEST_PARTS:
        parts = parts[1:]
    parts = [str(p) for p in parts if not _is_union_tag(p)]
    return ".".join(parts) or None


def validation_error_to_serve_error(exc: Any) -> InvalidRequestError:
    """pydantic.ValidationError (or FastAPI's RequestValidationError) -> InvalidRequestError.

    Reports the first error: `param` is its dotted field path ("messages.0.content") and the
    message names the field too, since many clients only print `message`.
    """
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return InvalidRequestError(str(exc) or "Invalid request")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return InvalidRequestError(f"Request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
    param = _field_path(err.get("loc", ()))
    msg = str(err.get("msg", "invalid value"))
    # Our own validators raise ValueError; pydantic prefixes "Value error, " which adds nothing.
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "missing":
        text = f"Missing required field '{param}'"
    elif param:
        text = f"Invalid value for '{param}': {msg}"
    else:
        text = f"Invalid request: {msg}"
    extra = len(errors) - 1
    if extra:
        text += f" (and {extra} more error{'s' if extra > 1 else ''})"
    return InvalidRequestError(text, param=param)


# ---------------------------------------------------------------------------------------------
# API key


def check_api_key(provided: str | None, expected: str | None) -> None:
    """Raise UnauthenticatedError unless `provided` matches `expected`.

    `expected` None or empty disables the check (the laptop demo). `provided` is the raw
    Authorization header ("Bearer <key>") or a bare key, as gRPC metadata may carry either.
    """
    if not expected:
        return
    key = (provided or "").strip()
    scheme, _, rest = key.partition(" ")
    if scheme.lower() == "bearer":
        key = rest.strip()
    if not key:
        raise UnauthenticatedError("Missing API key: send 'Authorization: Bearer <key>'")
    # Bytes, because compare_digest on str rejects non-ASCII; constant time either way.
    if not hmac.compare_digest(key.encode("utf-8"), expected.encode("utf-8")):
        raise UnauthenticatedError("Incorrect API key provided")
