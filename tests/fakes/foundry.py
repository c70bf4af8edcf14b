"""A fake Azure OpenAI / Foundry data plane: the real wire format, served by real uvicorn. Test code only.

It answers what the router forwards (chat completions, legacy completions, embeddings, Responses,
streaming and not; multipart image edits and audio transcriptions) in the shapes Azure OpenAI sends:
``prompt_filter_results`` first in streams, ``choices: []`` chunks, the usage chunk before ``data:
[DONE]`` only with ``stream_options.include_usage``, Responses events with ``response.completed``
carrying usage, and Azure's error body on a bad key. Every request is recorded (method, path, query,
headers, raw body) so tests can assert what reached the upstream.

Deployment (or ``model``) names select faults, so one fake serves the fallback tests too:
``throttled`` 429, ``broken`` 500, ``badjson`` a 200 with malformed JSON, ``slow`` no answer
until the caller leaves, ``moved`` a 307, ``stalls`` a stream that stops sending, ``dies`` a
stream cut off mid-way, ``endless`` a stream that runs until the caller leaves, ``gated`` a
stream that sends one chunk and waits for ``release()``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from tests.support import asgi

FAULT_WAIT_S = 10.0  # the longest any fault holds a request (every wait is bounded)
WORDS = ["Hello", " from", " the", " fake", " upstream", "."]
PROMPT_FILTER = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            k: {"filtered": False, "severity": "safe"} for k in ("hate", "self_harm", "sexual", "violence")
        },
    }
]
CONTENT_FILTER = {k: {"filtered": False, "severity": "safe"} for k in ("hate", "self_harm", "sexual", "violence")}


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeFoundry:
    """The ASGI app; ``api_key`` or ``bearer`` is the credential it demands (None: any)."""

    def __init__(self, *, api_key: str | None = None, bearer: str | None = None) -> None:
        self.api_key = api_key
        self.bearer = bearer
        self.requests: list[Recorded] = []
        self.disconnects = 0  # requests whose caller went away before the fake finished
        self._gate = threading.Event()
        self.gate_timed_out = False

    def release(self) -> None:
        self._gate.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await asgi.lifespan(receive, send)
        body = await asgi.read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rec = Recorded(scope["method"], scope["path"], parse_qs(scope["query_string"].decode()), headers, body)
        self.requests.append(rec)
        if not self._authorized(headers):
            return await _json(send, 401, {"error": {"code": "401", "message": "Access denied due to invalid key."}})
        path = scope["path"]
        # Image edits come as multipart/form-data (the image and the prompt as parts), the rest as JSON.
        doc = json.loads(body) if body and "json" in headers.get("content-type", "") else {}
        deployment = doc.get("model", "")
        if path.startswith("/openai/deployments/"):
            deployment = path.split("/")[3]
        endpoint = path.rsplit("/", 2)
        kind = "chat" if path.endswith("chat/completions") else endpoint[-1]
        if await self._fault(deployment, receive, send):
            return
        stream = doc.get("stream") is True
        include_usage = (doc.get("stream_options") or {}).get("include_usage") is True
        if kind == "chat":
            if stream:
                return await self._chat_stream(deployment, include_usage, receive, send)
            return await _json(send, 200, _chat(deployment))
        if kind == "completions":
            return await _json(send, 200, _completion(deployment))
        if kind == "embeddings":
            return await _json(send, 200, _embeddings(deployment, doc.get("input")))
        multipart = headers.get("content-type", "").startswith("multipart/form-data")
        if kind == "edits" and multipart:
            return await _json(send, 200, _image_edit())
        if kind == "transcriptions" and multipart:
            return await _json(send, 200, _transcription())
        if kind == "responses":
            if stream:
                return await _sse(send, _responses_events(deployment))
            return await _json(send, 200, _response(deployment))
        return await _json(send, 404, {"error": {"code": "404", "message": "Resource not found"}})

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.api_key is not None:
            return headers.get("api-key") == self.api_key
        if self.bearer is not None:
            return headers.get("authorization") == f"Bearer {self.bearer}"
        return True

    async def _fault(self, deployment: str, receive: Receive, send: Send) -> bool:
        if deployment == "throttled":
            error = {"error": {"code": "429", "message": "Rate limit is exceeded. Try again in 1 seconds."}}
            await _json(send, 429, error, headers=[(b"retry-after", b"1")])
        elif deployment == "broken":
            await _json(send, 500, {"error": {"code": "InternalServerError", "message": "The server had an error."}})
        elif deployment == "badjson":
            await _raw(send, 200, b"application/json", b'{"id": "chatcmpl-1", "choices": [')
        elif deployment == "slow":
            await self._until_disconnect(receive)
        elif deployment == "moved":
            await _raw(send, 307, b"text/plain", b"moved", [(b"location", b"http://127.0.0.1:9/elsewhere")])
        elif deployment == "stalls":
            await _start_sse(send)
            await send(
                {"type": "http.response.body", "body": _chunk(deployment, {"content": "Hel"}), "more_body": True}
            )
            await self._until_disconnect(receive)
        elif deployment == "dies":
            await _start_sse(send)
            await send(
                {"type": "http.response.body", "body": _chunk(deployment, {"content": "Hel"}), "more_body": True}
            )
            raise RuntimeError("upstream dies mid-stream (on purpose)")
        elif deployment == "endless":
            await _start_sse(send)
            deadline = time.monotonic() + FAULT_WAIT_S
            gone = asyncio.ensure_future(self._until_disconnect(receive))
            try:
                while not gone.done() and time.monotonic() < deadline:
                    await send(
                        {"type": "http.response.body", "body": _chunk(deployment, {"content": "x"}), "more_body": True}
                    )
                    await asyncio.wait([gone], timeout=0.02)
            finally:
                gone.cancel()
            await send({"type": "http.response.body", "body": b""})
        else:
            return False
        return True

    async def _until_disconnect(self, receive: Receive) -> None:
        try:
            async with asyncio.timeout(FAULT_WAIT_S):
                while (await receive())["type"] != "http.disconnect":
                    pass
            self.disconnects += 1
        except TimeoutError:
            pass

    async def _chat_stream(self, deployment: str, include_usage: bool, receive: Receive, send: Send) -> None:
        await _start_sse(send)
        extra = {"usage": None} if include_usage else {}
        first = {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": PROMPT_FILTER,
        }
        await _event(send, first)
        await _event(send, _chunk_doc(deployment, {"role": "assistant", "content": ""}, **extra))
        for i, word in enumerate(WORDS):
            await _event(send, _chunk_doc(deployment, {"content": word}, **extra))
            if i == 0 and deployment == "gated":
                released = await asyncio.to_thread(self._gate.wait, FAULT_WAIT_S)
                self.gate_timed_out = not released
        final = _chunk_doc(deployment, {}, **extra)
        final["choices"][0]["finish_reason"] = "stop"
        await _event(send, final)
        if include_usage:
            usage = {"choices": [], "created": 1, "id": "chatcmpl-fake", "model": deployment}
            usage |= {"object": "chat.completion.chunk", "usage": _usage(9, len(WORDS))}
            await _event(send, usage)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "completion_tokens": completion,
        "completion_tokens_details": {"reasoning_tokens": 0},
        "prompt_tokens": prompt,
        "prompt_tokens_details": {"cached_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _chat(deployment: str) -> dict[str, Any]:
    return {
        "choices": [
            {
                "content_filter_results": CONTENT_FILTER,
                "finish_reason": "stop",
                "index": 0,
                "logprobs": None,
                "message": {"content": "".join(WORDS), "refusal": None, "role": "assistant"},
            }
        ],
        "created": 1700000000,
        "id": "chatcmpl-fake",
        "model": deployment,
        "object": "chat.completion",
        "prompt_filter_results": PROMPT_FILTER,
        "system_fingerprint": "fp_fake",
        "usage": _usage(9, len(WORDS)),
    }


def _completion(deployment: str) -> dict[str, Any]:
    return {
        "choices": [{"finish_reason": "stop", "index": 0, "logprobs": None, "text": "".join(WORDS)}],
        "created": 1700000000,
        "id": "cmpl-fake",
        "model": deployment,
        "object": "text_completion",
        "usage": {"completion_tokens": len(WORDS), "prompt_tokens": 4, "total_tokens": 4 + len(WORDS)},
    }


def _image_edit() -> dict[str, Any]:
    """gpt-image-1's images/edits reply: the image and the tokens it cost."""
    usage = {
        "input_tokens": 50,
        "input_tokens_details": {"image_tokens": 40, "text_tokens": 10},
        "output_tokens": 100,
        "total_tokens": 150,
    }
    return {"created": 1700000000, "data": [{"b64_json": "aW1hZ2U="}], "usage": usage}


def _transcription() -> dict[str, Any]:
    """gpt-4o-transcribe's audio/transcriptions reply (``response_format=json``): the text and its tokens."""
    usage = {
        "type": "tokens",
        "input_tokens": 14,
        "input_token_details": {"text_tokens": 0, "audio_tokens": 14},
        "output_tokens": 45,
        "total_tokens": 59,
    }
    return {"text": "Hello from the fake upstream.", "usage": usage}


def _embeddings(deployment: str, inputs: Any) -> dict[str, Any]:
    items = inputs if isinstance(inputs, list) else [inputs]
    data = [{"embedding": [0.01 * i, -0.02, 0.03], "index": i, "object": "embedding"} for i in range(len(items))]
    n = 3 * len(items)
    return {"data": data, "model": deployment, "object": "list", "usage": {"prompt_tokens": n, "total_tokens": n}}


def _response(deployment: str, status: str = "completed") -> dict[str, Any]:
    text = "".join(WORDS)
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "model": deployment,
        "output": [
            {
                "id": "msg_fake",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 11,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(WORDS),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 11 + len(WORDS),
        },
    }


def _responses_events(deployment: str) -> list[tuple[str, dict[str, Any]]]:
    created = _response(deployment, "in_progress") | {"output": [], "usage": None}
    events: list[tuple[str, dict[str, Any]]] = [("response.created", {"response": created})]
    for word in WORDS:
        events.append(
            (
                "response.output_text.delta",
                {"item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": word},
            )
        )
    events.append(("response.completed", {"response": _response(deployment)}))
    return [(name, {"type": name, "sequence_number": i, **data}) for i, (name, data) in enumerate(events)]


def _chunk(deployment: str, delta: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(_chunk_doc(deployment, delta)).encode() + b"\n\n"


def _chunk_doc(deployment: str, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "choices": [
            {"content_filter_results": {}, "delta": delta, "finish_reason": None, "index": 0, "logprobs": None}
        ],
        "created": 1700000000,
        "id": "chatcmpl-fake",
        "model": deployment,
        "object": "chat.completion.chunk",
        "system_fingerprint": "fp_fake",
        **extra,
    }


async def _json(send: Send, status: int, doc: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _raw(send, status, b"application/json", json.dumps(doc).encode(), headers)


async def _raw(
    send: Send, status: int, ctype: bytes, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    hdrs = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), (b"apim-request-id", b"fake-1")]
    await send({"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])})
    await send({"type": "http.response.body", "body": body})


async def _start_sse(send: Send) -> None:
    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"apim-request-id", b"fake-1")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def _event(send: Send, doc: Any) -> None:
    await send(
        {"type": "http.response.body", "body": b"data: " + json.dumps(doc).encode() + b"\n\n", "more_body": True}
    )


async def _sse(send: Send, events: list[tuple[str, dict[str, Any]]]) -> None:
    await _start_sse(send)
    for name, data in events:
        body = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        await send({"type": "http.response.body", "body": body, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
