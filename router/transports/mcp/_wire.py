"""MCP wire vocabulary: header names, protocol versions, JSON-RPC shapes and SSE framing.

Names follow the MCP specification (2024-11-05 HTTP+SSE; 2025-03-26, 2025-06-18 and
2025-11-25 Streamable HTTP). Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

MCP_SESSION_ID = b"mcp-session-id"
MCP_PROTOCOL_VERSION = b"mcp-protocol-version"
LAST_EVENT_ID = b"last-event-id"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_SSE = "text/event-stream"

# Streamable HTTP revisions the router speaks (SPEC.md §4). A request without the header is
# taken as 2025-03-26 (Streamable HTTP, "Protocol Version Header": backwards compatibility).
STREAMABLE_VERSIONS = frozenset({"2025-03-26", "2025-06-18", "2025-11-25"})
DEFAULT_VERSION = "2025-03-26"
BATCH_VERSIONS = frozenset({None, b"2025-03-26"})  # MCP-Protocol-Version values that allow a batch (none: 2025-03-26)

# JSON-RPC 2.0 error codes (§5.1) and the router's own, in the implementation-defined range.
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603
TOOL_DENIED = -32001  # SPEC.md §3 ToolPolicy: a denied tools/call
TOOL_RATE_LIMITED = -32005  # per-tool rate limit; error.data.retryAfterMs says when to retry
UPSTREAM_LOST = -32006  # the upstream session ended before answering
UPSTREAM_TIMEOUT = -32007  # the upstream did not answer this request in time; the session goes on

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]
KEEPALIVE_COMMENT = b": keep-alive\n\n"


def dumps(message: Any) -> str:
    return orjson.dumps(message).decode()


def client_messages(body: Any) -> list[dict[str, Any]]:
    """The JSON-RPC messages of one POST body (a message or a batch); ``ValueError`` says what is wrong.

    A request id is a string or an integer (MCP: never null) and is not used twice in one batch;
    a message without an id must be a notification (every MCP notification is ``notifications/...``):
    a ``tools/call`` without an id is not one the router would forward unjudged.
    """
    items = body if isinstance(body, list) else [body]
    if not items:
        raise ValueError("the batch is empty")
    ids: set[Any] = set()
    for m in items:
        if not isinstance(m, dict) or m.get("jsonrpc") != "2.0":
            raise ValueError("body is not a JSON-RPC 2.0 message")
        if "method" not in m:
            if "id" not in m or not ("result" in m or "error" in m):
                raise ValueError("body is not a JSON-RPC 2.0 message")
            continue
        method = m["method"]
        if not isinstance(method, str):
            raise ValueError("method must be a string")
        if "id" not in m:
            if not method.startswith("notifications/"):
                raise ValueError(f"{method} is a request: it needs an id")
            continue
        request_id = m["id"]
        if isinstance(request_id, bool) or not isinstance(request_id, str | int):
            raise ValueError("a request id must be a string or an integer")
        if request_id in ids:
            raise ValueError(f"request id {request_id!r} is used twice in one batch")
        ids.add(request_id)
    return items


def is_request(message: dict[str, Any]) -> bool:
    return "method" in message and "id" in message


def is_notification(message: dict[str, Any]) -> bool:
    return "method" in message and "id" not in message


def is_response(message: dict[str, Any]) -> bool:
    return "method" not in message and ("result" in message or "error" in message)


def error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": err}


def progress_token(message: dict[str, Any]) -> Any:
    params = message.get("params")
    if isinstance(params, dict):
        meta = params.get("_meta")
        if isinstance(meta, dict):
            return meta.get("progressToken")
    return None


def sse_event(data: str, *, event_id: str | None = None, event: str = "message") -> bytes:
    """One SSE event; ``data`` is one line (compact JSON never holds a raw newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


def accepts(accept: str, media_type: str) -> bool:
    """Whether an ``Accept`` value admits ``media_type`` (RFC 9110 §12.5.1, wildcards included)."""
    major = media_type.split("/", 1)[0]
    for part in accept.split(","):
        item = part.split(";", 1)[0].strip().lower()
        if item in (media_type, f"{major}/*", "*/*"):
            return True
    return False
