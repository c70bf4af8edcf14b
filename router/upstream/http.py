"""The upstream HTTP client: one pooled client per upstream, hidden behind a small interface.

The library is chosen by measurement (ARCHITECTURE.md "Hot path budget", ``bench/``): aiohttp as
a proxy's upstream client was 5-10x faster than httpx's default transport on this kind of
machine, so it sits behind this module and nothing else imports it. Swapping it means rewriting
this one file. HTTP/1.1 with a keep-alive pool: aiohttp has no HTTP/2, and httpx's HTTP/2 (h2)
runs on the same slow transport; to one upstream host, a warm pool of HTTP/1.1 connections
already avoids handshakes, which is what HTTP/2 would buy a proxy (bench/README.md).

Everything aiohttp raises is translated here into ``router.errors`` (the one boundary):

    connect refused or timed out / DNS / peer closed before replying -> UpstreamError(code="upstream_unavailable")
    no headers or no next chunk within ``read_timeout_s`` -> UpstreamTimeout
    a reply that is not valid HTTP, or a body cut short  -> UpstreamError(code="upstream_error")

Redirects are never followed (a 3xx is the upstream's answer). Bodies are not decompressed:
callers ask for ``identity`` and pass through whatever arrives.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterable

import aiohttp
import yarl

from router import errors

MAX_CONNECTIONS = 1024  # per client; concurrent streams each hold one
KEEPALIVE_S = 30.0
READ_CHUNK_BYTES = 64 * 1024


# Response headers never relayed to the caller: hop-by-hop (RFC 9110 §7.6.1), what our own
# server sets itself, and cookies meant for the router rather than the caller.
DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"server",
        b"set-cookie",
    }
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    connect_s: float = 5.0
    read_s: float = 300.0  # for the response headers, then between two chunks of the body


class Response:
    """One upstream reply: status and raw headers now, the body read or iterated later.

    Always ``close()`` it (the client counts open replies: a leak shows in ``Client.open``).
    A body read to its end returns the connection to the pool; a reply closed early drops it.
    """

    __slots__ = ("_client", "_closed", "_resp", "headers", "status")

    def __init__(self, client: Client, resp: aiohttp.ClientResponse) -> None:
        self._client = client
        self._resp = resp
        self._closed = False
        self.status: int = resp.status
        self.headers: tuple[tuple[bytes, bytes], ...] = resp.raw_headers

    async def read(self, limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` bytes of the body, and whether that was the whole body."""
        length = self._resp.content_length
        if length is not None and length <= limit:  # the common reply: one read, no per-chunk loop
            try:
                return await self._resp.read(), True
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                raise errors.UpstreamTimeout(self._client.stopped_sending()) from exc
            except aiohttp.ClientError as exc:
                raise errors.UpstreamError(f"upstream reply broken off: {type(exc).__name__}") from exc
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(chunks), False
        return b"".join(chunks), True

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive from the network."""
        content = self._resp.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise errors.UpstreamTimeout(self._client.stopped_sending()) from exc
        except aiohttp.ClientError as exc:
            raise errors.UpstreamError(f"upstream reply broken off: {type(exc).__name__}") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.open -= 1
        if self._resp.content.at_eof():
            self._resp.release()  # whole body read: the connection goes back to the pool
        else:
            self._resp.close()  # cut short: the connection cannot be reused


def stopped_sending(read_s: float) -> str:
    """The message of a read timeout: the upstream went silent for ``read_s``."""
    return f"upstream stopped sending for {read_s:g} s"


class Client:
    """A pooled HTTP client for one upstream base URL, for the app's lifetime.

    ``start()`` inside the running loop (the app's lifespan), ``aclose()`` at shutdown.
    """

    def __init__(self, base_url: str, *, timeouts: Timeouts = Timeouts()) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None
        self._connector: aiohttp.TCPConnector | None = None
        self.open = 0  # replies handed out and not closed yet

    async def start(self) -> None:
        self._connector = aiohttp.TCPConnector(
            limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_S
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._timeouts.connect_s, sock_read=self._timeouts.read_s
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            read_bufsize=READ_CHUNK_BYTES,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def connections_in_use(self) -> int:
        """Connections checked out of the pool now (0 when idle: nothing leaked)."""
        connector = self._connector
        return len(connector._acquired) if connector is not None else 0

    def stopped_sending(self) -> str:
        return stopped_sending(self._timeouts.read_s)

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str]],
        body: bytes | None,
        long_lived: bool = False,
    ) -> Response:
        """Send one request to ``base_url + path`` (path already quoted, query included).

        ``long_lived``: an event stream that may rightly stay silent (an MCP session's GET
        stream): its headers must come within the read timeout, its body may pause for as long
        as it likes. Every other reply fails when it stops sending for the read timeout.
        """
        session = self._session
        if session is None:
            raise errors.ServiceUnavailable("upstream client is not started", code="upstream_not_configured")
        url = yarl.URL(self.base_url + path, encoded=True)
        try:
            if long_lived:
                async with asyncio.timeout(self._timeouts.read_s):
                    resp = await session.request(
                        method,
                        url,
                        headers=list(headers),
                        data=body,
                        allow_redirects=False,
                        compress=None,
                        timeout=aiohttp.ClientTimeout(total=None, connect=self._timeouts.connect_s),
                    )
            else:
                resp = await session.request(
                    method, url, headers=list(headers), data=body, allow_redirects=False, compress=None
                )
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError, its base: nothing was sent
            message = f"upstream unreachable: no connection within {self._timeouts.connect_s:g} s"
            raise errors.UpstreamError(message, code="upstream_unavailable") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise errors.UpstreamTimeout(f"upstream did not answer within {self._timeouts.read_s:g} s") from exc
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            raise errors.UpstreamError("upstream unreachable", code="upstream_unavailable") from exc
        except aiohttp.ClientError as exc:
            raise errors.UpstreamError(f"upstream reply is not valid HTTP: {type(exc).__name__}") from exc
        self.open += 1
        return Response(self, resp)
