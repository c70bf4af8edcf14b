"""The error hierarchy of the router, and the one place it is rendered to the wire.

Every refusal the router makes is one of these exceptions. Layers raise them; the
error layer (``router.middleware.errors``) renders them as the OpenAI/Azure error
shape of SPEC.md §7 so SDKs raise their usual exceptions::

    KarsError                      status  code
    ├── InvalidRequest             400     invalid_request
    ├── Unauthenticated            401     missing_credentials | invalid_credentials
    ├── Forbidden                  403     forbidden | trust_edge_missing
    ├── NotFound                   404     not_found
    ├── MethodNotAllowed           405     method_not_allowed
    ├── Conflict                   409     conflict
    ├── PayloadTooLarge            413     payload_too_large
    ├── TooManyRequests            429     rate_limited
    │   └── TokenBudgetExceeded    429     budget_exceeded | per_request_tokens_exceeded
    ├── UpstreamError              502     upstream_error | upstream_unavailable
    ├── ServiceUnavailable         503     upstream_not_configured | content_safety_unavailable
    │                                      | budget_store_unavailable | identity_unavailable | not_ready
    └── UpstreamTimeout            504     upstream_timeout

Third-party exceptions are translated into these at the boundary where they occur
(``raise UpstreamTimeout(...) from exc``) and never travel further.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson


class KarsError(Exception):
    """A refusal with an HTTP status, a stable ``error.code`` and a human message."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"
    error_type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.headers: dict[str, str] = dict(headers or {})
        # Extra members of the ``error`` object (Azure's ``innererror`` for example).
        self.extra: dict[str, Any] = dict(extra or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "code": self.code,
            "param": None,
        }
        error.update(self.extra)
        return {"error": error}

    def render(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, raw ASGI headers and body bytes of this error's response."""
        payload = orjson.dumps(self.body())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items())
        return self.status, headers, payload


class InvalidRequest(KarsError):
    status = 400
    default_code = "invalid_request"
    error_type = "invalid_request_error"


class Unauthenticated(KarsError):
    """401 with ``WWW-Authenticate: Bearer`` (RFC 6750 §3): ``error="invalid_token"`` when a token was
    presented and refused; none when there was none."""

    status = 401
    default_code = "invalid_credentials"
    error_type = "authentication_error"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        if "WWW-Authenticate" not in self.headers:
            challenge = 'Bearer realm="kars"'
            if self.code != "missing_credentials":
                challenge += ', error="invalid_token"'
            self.headers["WWW-Authenticate"] = challenge


class Forbidden(KarsError):
    status = 403
    default_code = "forbidden"
    error_type = "permission_error"


class NotFound(KarsError):
    status = 404
    default_code = "not_found"
    error_type = "not_found_error"


class MethodNotAllowed(KarsError):
    status = 405
    default_code = "method_not_allowed"
    error_type = "invalid_request_error"


class Conflict(KarsError):
    status = 409
    default_code = "conflict"
    error_type = "invalid_request_error"


class PayloadTooLarge(KarsError):
    status = 413
    default_code = "payload_too_large"
    error_type = "invalid_request_error"


class TooManyRequests(KarsError):
    status = 429
    default_code = "rate_limited"
    error_type = "rate_limit_error"


class TokenBudgetExceeded(TooManyRequests):
    """A token budget refused the request (SPEC.md §3): ``type`` is ``token_budget_exceeded``."""

    default_code = "budget_exceeded"
    error_type = "token_budget_exceeded"


class UpstreamError(KarsError):
    status = 502
    default_code = "upstream_error"
    error_type = "upstream_error"


class ServiceUnavailable(KarsError):
    status = 503
    default_code = "service_unavailable"
    error_type = "service_unavailable_error"


class UpstreamTimeout(KarsError):
    status = 504
    default_code = "upstream_timeout"
    error_type = "timeout_error"


class InternalError(KarsError):
    """Anything unexpected: rendered without detail, logged with its traceback."""


_BY_STATUS: dict[int, type[KarsError]] = {
    cls.status: cls
    for cls in (
        InvalidRequest,
        Unauthenticated,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        TooManyRequests,
        UpstreamError,
        ServiceUnavailable,
        UpstreamTimeout,
    )
}


def for_status(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> KarsError:
    """The error for a bare HTTP status (Starlette's 404/405 for example)."""
    cls = _BY_STATUS.get(status, InternalError)
    return cls(message, headers=headers)
