"""A fake Azure AI Content Safety text API (api-version 2024-09-01): the real wire format. Test code only.

``POST /contentsafety/text:analyze?api-version=2024-09-01`` takes ``{text, categories?,
outputType?}`` and answers ``{"blocklistsMatch": [], "categoriesAnalysis": [{"category",
"severity"}]}`` for Hate, SelfHarm, Sexual and Violence (severities 0, 2, 4, 6 by default, 0..7 with
``EightSeverityLevels``). ``POST /contentsafety/text:shieldPrompt`` takes ``{userPrompt?,
documents?}`` and answers ``{"userPromptAnalysis": {"attackDetected"}, "documentsAnalysis":
[{"attackDetected"}]}``. Auth by ``Ocp-Apim-Subscription-Key`` (or ``Authorization: Bearer``); a
missing api-version, a bad key, a text over 10,000 characters or a malformed body get the
service's error shape ``{"error": {"code", "message"}}``.

The real service rates meaning; this one reads markers so tests choose the verdict: ``cs:Violence:5``
in a text rates Violence 5 (the highest marker of a category wins), ``cs:attack`` is an attack.
``fail_status`` makes every call answer that status (an erroring service); with ``fail_after`` set,
only the calls after the first ``fail_after`` (a service that goes down while a request is in flight).
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import Receive, Scope, Send

from tests.support import asgi

API_VERSION = "2024-09-01"
MAX_TEXT_CHARS = 10_000
CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
_MARKER = re.compile(r"cs:(Hate|SelfHarm|Sexual|Violence):([0-7])")
ATTACK = "cs:attack"


class FakeContentSafety:
    def __init__(self, *, key: str | None = None, bearer: str | None = None) -> None:
        self.key = key
        self.bearer = bearer
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (operation, request body)
        self.fail_status: int | None = None
        self.fail_after = 0

    def operations(self, name: str) -> list[dict[str, Any]]:
        return [body for op, body in self.calls if op == name]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await asgi.lifespan(receive, send)
        body = await asgi.read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if not self._authorized(headers):
            message = "Access denied due to invalid subscription key or wrong API endpoint."
            return await _json(send, 401, {"error": {"code": "401", "message": message}})
        if f"api-version={API_VERSION}" not in scope["query_string"].decode():
            return await _error(send, 404, "NotFound", "Resource not found")
        operation = scope["path"].removeprefix("/contentsafety/text:")
        if scope["method"] != "POST" or operation not in ("analyze", "shieldPrompt"):
            return await _error(send, 404, "NotFound", "Resource not found")
        try:
            doc = json.loads(body)
        except ValueError:
            return await _error(send, 400, "InvalidRequestBody", "The request body is not valid JSON.")
        if not isinstance(doc, dict):
            return await _error(send, 400, "InvalidRequestBody", "The request body must be an object.")
        self.calls.append((operation, doc))
        if self.fail_status is not None and len(self.calls) > self.fail_after:
            return await _error(send, self.fail_status, "InternalServerError", "Internal server error.")
        if operation == "analyze":
            return await self._analyze(send, doc)
        return await self._shield(send, doc)

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.key is not None:
            return headers.get("ocp-apim-subscription-key") == self.key
        if self.bearer is not None:
            return headers.get("authorization") == f"Bearer {self.bearer}"
        return True

    async def _analyze(self, send: Send, doc: dict[str, Any]) -> None:
        text = doc.get("text")
        if not isinstance(text, str) or not text:
            return await _error(send, 400, "InvalidRequestBody", "The field text is required.")
        if len(text) > MAX_TEXT_CHARS:
            return await _error(send, 400, "InvalidRequestBody", f"The maximum length of text is {MAX_TEXT_CHARS}.")
        categories = doc.get("categories") or list(CATEGORIES)
        eight = doc.get("outputType") == "EightSeverityLevels"
        rated = {c: 0 for c in CATEGORIES}
        for category, level in _MARKER.findall(text):
            rated[category] = max(rated[category], int(level))
        analysis = [
            {"category": c, "severity": rated[c] if eight else rated[c] // 2 * 2} for c in CATEGORIES if c in categories
        ]
        await _json(send, 200, {"blocklistsMatch": [], "categoriesAnalysis": analysis})

    async def _shield(self, send: Send, doc: dict[str, Any]) -> None:
        prompt = doc.get("userPrompt")
        documents = doc.get("documents") or []
        texts = [prompt, *documents] if isinstance(prompt, str) else documents
        if any(not isinstance(t, str) or len(t) > MAX_TEXT_CHARS for t in texts):
            return await _error(send, 400, "InvalidRequestBody", "Each text must be a string of at most 10000.")
        reply: dict[str, Any] = {"documentsAnalysis": [{"attackDetected": ATTACK in d} for d in documents]}
        if isinstance(prompt, str):
            reply["userPromptAnalysis"] = {"attackDetected": ATTACK in prompt}
        await _json(send, 200, reply)


async def _error(send: Send, status: int, code: str, message: str) -> None:
    await _json(send, status, {"error": {"code": code, "message": message, "details": [], "innererror": None}})


async def _json(send: Send, status: int, doc: Any) -> None:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
