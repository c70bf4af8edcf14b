"""Upstream MCP sessions: one per client session, over Streamable HTTP or legacy HTTP+SSE.

Both kinds offer the same small surface to the gateway, so either client transport can sit
in front of either upstream transport (SPEC.md §4):

- ``request(message, raw)``: send one JSON-RPC request; yield the upstream messages that belong
  to it (progress, server-to-client requests sent on its stream), the response last;
- ``send(raw)``: a notification or a response to a server-to-client request;
- ``listen()``: messages not tied to any request (list_changed, requests on the GET stream);
- ``close()``: end the upstream session.

``Gone`` means the upstream session is over (404 on its id, its stream cut, the server gone):
the gateway then ends the client session too. HTTP goes through ``router.upstream.http``
(one pooled client per upstream origin, kept by ``Pool`` for the app's lifetime).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import orjson

from router import errors
from router.transports.mcp import _sse, _wire
from router.upstream import http

log = logging.getLogger("kars.mcp")

MAX_JSON_BYTES = 16 * 1024 * 1024  # a JSON (non-SSE) reply larger than this is refused
ENDPOINT_WAIT_S = 10.0  # how long a legacy upstream may take to send its `endpoint` event
RELISTEN_DELAY_S = 1.0  # pause before re-opening an upstream GET stream that ended


class Gone(Exception):
    """The upstream session ended; the client session must end with it."""


class Pool:
    """One ``http.Client`` per upstream origin, opened on first use, closed with the app."""

    def __init__(self, timeouts: http.Timeouts) -> None:
        self._timeouts = timeouts
        self._clients: dict[str, http.Client] = {}
        self._lock = asyncio.Lock()

    @property
    def read_timeout_s(self) -> float:
        """How long an upstream may stay silent while a request waits on it."""
        return self._timeouts.read_s

    async def client(self, url: str) -> tuple[http.Client, str]:
        """The client for ``url``'s origin and the path (with query) to ask it for."""
        parts = urllib.parse.urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        client = self._clients.get(origin)
        if client is None:
            async with self._lock:
                client = self._clients.get(origin)
                if client is None:
                    client = http.Client(origin, timeouts=self._timeouts)
                    await client.start()
                    self._clients[origin] = client
        return client, path

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


Message = tuple[dict[str, Any], str]  # a JSON-RPC message and its JSON text, forwarded as is when unchanged


def _parse(data: str) -> list[Message]:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        log.warning("upstream sent a message that is not JSON; dropped")
        return []
    if isinstance(parsed, dict):
        # Forwarded text must fit one SSE ``data:`` line: pretty-printed JSON is re-serialised.
        return [(parsed, data if "\n" not in data and "\r" not in data else _wire.dumps(parsed))]
    items = parsed if isinstance(parsed, list) else []
    return [(m, _wire.dumps(m)) for m in items if isinstance(m, dict)]


def _header(resp: http.Response, name: bytes) -> str | None:
    for key, value in resp.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class StreamableUpstream:
    """A session with a Streamable HTTP server (2025-03-26 and later)."""

    def __init__(self, pool: Pool, url: str, bearer: str | None) -> None:
        self._pool = pool
        self._url = url
        self._bearer = bearer
        self.session_id: str | None = None
        self.protocol_version: str | None = None

    def _headers(self, accept: str) -> list[tuple[str, str]]:
        headers = [("accept", accept), ("content-type", _wire.CONTENT_TYPE_JSON)]
        if self._bearer:
            headers.append(("authorization", f"Bearer {self._bearer}"))
        if self.session_id:
            headers.append(("mcp-session-id", self.session_id))
        if self.protocol_version:
            headers.append(("mcp-protocol-version", self.protocol_version))
        return headers

    async def _post(self, raw: bytes) -> http.Response:
        client, path = await self._pool.client(self._url)
        try:
            resp = await client.request(
                "POST", path, headers=self._headers("application/json, text/event-stream"), body=raw
            )
        except errors.UpstreamTimeout:
            raise  # this request went unanswered; the session itself may be fine
        except errors.KarsError as exc:
            raise Gone(exc.message) from exc
        if resp.status == 404 and self.session_id:
            resp.close()
            raise Gone("upstream session expired")
        if self.session_id is None:
            self.session_id = _header(resp, _wire.MCP_SESSION_ID)
        return resp

    async def request(self, message: dict[str, Any], raw: bytes) -> AsyncIterator[Message]:
        resp = await self._post(raw)
        try:
            if resp.status >= 400:
                err = _wire.error(message.get("id"), _wire.INTERNAL_ERROR, f"upstream answered HTTP {resp.status}")
                yield err, _wire.dumps(err)
                return
            async for item in self._messages(resp):
                yield item
        except errors.UpstreamTimeout:
            raise
        except errors.KarsError as exc:
            raise Gone(exc.message) from exc
        finally:
            resp.close()

    async def _messages(self, resp: http.Response) -> AsyncIterator[Message]:
        content_type = (_header(resp, b"content-type") or "").split(";")[0].strip().lower()
        if content_type == _wire.CONTENT_TYPE_SSE:
            async for event in _sse.events(resp.iter_chunks()):
                if event.event in ("", "message") and event.data:
                    for item in _parse(event.data):
                        yield item
        elif content_type == _wire.CONTENT_TYPE_JSON:
            body, whole = await resp.read(MAX_JSON_BYTES)
            if not whole:
                raise Gone("upstream reply too large")
            for item in _parse(body.decode("utf-8", "replace")):
                yield item

    async def send(self, raw: bytes) -> None:
        resp = await self._post(raw)
        resp.close()

    async def listen(self) -> AsyncIterator[Message]:
        """The upstream's GET stream, re-opened while the session lives; ends on 405."""
        client, path = await self._pool.client(self._url)
        while True:
            try:
                resp = await client.request(
                    "GET", path, headers=self._headers(_wire.CONTENT_TYPE_SSE), body=None, long_lived=True
                )
            except errors.KarsError as exc:
                raise Gone(exc.message) from exc
            try:
                if resp.status == 404:
                    raise Gone("upstream session expired")
                if resp.status >= 400:
                    return  # 405: the server offers no GET stream (Streamable HTTP, "Listening")
                async for item in self._messages(resp):
                    yield item
            except errors.KarsError:
                pass  # the stream broke off: re-open it; a dead server shows on the next request
            finally:
                resp.close()
            await asyncio.sleep(RELISTEN_DELAY_S)

    async def close(self) -> None:
        if not self.session_id:
            return
        with contextlib.suppress(errors.KarsError):
            client, path = await self._pool.client(self._url)
            resp = await client.request("DELETE", path, headers=self._headers(_wire.CONTENT_TYPE_JSON), body=None)
            resp.close()


class SseUpstream:
    """A session with a legacy HTTP+SSE server (2024-11-05): one GET stream carries every reply."""

    def __init__(self, pool: Pool, url: str, bearer: str | None) -> None:
        self._pool = pool
        self._url = url
        self._bearer = bearer
        self._endpoint: str | None = None
        self._pending: dict[Any, asyncio.Queue[Message | None]] = {}
        self._progress: dict[Any, Any] = {}  # progressToken -> request id
        self._unrelated: asyncio.Queue[Message | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._gone = False
        self.protocol_version: str | None = None

    def _headers(self, accept: str) -> list[tuple[str, str]]:
        headers = [("accept", accept)]
        if self._bearer:
            headers.append(("authorization", f"Bearer {self._bearer}"))
        return headers

    async def start(self) -> None:
        client, path = await self._pool.client(self._url)
        resp = await client.request(
            "GET", path, headers=self._headers(_wire.CONTENT_TYPE_SSE), body=None, long_lived=True
        )
        if resp.status != 200:
            resp.close()
            raise errors.UpstreamError(f"upstream SSE endpoint answered HTTP {resp.status}")
        found: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(resp, found), name="kars-mcp-sse-upstream")
        try:
            endpoint = await asyncio.wait_for(asyncio.shield(found), ENDPOINT_WAIT_S)
        except (TimeoutError, Gone) as exc:
            await self.close()
            raise errors.UpstreamError("upstream SSE stream sent no endpoint event") from exc
        target = urllib.parse.urljoin(self._url, endpoint)
        if urllib.parse.urlsplit(target)[:2] != urllib.parse.urlsplit(self._url)[:2]:
            await self.close()
            raise errors.UpstreamError("upstream endpoint event names another origin")
        self._endpoint = target

    async def _read(self, resp: http.Response, found: asyncio.Future[str]) -> None:
        try:
            async for event in _sse.events(resp.iter_chunks()):
                if event.event == "endpoint" and not found.done():
                    found.set_result(event.data.strip())
                elif event.event in ("", "message") and event.data:
                    for item in _parse(event.data):
                        self._dispatch(item)
        except errors.KarsError:
            pass
        finally:
            resp.close()
            self._gone = True
            if not found.done():
                found.set_exception(Gone("stream ended"))
            for queue in self._pending.values():
                queue.put_nowait(None)
            self._unrelated.put_nowait(None)

    def _dispatch(self, pair: Message) -> None:
        item = pair[0]
        if _wire.is_response(item) and item.get("id") in self._pending:
            self._pending[item["id"]].put_nowait(pair)
            return
        if item.get("method") == "notifications/progress":
            params = item.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            owner = self._progress.get(token)
            if owner in self._pending:
                self._pending[owner].put_nowait(pair)
                return
        self._unrelated.put_nowait(pair)

    async def _post(self, raw: bytes) -> None:
        if self._gone or self._endpoint is None:
            raise Gone("upstream stream ended")
        client, path = await self._pool.client(self._endpoint)
        headers = [*self._headers(_wire.CONTENT_TYPE_JSON), ("content-type", _wire.CONTENT_TYPE_JSON)]
        try:
            resp = await client.request("POST", path, headers=headers, body=raw)
        except errors.KarsError as exc:
            raise Gone(exc.message) from exc
        resp.close()
        if resp.status == 404:
            raise Gone("upstream session expired")
        if resp.status >= 400:
            raise errors.UpstreamError(f"upstream answered HTTP {resp.status}")

    async def request(self, message: dict[str, Any], raw: bytes) -> AsyncIterator[Message]:
        request_id = message.get("id")
        token = _wire.progress_token(message)
        queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._pending[request_id] = queue
        if token is not None:
            self._progress[token] = request_id
        read_s = self._pool.read_timeout_s
        try:
            await self._post(raw)
            while True:
                # The reply comes on the shared stream, which stays busy with other traffic, so
                # the stream's own read timeout cannot see one request go unanswered: as on a
                # Streamable HTTP upstream, the request fails alone when nothing of it comes.
                try:
                    async with asyncio.timeout(read_s):
                        item = await queue.get()
                except TimeoutError:
                    raise errors.UpstreamTimeout(http.stopped_sending(read_s)) from None
                if item is None:
                    raise Gone("upstream stream ended")
                yield item
                if _wire.is_response(item[0]):
                    return
        finally:
            self._pending.pop(request_id, None)
            if token is not None:
                self._progress.pop(token, None)

    async def send(self, raw: bytes) -> None:
        await self._post(raw)

    async def listen(self) -> AsyncIterator[Message]:
        while True:
            item = await self._unrelated.get()
            if item is None:
                raise Gone("upstream stream ended")
            yield item

    async def close(self) -> None:
        self._gone = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


Upstream = StreamableUpstream | SseUpstream
