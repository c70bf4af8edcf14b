"""Client sessions: identity binding, per-principal caps, idle expiry, and replayable streams.

A ``Session`` pairs one client session with one upstream session (1:1). What the router sends
the client goes through ``Stream`` objects: stream 0 is the session's standalone stream (the
Streamable HTTP GET stream, or the legacy SSE connection); each Streamable HTTP POST that
carries requests gets a stream of its own. Every event is numbered ``"<stream>.<seq>"`` and the
last ``replay_limit`` events of a stream are kept, so a client that lost its connection
resumes with ``Last-Event-ID`` (Streamable HTTP, "Resumability and Redelivery").
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal

from router import errors
from router.transports.mcp import _wire, policy, upstream

ClientKind = Literal["streamable", "sse"]

MAX_LISTED_TOOLS = 1024  # tool names kept per session from the upstream's tools/list


class Stream:
    """An append-only, bounded log of SSE events with any number of waiting readers."""

    def __init__(self, number: int, replay_limit: int) -> None:
        self.number = number
        self.seq = 0
        self.delivered = 0  # highest seq a reader has taken
        self.closed = False
        self.reader: asyncio.Future[Any] | None = None  # the open response writing this stream: its stop
        self.open_requests = 0  # responses still owed on this stream
        self.last_data = ""  # the JSON text of the newest event
        self._events: collections.deque[bytes] = collections.deque(maxlen=replay_limit)
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # done: news

    def push(self, data: str) -> None:
        self.seq += 1
        self.last_data = data
        self._events.append(_wire.sse_event(data, event_id=f"{self.number}.{self.seq}"))
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    @property
    def attached(self) -> bool:
        return self.reader is not None

    def has_more(self, *, after: int) -> bool:
        return after < self.seq

    def take(self) -> bytes:
        """Every event not yet delivered, joined (and now counted as delivered)."""
        if self.delivered >= self.seq:
            return b""
        first = self.seq - len(self._events) + 1
        batch = b"".join(itertools.islice(self._events, max(self.delivered + 1, first) - first, None))
        self.delivered = self.seq
        return batch

    def _wake(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)

    def _next_change(self) -> asyncio.Future[None]:
        if self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    async def follow(self, after: int, idle_s: float, stop: asyncio.Future[Any]) -> AsyncGenerator[bytes | None, None]:
        """Events after seq ``after`` as they come (those ready at once joined in one chunk), until
        closed or ``stop`` is done; ``None`` after ``idle_s`` without one (time for a keep-alive)."""
        loop = asyncio.get_running_loop()
        cursor = after

        def on_stop(_: Any) -> None:
            self._wake()

        stop.add_done_callback(on_stop)
        try:
            while True:
                if cursor < self.seq:
                    first = self.seq - len(self._events) + 1
                    start = max(cursor + 1, first) - first
                    batch = b"".join(itertools.islice(self._events, start, None))  # all ready: one write
                    cursor = self.seq
                    self.delivered = max(self.delivered, cursor)
                    yield batch
                    continue
                if self.closed or stop.done():
                    return
                # A timer, not asyncio.wait/wait_for: this runs once per event on the hot path.
                change = self._next_change()
                timer = loop.call_later(idle_s, _resolve, change)
                try:
                    await change
                finally:
                    timer.cancel()
                if cursor == self.seq and not self.closed and not stop.done():
                    yield None
        finally:
            stop.remove_done_callback(on_stop)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclasses.dataclass(slots=True)
class Call:
    tool: str
    started: float
    decision: policy.Decision
    params: Any


class Session:
    def __init__(
        self,
        *,
        principal: str,
        server: tuple[str, str],
        kind: ClientKind,
        gate: policy.Gate,
        generation: int,
        link: upstream.Upstream,
        replay_limit: int,
    ) -> None:
        self.id = secrets.token_urlsafe(24)
        self.principal = principal
        self.server = server
        self.kind = kind
        self.gate = gate
        self.generation = generation
        self.upstream = link
        self._replay_limit = replay_limit
        self.streams: dict[int, Stream] = {0: Stream(0, replay_limit)}
        self._next_stream = 1
        self.calls: dict[Any, Call] = {}
        self.pending: dict[Any, Stream] = {}  # request id -> the stream its response goes to
        self.lists: set[Any] = set()  # ids of tools/list requests in flight
        self.listed_tools: set[str] = set()  # names the upstream's tools/list gave (metric labels)
        self.initialize_ids: set[Any] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.inline: set[asyncio.Task[Any]] = set()  # request handlers pumping a request themselves
        self.last_active = time.monotonic()
        self.busy = 0
        self.ended = False
        self.listening = False
        self.initialize_failed = False  # the upstream refused initialize: the session ends once that is sent

    def note_tools(self, result: Any) -> None:
        """Remember the tool names of an upstream ``tools/list`` result, at most ``MAX_LISTED_TOOLS``."""
        tools = result.get("tools") if isinstance(result, dict) else None
        for tool in tools if isinstance(tools, list) else ():
            if len(self.listed_tools) >= MAX_LISTED_TOOLS:
                return
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                self.listed_tools.add(tool["name"])

    @property
    def main(self) -> Stream:
        return self.streams[0]

    def new_stream(self) -> Stream:
        stream = Stream(self._next_stream, self._replay_limit)
        self.streams[stream.number] = stream
        self._next_stream += 1
        return stream

    def drop_finished_streams(self, keep: int) -> None:
        """Forget closed request streams beyond the newest ``keep`` (bounded memory; amortised O(1))."""
        if len(self.streams) <= 2 * keep:
            return
        finished = [n for n, s in self.streams.items() if n and s.closed and not s.attached]
        for n in finished[:-keep] if keep else finished:
            del self.streams[n]

    def spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def touch(self) -> None:
        self.last_active = time.monotonic()


class Table:
    """Live sessions by id; a session is visible only to the principal that opened it."""

    def __init__(self, *, max_per_principal: int, idle_timeout_s: float) -> None:
        self._sessions: dict[str, Session] = {}
        self._per_principal: collections.Counter[str] = collections.Counter()
        self.max_per_principal = max_per_principal
        self.idle_timeout_s = idle_timeout_s
        self._watchers: list[asyncio.Future[None]] = []

    def _changed(self) -> None:
        for watcher in self._watchers:
            if not watcher.done():
                watcher.set_result(None)
        self._watchers.clear()

    async def wait_size(self, size: int) -> None:
        """Return once exactly ``size`` sessions are open (tests and shutdown wait on this)."""
        while len(self._sessions) != size:
            watcher = asyncio.get_running_loop().create_future()
            self._watchers.append(watcher)
            await watcher

    def __len__(self) -> int:
        return len(self._sessions)

    def check_capacity(self, principal: str) -> None:
        if self._per_principal[principal] >= self.max_per_principal:
            raise errors.TooManyRequests(
                f"{principal} already has {self.max_per_principal} MCP sessions open; end one first",
                code="too_many_sessions",
            )

    def add(self, session: Session) -> None:
        self.check_capacity(session.principal)
        self._sessions[session.id] = session
        self._per_principal[session.principal] += 1
        self._changed()

    def get(self, session_id: str, principal: str, server: tuple[str, str]) -> Session:
        """The caller's own session; anyone else's, or an ended one, does not exist (404)."""
        session = self._sessions.get(session_id)
        if session is None or session.principal != principal or session.server != server or session.ended:
            raise errors.NotFound("MCP session not found; it may have expired: initialize a new one")
        session.touch()
        return session

    def remove(self, session: Session) -> bool:
        if self._sessions.pop(session.id, None) is None:
            return False
        self._per_principal[session.principal] -= 1
        if self._per_principal[session.principal] <= 0:
            del self._per_principal[session.principal]
        self._changed()
        return True

    def idle(self, now: float) -> list[Session]:
        limit = now - self.idle_timeout_s
        return [s for s in self._sessions.values() if s.busy == 0 and s.last_active < limit]

    def all(self) -> list[Session]:
        return list(self._sessions.values())
