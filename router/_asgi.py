"""Small helpers over raw ASGI scopes shared by the middleware layers."""

from __future__ import annotations

import functools
import ipaddress

from starlette.types import Scope

# Namespaced keys in scope["state"] (house style: scope["state"]["kars.principal"]).
PRINCIPAL = "kars.principal"
LOG_FIELDS = "kars.log"
SNAPSHOT = "kars.snapshot"


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case bytes), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def without_headers(scope: Scope, names: frozenset[bytes]) -> None:
    """Drop headers from the scope so no later layer (nor any upstream) sees them."""
    if any(k in names for k, _ in scope["headers"]):
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in names]


def is_json(content_type: bytes | None) -> bool:
    """Whether a Content-Type value names JSON (``application/json``, ``...+json``), in any case.

    ``find``, not ``in``: ``bytes.__contains__`` first tries its operand as an integer and pays
    for a formatted TypeError each time it is not one (four times a request on the hot path).
    """
    return content_type is not None and content_type.lower().find(b"json") >= 0


def is_form(content_type: bytes | None) -> bool:
    """Whether a Content-Type value names a multipart form (``multipart/form-data; boundary=...``)."""
    return content_type is not None and content_type[:10].lower() == b"multipart/"


def client_host(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


@functools.lru_cache(maxsize=4096)
def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address; an IPv4 peer on a dual-stack socket (``::ffff:10.0.0.1``) as IPv4,
    so it matches IPv4 CIDRs and ``127.0.0.1`` is loopback."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def is_loopback(scope: Scope) -> bool:
    host = client_host(scope)
    ip = parse_ip(host) if host else None
    return ip is not None and ip.is_loopback


BODY = "kars.body"  # the raw request body, once read (bytes)
JSON = "kars.json"  # the request body parsed as JSON, once parsed
USAGE = "kars.usage"  # router.usage.Usage, set by a transport when the upstream reports usage
REPLY_JSON = "kars.reply_json"  # (body, parsed) of a whole JSON reply the transport parsed, for layers above
UPSTREAM_OUTPUT = "kars.upstream_output"  # True once any upstream output reached the caller
