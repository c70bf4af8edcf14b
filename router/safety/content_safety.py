"""Azure AI Content Safety (REST, api-version 2024-09-01) as a content-safety provider.

``POST {endpoint}/contentsafety/text:analyze`` rates a text (at most ``MAX_TEXT_CHARS``; longer
texts are split and the pieces rated concurrently) for Hate, SelfHarm, Sexual and Violence;
``text:shieldPrompt`` looks for attacks in the user's prompt and in documents (only when a policy
has ``requirePromptShields``). Severities come as 0, 2, 4, 6 (``FourSeverityLevels``, the default)
or 0..7; both map to Safe, Low, Medium, High as ``severity // 2``. Auth is the key from
``safety.contentSafetyKeyFile`` (``Ocp-Apim-Subscription-Key``) or an azure-identity token for the
Cognitive Services scope, through the same broker as Foundry's. One pooled client
(``router.upstream.http``) for the app's lifetime; every failure (unreachable, timeout, non-200,
malformed reply, no credential) is ``verdict.Unavailable``, which the middleware turns into a 503
``content_safety_unavailable`` unless failOpen applies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

from router import errors
from router.safety import texts, verdict
from router.upstream import azure_token, credentials
from router.upstream import http as http_mod

log = logging.getLogger("kars.safety")

PROVIDER = "content_safety"
API_VERSION = "2024-09-01"
MAX_TEXT_CHARS = 10_000  # text:analyze and text:shieldPrompt limit per text
MAX_DOCUMENTS = 5  # documents per shieldPrompt call
MAX_REPLY_BYTES = 256 * 1024
MAX_CONCURRENT_CALLS = 32  # per router: a 4 MiB prompt must not open 400 connections at once
STREAM_BATCH_CHARS = 1000  # streamed output is rated (and held back) in pieces this long
KEY_HEADER = "Ocp-Apim-Subscription-Key"
SCOPE = "https://cognitiveservices.azure.com/.default"
_CATEGORIES = {"Hate": "hate", "SelfHarm": "self_harm", "Sexual": "sexual", "Violence": "violence"}


def split(text: str, limit: int = MAX_TEXT_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at whitespace where one is near."""
    pieces = []
    start = 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + limit * 4 // 5, start + limit)
        end = cut + 1 if cut > start else start + limit
        pieces.append(text[start:end])
        start = end
    if start < len(text) or not pieces:
        pieces.append(text[start:])
    return pieces


class KeyFileAuth:
    """The Content Safety key from a mounted secret file, read off the loop at start."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._headers: credentials.Headers = ()

    async def start(self) -> None:
        try:
            key = (await asyncio.to_thread(self._path.read_text, encoding="utf-8")).strip()
        except OSError as exc:
            log.warning("cannot read safety.contentSafetyKeyFile %s: %s", self._path, exc.strerror or exc)
            return
        self._headers = ((KEY_HEADER, key),) if key else ()

    async def headers(self) -> credentials.Headers:
        if not self._headers:
            await self.start()
            if not self._headers:
                raise errors.UpstreamError(f"no Content Safety key in {self._path}", code="upstream_unavailable")
        return self._headers

    async def check(self) -> str | None:
        return None if self._headers else f"no Content Safety key in {self._path}"

    async def aclose(self) -> None:
        return None


def auth_for(key_file: Path | None, credential: str) -> credentials.Broker:
    if key_file is not None:
        return KeyFileAuth(key_file)
    return azure_token.TokenBroker(azure_token.credential_for(credential), SCOPE)


class ContentSafetyProvider:
    name = PROVIDER
    stream_batch_chars = STREAM_BATCH_CHARS
    overlap_chars = 0  # rated by meaning, in batches: no pattern spans two batches
    checks_output = True

    def __init__(self, endpoint: str, *, auth: credentials.Broker, timeout_s: float) -> None:
        self._client = http_mod.Client(endpoint, timeouts=http_mod.Timeouts(connect_s=timeout_s, read_s=timeout_s))
        self._auth = auth
        self._timeout_s = timeout_s
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        self.calls = 0  # requests made to the service (tests, bench)

    async def start(self) -> None:
        await self._client.start()
        await self._auth.start()

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._auth.aclose()

    async def _post(self, operation: str, payload: dict[str, Any]) -> dict[str, Any]:
        path = f"/contentsafety/text:{operation}?api-version={API_VERSION}"
        async with self._limit:
            self.calls += 1
            try:
                headers = [("content-type", "application/json"), *await self._auth.headers()]
                async with asyncio.timeout(self._timeout_s * 2):  # connect + read, whatever the pool does
                    reply = await self._client.request("POST", path, headers=headers, body=json.dumps(payload).encode())
                    try:
                        data, complete = await reply.read(MAX_REPLY_BYTES)
                    finally:
                        reply.close()
            except TimeoutError:
                raise verdict.Unavailable(PROVIDER, f"text:{operation} timed out") from None
            except errors.KarsError as exc:
                raise verdict.Unavailable(PROVIDER, f"text:{operation}: {exc.message}") from None
        if reply.status != 200:
            raise verdict.Unavailable(PROVIDER, f"text:{operation} answered {reply.status}")
        try:
            doc = json.loads(data) if complete else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise verdict.Unavailable(PROVIDER, f"text:{operation} sent a malformed reply")
        return doc

    async def _analyze_one(self, text: str) -> list[verdict.Finding]:
        doc = await self._post("analyze", {"text": text, "categories": list(_CATEGORIES)})
        analysis = doc.get("categoriesAnalysis")
        if not isinstance(analysis, list):
            raise verdict.Unavailable(PROVIDER, "text:analyze reply has no categoriesAnalysis")
        out = []
        for entry in analysis:
            if not isinstance(entry, dict):
                continue
            category = _CATEGORIES.get(str(entry.get("category")))
            severity = entry.get("severity")
            if category is not None and isinstance(severity, int) and severity >= 0:
                out.append(verdict.Finding(category, PROVIDER, min(3, severity // 2)))
        return out

    async def _shield_one(self, user: str | None, documents: Sequence[str]) -> list[verdict.Finding]:
        payload: dict[str, Any] = {"documents": list(documents)}
        if user is not None:
            payload["userPrompt"] = user
        doc = await self._post("shieldPrompt", payload)
        out = []
        prompt = doc.get("userPromptAnalysis")
        if isinstance(prompt, dict) and prompt.get("attackDetected") is True:
            out.append(verdict.Finding(verdict.JAILBREAK, PROVIDER))
        docs = doc.get("documentsAnalysis")
        if isinstance(docs, list) and any(isinstance(d, dict) and d.get("attackDetected") is True for d in docs):
            out.append(verdict.Finding(verdict.INDIRECT, PROVIDER))
        return out

    def _analyses(self, text: str) -> list[Awaitable[list[verdict.Finding]]]:
        return [self._analyze_one(piece) for piece in split(text)] if text else []

    def _shields(self, prompt: texts.Prompt) -> list[Awaitable[list[verdict.Finding]]]:
        calls: list[Awaitable[list[verdict.Finding]]] = []
        if prompt.user:
            calls.extend(self._shield_one(piece, ()) for piece in split("\n\n".join(prompt.user)))
        pieces = [piece for d in prompt.documents for piece in split(d) if piece]
        for i in range(0, len(pieces), MAX_DOCUMENTS):
            calls.append(self._shield_one(None, pieces[i : i + MAX_DOCUMENTS]))
        return calls

    async def check_prompt(self, prompt: texts.Prompt, *, shields: bool) -> list[verdict.Finding]:
        calls = self._analyses("\n\n".join(prompt.all()))
        if shields:
            calls.extend(self._shields(prompt))
        return await _all(calls)

    async def check_output(self, text: str) -> list[verdict.Finding]:
        return await _all(self._analyses(text))


async def _all(calls: list[Awaitable[list[verdict.Finding]]]) -> list[verdict.Finding]:
    """Run ``calls`` concurrently; the first failure cancels the rest and is raised."""
    if not calls:
        return []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_wrap(c)) for c in calls]
    except ExceptionGroup as failed:
        first = failed.exceptions[0]
        if isinstance(first, verdict.Unavailable):
            raise first from None
        raise
    return [f for t in tasks for f in t.result()]


async def _wrap(call: Awaitable[list[verdict.Finding]]) -> list[verdict.Finding]:
    return await call
