"""Read a request body once, share it between layers, and replay it to the next one.

Layers that must see the body before forwarding (token budget, content safety, the inference
transport) call ``read`` or ``read_json``; the first call drains ``receive`` (the body-limit
layer has already capped it) and caches the bytes in the scope state; each later layer gets
the cached copy. ``replay`` gives the layer below a ``receive`` that yields the cached body and
then passes through to the channel behind it (so a client disconnect is still seen), however
many layers replayed it: one hop, not one per layer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import orjson
from starlette import formparsers
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope

from router import _asgi, errors

_AS_JSON = "kars.body_is_json"  # scope state: the answer of is_json


def is_json(scope: Scope) -> bool:
    """Whether the body is read as JSON: every body but a form; worked out once a request.

    The inference API takes JSON bodies, and ``multipart/form-data`` ones for uploads (image
    edits, audio, files). A body's declared type does not change what the upstream makes of it, so
    one sent as ``text/plain`` or with no Content-Type is read, budgeted and checked as JSON too: a
    caller cannot take a prompt past the checks by mislabelling it. Three layers ask (token budget,
    content safety, the transport).
    """
    st = scope["state"]
    as_json: bool | None = st.get(_AS_JSON)
    if as_json is None:
        as_json = st[_AS_JSON] = not _asgi.is_form(_asgi.header(scope, b"content-type"))
    return as_json


async def read(scope: Scope, receive: Receive) -> bytes:
    st = scope["state"]
    cached = st.get(_asgi.BODY)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise errors.InvalidRequest("client disconnected before sending the whole body")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    st[_asgi.BODY] = body
    return body


async def read_json(scope: Scope, receive: Receive) -> Any:
    """The body parsed as JSON (cached); malformed JSON is a 400 ``invalid_request``."""
    st = scope["state"]
    if _asgi.JSON in st:
        return st[_asgi.JSON]
    body = await read(scope, receive)
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidRequest(f"request body is not valid JSON: {exc}") from None
    st[_asgi.JSON] = parsed
    return parsed


def rewrite_json(scope: Scope, doc: Any) -> None:
    """Replace the JSON body read so far: the layers below, and the upstream, get ``doc``.

    (The token budget layer adds the output maximum a request reserved for.) Call before ``replay``.
    """
    st = scope["state"]
    st[_asgi.JSON] = doc
    st[_asgi.BODY] = orjson.dumps(doc)


async def read_form_fields(scope: Scope, receive: Receive) -> dict[str, str]:
    """The text fields of a ``multipart/form-data`` body (an image edit's ``prompt``); files are skipped.

    A malformed form is a 400 ``invalid_request``.
    """
    body = await read(scope, receive)

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await formparsers.MultiPartParser(Headers(scope=scope), chunks()).parse()
    except formparsers.MultiPartException as exc:
        raise errors.InvalidRequest(f"request body is not a valid form: {exc.message}") from None
    try:
        return {name: value for name, value in form.multi_items() if isinstance(value, str)}
    finally:
        await form.close()


def source(receive: Receive) -> Receive:
    """The channel behind ``receive``, past every layer's replay of the body.

    What waits for ``http.disconnect`` once the body is in hand (the inference transport's
    watcher) listens here.
    """
    return receive.rest if isinstance(receive, _Replay) else receive


def replay(scope: Scope, receive: Receive) -> Receive:
    """A ``receive`` for the next layer: the cached body first, then the channel behind ``receive``."""
    body = scope["state"].get(_asgi.BODY)
    if body is None:
        return receive
    return _Replay(body, source(receive))


class _Replay:
    """The cached body once, then the channel it came from.

    The channel is kept here, never in the scope: the server's ``receive`` is a bound method of
    the object that holds the scope, and a reference back to it would make every request a
    reference cycle (garbage only the cycle collector frees).
    """

    __slots__ = ("body", "rest", "sent")

    def __init__(self, body: bytes, rest: Receive) -> None:
        self.body = body
        self.rest = rest
        self.sent = False

    async def __call__(self) -> Message:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await self.rest()
