"""Decode a ``text/event-stream`` body arriving as byte chunks into events.

The line splitting and field rules (WHATWG HTML "event stream interpretation") are httpx-sse's
decoders, which work on text lines and need no httpx response; the upstream client here is
aiohttp (router.upstream.http), so only the chunk-to-text step is ours.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator

from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder


async def events(chunks: AsyncIterator[bytes]) -> AsyncIterator[ServerSentEvent]:
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    async for chunk in chunks:
        for line in lines.decode(text.decode(chunk)):
            event = decoder.decode(line)
            if event is not None:
                yield event
    for line in [*lines.decode(text.decode(b"", final=True)), *lines.flush(), ""]:
        event = decoder.decode(line)
        if event is not None:
            yield event
