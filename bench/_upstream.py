"""The bench's fake Foundry: a minimal ASGI app answering Azure OpenAI chat completions fast.

Non-streaming: a ~1 KB ``chat.completion`` (Azure's shape, usage included). Streaming: ten
``chat.completion.chunk`` events (plus the usage chunk when ``stream_options.include_usage``),
then ``data: [DONE]``. It answers any path ending in ``chat/completions`` (Azure deployments
style, ``/openai/v1``, or what LiteLLM calls), so every system under test hits the same code.
Run: ``uvicorn bench._upstream:app``. Loopback only; benchmark code, not a test double.
"""

from __future__ import annotations

import json
from typing import Any

from tests.support import asgi

_FILTER = {k: {"filtered": False, "severity": "safe"} for k in ("hate", "self_harm", "sexual", "violence")}
_TEXT = "The quick brown fox jumps over the lazy dog. " * 12
_USAGE = {"prompt_tokens": 240, "completion_tokens": 120, "total_tokens": 360}
COMPLETION = json.dumps(
    {
        "choices": [
            {
                "content_filter_results": _FILTER,
                "finish_reason": "stop",
                "index": 0,
                "logprobs": None,
                "message": {"content": _TEXT, "refusal": None, "role": "assistant"},
            }
        ],
        "created": 1700000000,
        "id": "chatcmpl-bench",
        "model": "gpt-4o",
        "object": "chat.completion",
        "system_fingerprint": "fp_bench",
        "usage": _USAGE,
    }
).encode()


def _chunk(delta: dict[str, Any], **extra: Any) -> bytes:
    doc = {
        "choices": [{"delta": delta, "finish_reason": None, "index": 0}],
        "created": 1700000000,
        "id": "chatcmpl-bench",
        "model": "gpt-4o",
        "object": "chat.completion.chunk",
        **extra,
    }
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


STREAM_CHUNKS = [_chunk({"content": f"word{i} "}) for i in range(10)]
USAGE_CHUNK = b"data: " + json.dumps({"choices": [], "id": "chatcmpl-bench", "usage": _USAGE}).encode() + b"\n\n"
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(COMPLETION)).encode())]
_SSE_HEADERS = [(b"content-type", b"text/event-stream")]


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return await asgi.lifespan(receive, send)
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    if not scope["path"].endswith("chat/completions"):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if b'"stream": true' not in body and b'"stream":true' not in body:
        await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": COMPLETION})
        return
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    for chunk in STREAM_CHUNKS:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    if b'"include_usage":true' in body.replace(b" ", b""):
        await send({"type": "http.response.body", "body": USAGE_CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
