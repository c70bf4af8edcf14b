"""The output of one request, checked as it passes: ``OutputGuard`` wraps the transport's ``send``.

- a 2xx JSON reply (the transport sends it whole, up to 4 MiB) is held and checked before any of
  it goes out (a larger reply streams on unchecked). Blocked output of a chat or completions
  reply is answered as Azure OpenAI answers it: 200, every choice's text removed, its
  ``finish_reason`` ``content_filter`` and its ``content_filter_results`` naming what tripped; a
  reply without choices (Responses, images) becomes the 400 ``content_filter`` error;
- an SSE reply is checked event by event as the transport sends whole events: annotations at
  once, the local floor on each event's text (with an overlap, for matches across events), Content
  Safety on batches of text (events are held back until their batch is rated, as Azure's own
  default streaming filter does). A violation ends the stream with an SSE ``error`` event and
  ``data: [DONE]``; the guarded ``send`` then raises ``Blocked`` so the transport stops and closes
  the upstream reply; the middleware catches it. A prompt flagged in the stream's first chunk,
  before anything went out, is a plain 400;
- an upstream error reply passes through as is; a content-filter 400 from the upstream is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from starlette.types import Message, Send

from router import _asgi, errors
from router.safety import foundry, providers, texts, verdict
from router.safety import judge as judge_mod
from router.transports import _sse

MAX_ERROR_BYTES = 64 * 1024  # of an upstream error reply, kept to read its content-filter result


class Blocked(Exception):
    """Raised by the guarded ``send``: stop relaying. ``answered``: the caller already has the error."""

    def __init__(self, error: errors.KarsError, *, answered: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.answered = answered


class _Lane:
    """Output text waiting for one provider's check."""

    __slots__ = ("carry", "parts", "provider", "size")

    def __init__(self, provider: providers.Provider) -> None:
        self.provider = provider
        self.parts: list[str] = []
        self.size = 0
        self.carry = ""

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)

    def due(self, final: bool) -> bool:
        return self.size > 0 and (final or self.size >= self.provider.stream_batch_chars)

    def take(self) -> str:
        text = self.carry + "".join(self.parts)
        self.parts.clear()
        self.size = 0
        overlap = self.provider.overlap_chars
        self.carry = text[-overlap:] if overlap else ""
        return text


def _is_prompt(error: errors.KarsError) -> bool:
    return error.extra.get("param") == "prompt"


def _event_doc(event: bytes) -> Any:
    """The JSON ``data`` of one SSE event, or None ([DONE], comments, keep-alives, not JSON)."""
    data = _sse.event_data(event)
    if not data.startswith(b"{"):
        return None
    try:
        return orjson.loads(data)
    except ValueError:
        return None


def _filtered_choices(doc: Any, refusal: errors.KarsError) -> Any:
    """A chat/completions reply with its generated content removed, as Azure filters output.

    Each choice keeps its index and role; its text (``message.content``, ``text``) and any tool
    or function call (whose arguments are generated too) are dropped. None when ``doc`` has no
    choices to filter.
    """
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        return None
    result = refusal.extra["innererror"]["content_filter_result"]
    out = []
    for choice in choices:
        kept = {**choice, "finish_reason": "content_filter", "content_filter_results": result}
        message = choice.get("message")
        if isinstance(message, dict):
            kept["message"] = {
                k: v for k, v in message.items() if k not in ("tool_calls", "function_call", "audio", "refusal")
            } | {"content": None}
        if "text" in choice:
            kept["text"] = ""
        kept.pop("logprobs", None)
        out.append(kept)
    return {**doc, "choices": out}


def _content_type(message: Message) -> bytes:
    for key, value in message.get("headers", ()):
        if key.lower() == b"content-type":
            return bytes(value).lower()
    return b""


class OutputGuard:
    """Per request: ``send`` is what the transport gets (see the module docstring)."""

    __slots__ = ("_ended", "_error", "_held", "_judge", "_lanes", "_mode", "_send", "_start", "_state")

    def __init__(self, send: Send, judge: judge_mod.Judge, state: dict[str, Any]) -> None:
        self._send = send
        self._state = state
        self._judge = judge
        self._mode = "pass"
        self._start: Message | None = None  # held until the first body is checked
        self._held: list[bytes] = []  # SSE events waiting for a batch check
        self._lanes = [_Lane(p) for p in judge.output_providers]
        self._error = bytearray()
        self._ended = False

    async def send(self, message: Message) -> None:
        if self._ended:
            raise Blocked(errors.InvalidRequest("the response was already ended"), answered=True)
        kind = message["type"]
        if kind == "http.response.start":
            if self._holds(message):
                return None
            return await self._send(message)
        if kind != "http.response.body" or self._mode == "pass":
            return await self._send(message)
        if self._mode == "sse":
            return await self._sse(message)
        if self._mode == "json":
            return await self._json(message)
        return await self._upstream_error(message)

    def _holds(self, start: Message) -> bool:
        """Choose the mode by the response start; True: the start waits until the output is checked."""
        status, ctype = start["status"], _content_type(start)
        ok = 200 <= status < 300
        if ok and ctype.startswith(b"text/event-stream"):
            self._mode, self._start = "sse", start
            return True
        if ok and _asgi.is_json(ctype):
            self._mode, self._start = "json", start
            return True
        self._mode = "error" if status == 400 and _asgi.is_json(ctype) else "pass"
        return False

    async def _release_start(self) -> None:
        if self._start is not None:
            start, self._start = self._start, None
            await self._send(start)

    async def _json(self, message: Message) -> None:
        if message.get("more_body", False):  # larger than the transport reads whole: not checked
            self._mode = "pass"
            self._judge.note("safetyOutput", "unchecked")
            await self._release_start()
            return await self._send(message)
        body = message.get("body", b"")
        parsed = self._state.get(_asgi.REPLY_JSON)
        if parsed is not None and parsed[0] is body:  # the transport parsed this very body already
            doc = parsed[1]
        else:
            try:
                doc = orjson.loads(body)
            except ValueError:
                doc = None
        if self._judge.output_providers or foundry.prompt_findings(doc) or foundry.output_findings(doc):
            await self._check_whole(doc)
        # else (nearly every reply): no annotation says anything and no provider rates output text.
        await self._release_start()
        await self._send(message)

    async def _sse(self, message: Message) -> None:
        more = message.get("more_body", False)
        body = message.get("body", b"")
        if not self._lanes and body.find(b"filter_results") < 0:  # nothing to rate, no annotation in it
            await self._release_start()
            return await self._send(message)
        events = _sse.events(body)
        cleared: list[bytes] = []  # events every provider has passed, sent together at the end
        for event in events:
            self._held.append(event)
            refusal = await self._judge_event(_event_doc(event), final=False)
            if refusal is not None:
                await self._end(refusal, before=cleared)
            if not any(lane.size for lane in self._lanes):
                cleared.extend(self._held)
                self._held.clear()
        if not more and self._held:  # the end of the stream: rate what is left, then let it go
            refusal = await self._judge_event(None, final=True)
            if refusal is not None:
                await self._end(refusal, before=cleared)
            cleared.extend(self._held)
            self._held.clear()
        if cleared or not more:
            await self._release_start()
            await self._send({"type": "http.response.body", "body": b"".join(cleared), "more_body": more})

    async def _judge_event(self, doc: Any, *, final: bool) -> errors.KarsError | None:
        judge = self._judge
        if doc is not None:
            blocked = verdict.tripped(foundry.prompt_findings(doc), judge.ceilings)
            if blocked:
                return judge.block(blocked, "prompt")
            text = texts.delta_of(doc) if self._lanes else ""
            if text:
                for lane in self._lanes:
                    lane.add(text)
        due = [lane for lane in self._lanes if lane.due(final)]
        calls = [(lane.provider.name, lane.provider.check_output(lane.take())) for lane in due]
        found, down = await judge_mod.gather(calls) if calls else ([], None)
        annotated = foundry.output_findings(doc) if doc is not None else []
        return judge.decide([*annotated, *found], down, "output")

    async def _check_whole(self, doc: Any) -> None:
        """A whole JSON reply: its annotations, and its text rated by every provider at once."""
        judge = self._judge
        blocked = verdict.tripped(foundry.prompt_findings(doc), judge.ceilings)
        if blocked:
            await self._end(judge.block(blocked, "prompt"), stream=False)
        text = texts.output_of(doc) if judge.output_providers else ""
        calls = [(p.name, p.check_output(text)) for p in judge.output_providers] if text else []
        found, down = await judge_mod.gather(calls) if calls else ([], None)
        refusal = judge.decide([*foundry.output_findings(doc), *found], down, "output")
        if refusal is None:
            return
        # Only a content filter on the output is answered as Azure does, with the choices emptied;
        # anything else (a provider down: 503) is the whole answer.
        filtered = None if _is_prompt(refusal) or "innererror" not in refusal.extra else _filtered_choices(doc, refusal)
        if filtered is None:
            await self._end(refusal, stream=False)
        await self._answer(filtered, refusal)

    async def _answer(self, doc: Any, refusal: errors.KarsError) -> None:
        """Send ``doc`` as the whole 200 reply in place of what the upstream generated."""
        self._ended = True
        body = orjson.dumps(doc)
        start = self._start or {"type": "http.response.start", "status": 200, "headers": []}
        self._start = None
        headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
        raise Blocked(refusal, answered=True)

    async def _end(self, error: errors.KarsError, *, stream: bool = True, before: Sequence[bytes] = ()) -> None:
        """Stop the response with ``error``: in-stream (after the ``before`` events), or as the whole answer.

        A prompt refusal before anything went out, and any refusal of a whole JSON reply, are the
        whole answer (a plain 400); otherwise the stream ends with an ``error`` event and ``[DONE]``.
        """
        self._ended = True
        self._held.clear()
        if not stream or (self._start is not None and not before and _is_prompt(error)):
            raise Blocked(error, answered=False)
        await self._release_start()
        body = b"".join(before) + _sse.error_event(error.body())
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
        raise Blocked(error, answered=True)

    async def _upstream_error(self, message: Message) -> None:
        if len(self._error) < MAX_ERROR_BYTES:
            self._error += message.get("body", b"")[: MAX_ERROR_BYTES - len(self._error)]
        await self._send(message)
        if message.get("more_body", False):
            return
        try:
            doc = orjson.loads(self._error)
        except ValueError:
            return
        filtered = foundry.error_findings(doc)
        if filtered is not None:
            self._judge.upstream_blocked(filtered)
