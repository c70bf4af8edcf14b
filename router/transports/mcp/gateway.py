"""The MCP gateway: resolves ``{server}`` for the caller, applies tool policy, pumps messages.

Both client transports (``streamable``, ``sse``) call into one ``Gateway``: it opens a
session (server lookup in the caller's own namespace, ``allowedSandboxes``, the per-principal
cap, then the upstream session), dispatches the client's messages (policy first: a denied or
rate-limited ``tools/call`` is answered here and never reaches the upstream), and moves the
upstream's messages onto the right client stream, filtering ``tools/list`` and writing the
audit record of each ``tools/call`` on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from router import errors
from router.identity.principal import Principal
from router.observability import logs
from router.observability import metrics as metrics_mod
from router.policy import model
from router.policy import store as store_mod
from router.settings import McpSettings
from router.transports.mcp import _wire, admission, audit, policy, sessions, upstream
from router.upstream import http

log = logging.getLogger("kars.mcp")

KEEP_FINISHED_STREAMS = 32  # closed request streams kept per session for Last-Event-ID replay
SHUTDOWN_S = 5.0  # how long app shutdown waits for upstream sessions to be ended


class Gateway:
    def __init__(
        self,
        settings: McpSettings,
        store: store_mod.PolicyStore,
        metrics: metrics_mod.Metrics,
        audit_log: logs.JsonLines,
    ) -> None:
        self.settings = settings
        self._store = store
        self._metrics = metrics
        self.pool = upstream.Pool(
            http.Timeouts(connect_s=settings.upstream_connect_timeout_s, read_s=settings.upstream_read_timeout_s)
        )
        self.table = sessions.Table(
            max_per_principal=settings.max_sessions_per_principal, idle_timeout_s=settings.session_idle_timeout_s
        )
        self.limiters = policy.Limiters()
        self._auditor = audit.Auditor(metrics, audit_log, with_arguments=settings.audit_arguments)
        self._origins = (*admission.LOOPBACK_ORIGINS, *settings.allowed_origins)
        self._reaper: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="kars-mcp-reaper")

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        ends = [self.end(session, "router shutting down") for session in self.table.all()]
        with contextlib.suppress(TimeoutError):  # upstreams that do not answer their DELETE are not waited for
            await asyncio.wait_for(asyncio.gather(*ends, return_exceptions=True), SHUTDOWN_S)
        await self.pool.aclose()

    async def _reap(self) -> None:
        period = min(max(self.settings.session_idle_timeout_s / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(period)
            for session in self.table.idle(time.monotonic()):
                await self.end(session, "idle")

    # -- admission ----------------------------------------------------------------------------

    def check_origin(self, scope: Any) -> None:
        admission.check_origin(scope, self._origins)

    def admit(self, scope: Any, name: str) -> tuple[Principal, model.McpServer, policy.Gate]:
        """The caller, the McpServer ``name`` and its tool gate, or the refusal (401/403/404)."""
        who = admission.principal(scope)
        server, gate = admission.admit(self._store.snapshot, who, name)
        return who, server, gate

    async def open(self, scope: Any, name: str, kind: sessions.ClientKind) -> sessions.Session:
        """A new session for the caller, its upstream session already connected (legacy SSE)."""
        snapshot = self._store.snapshot
        who, server, gate = self.admit(scope, name)
        self.table.check_capacity(who.id)
        bearer = await admission.upstream_bearer(server, self.settings.secrets_dir)
        link: upstream.Upstream
        if server.spec.transport == "sse":
            link = upstream.SseUpstream(self.pool, server.spec.url, bearer)
            await link.start()
        else:
            link = upstream.StreamableUpstream(self.pool, server.spec.url, bearer)
        session = sessions.Session(
            principal=who.id,
            server=(who.namespace, name),
            kind=kind,
            gate=gate,
            generation=snapshot.generation,
            link=link,
            replay_limit=self.settings.replay_events,
        )
        try:
            self.table.add(session)
        except errors.KarsError:
            await link.close()
            raise
        self._metrics.mcp_sessions.labels(kind).inc()
        return session

    def find(self, scope: Any, name: str, session_id: str) -> sessions.Session:
        who = admission.principal(scope)
        return self.table.get(session_id, who.id, (who.namespace, name))

    async def end(self, session: sessions.Session, reason: str) -> None:
        """End the client session and its upstream session; every stream of it closes."""
        if not self.table.remove(session):
            return
        session.ended = True
        self._metrics.mcp_sessions.labels(session.kind).dec()
        for request_id, stream in list(session.pending.items()):
            lost = _wire.error(request_id, _wire.UPSTREAM_LOST, f"MCP session ended ({reason}) before the response")
            self._deliver(session, lost, stream)
        log.info("mcp session ended", extra={"fields": {"session_end": reason, "principal": session.principal}})
        for stream in session.streams.values():
            stream.close()
        current = asyncio.current_task()
        for task in [*session.tasks, *session.inline]:
            if task is not current:
                task.cancel()
        await session.upstream.close()

    # -- dispatch -----------------------------------------------------------------------------

    async def dispatch(
        self, session: sessions.Session, message: dict[str, Any], raw: bytes, target: Any, *, inline: bool = False
    ) -> Pump | None:
        """Handle one client message; replies to requests go to stream ``target``.

        A request that goes upstream is pumped by a task of the session; with ``inline`` the
        caller gets the pump instead and runs it itself (one Streamable HTTP POST, one request:
        no task and no hand-off on the hot path).
        """
        session.touch()
        if not _wire.is_request(message):
            try:
                await session.upstream.send(raw)
            except upstream.Gone as exc:
                await self.end(session, f"upstream gone: {exc}")
                raise errors.NotFound("MCP session ended: the upstream session is gone") from exc
            if message.get("method") == "notifications/initialized" and not session.listening:
                session.listening = True
                session.spawn(self._listen(session), "kars-mcp-listen")
            return None
        method = message.get("method")
        request_id = message.get("id")
        if request_id in session.pending:  # MCP: an id is not reused within a session
            busy = f"request id {request_id!r} is still in use in this session"
            target.push(_wire.dumps(_wire.error(request_id, _wire.INVALID_REQUEST, busy)))
            return None
        if self._store.snapshot.generation != session.generation:
            self._refresh_gate(session)  # policy reloaded: this request is judged by the new one
        if method == "tools/call" and not await self._admit_call(session, message, target):
            return None
        if method == "tools/list":
            session.lists.add(request_id)
        elif method == "initialize":
            session.initialize_ids.add(request_id)
        target.open_requests += 1
        session.pending[request_id] = target
        session.busy += 1
        pump = Pump(self, session, message, raw, target)
        if inline:
            return pump
        session.spawn(pump.run(), "kars-mcp-pump")
        return None

    @staticmethod
    async def _cancel_upstream(session: sessions.Session, request_id: Any, reason: str) -> None:
        """Tell the upstream to stop a request nobody waits for any more (MCP ``notifications/cancelled``)."""
        cancelled = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": request_id, "reason": reason},
        }
        with contextlib.suppress(errors.KarsError, upstream.Gone):
            await session.upstream.send(_wire.dumps(cancelled).encode())

    async def _admit_call(self, session: sessions.Session, message: dict[str, Any], target: Any) -> bool:
        params = message.get("params")
        tool = str(params.get("name")) if isinstance(params, dict) else ""
        decision = session.gate.decide(tool)
        request_id = message.get("id")
        started = time.perf_counter()
        if not decision.allowed:
            target.push(
                _wire.dumps(_wire.error(request_id, _wire.TOOL_DENIED, f"tool {tool!r} denied by {decision.policy}"))
            )
            self._audit(session, tool, "deny", decision.policy, started, "denied", params)
            return False
        if decision.rate_limit is not None:
            retry_s = await self.limiters.try_acquire(decision.policy, session.principal, decision.rate_limit)
            if retry_s is not None:
                retry_ms = max(1, round(retry_s * 1000))
                target.push(
                    _wire.dumps(
                        _wire.error(
                            request_id,
                            _wire.TOOL_RATE_LIMITED,
                            f"tool {tool!r} rate limited by {decision.policy}; retry after {retry_ms} ms",
                            {"retryAfterMs": retry_ms},
                        )
                    )
                )
                self._audit(session, tool, "rate_limited", decision.policy, started, "rate_limited", params)
                return False
        session.calls[request_id] = sessions.Call(tool, started, decision, params)
        return True

    def _refresh_gate(self, session: sessions.Session) -> None:
        """Policy changed since the session opened: decide with the new snapshot."""
        snapshot = self._store.snapshot
        session.gate = admission.regate(snapshot, session.principal, session.server)
        session.generation = snapshot.generation

    async def _pump(
        self,
        session: sessions.Session,
        message: dict[str, Any],
        raw: bytes,
        target: Any,
        after_each: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        request_id = message.get("id")
        try:
            async for item, text in session.upstream.request(message, raw):
                self._deliver(session, item, target, text)
                if after_each is not None:
                    await after_each()
            if request_id in session.pending:
                # The stream ended without the response (the connection dropped): the request
                # is lost upstream, so the session cannot be trusted to be in step any more.
                raise upstream.Gone("upstream stream ended before the response")
        except upstream.Gone as exc:
            await self.end(session, f"upstream gone: {exc}")  # answers every pending request
        except errors.UpstreamTimeout as exc:
            if request_id in session.pending:
                self._deliver(session, _wire.error(request_id, _wire.UPSTREAM_TIMEOUT, exc.message), target)
            await self._cancel_upstream(session, request_id, exc.message)
        except errors.KarsError as exc:
            if request_id in session.pending:
                self._deliver(session, _wire.error(request_id, _wire.INTERNAL_ERROR, exc.message), target)
        finally:
            session.pending.pop(request_id, None)
            target.open_requests -= 1
            session.busy -= 1
            session.touch()
            if target.number and target.open_requests <= 0:
                target.close()
                session.drop_finished_streams(KEEP_FINISHED_STREAMS)
        if session.initialize_failed and not session.ended:
            # Its error is on its way to the client; a session never initialized holds no place.
            await self.end(session, "initialize failed upstream")

    def _deliver(self, session: sessions.Session, item: dict[str, Any], target: Any, text: str | None = None) -> None:
        """Send one upstream message to the client on ``target`` (``text``: its JSON, if unchanged)."""
        if _wire.is_response(item):
            rid = item.get("id")
            session.pending.pop(rid, None)
            if rid in session.lists:
                session.lists.discard(rid)
                if "result" in item:
                    session.note_tools(item["result"])
                    item["result"] = session.gate.filter_tools(item["result"])
                    text = None
            elif rid in session.initialize_ids:
                session.initialize_ids.discard(rid)
                result = item.get("result")
                if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
                    session.upstream.protocol_version = result["protocolVersion"]
                else:
                    session.initialize_failed = True
            call = session.calls.pop(rid, None)
            if call is not None:
                outcome = "error" if "error" in item else "tool_error" if _is_tool_error(item) else "ok"
                error = item.get("error")
                if isinstance(error, dict) and error.get("code") == _wire.UPSTREAM_LOST:
                    outcome = "upstream_lost"
                self._audit(session, call.tool, "allow", call.decision.policy, call.started, outcome, call.params)
        target.push(text if text is not None else _wire.dumps(item))

    async def _listen(self, session: sessions.Session) -> None:
        try:
            async for _item, text in session.upstream.listen():
                session.main.push(text)
        except upstream.Gone as exc:
            await self.end(session, f"upstream gone: {exc}")

    def _audit(
        self,
        session: sessions.Session,
        tool: str,
        decision: str,
        policy_name: str,
        started: float,
        outcome: str,
        params: Any,
    ) -> None:
        # The metric's tool label is a name the client chose: only a known one is kept (listed by
        # the upstream in this session, or named by policy), so made-up names add no series.
        known = tool in session.listed_tools or session.gate.names(tool)
        self._auditor.tool_call(
            principal=session.principal,
            server=f"{session.server[0]}/{session.server[1]}",
            tool=tool,
            tool_label=tool if known else audit.OTHER_TOOL,
            decision=decision,
            policy=policy_name,
            started=started,
            outcome=outcome,
            params=params,
        )


class Pump:
    """Moves the upstream's messages about one request onto its client stream until the response."""

    __slots__ = ("gw", "message", "raw", "session", "target")

    def __init__(
        self, gw: Gateway, session: sessions.Session, message: dict[str, Any], raw: bytes, target: Any
    ) -> None:
        self.gw, self.session, self.message, self.raw, self.target = gw, session, message, raw, target

    async def run(self, after_each: Callable[[], Awaitable[None]] | None = None) -> None:
        await self.gw._pump(self.session, self.message, self.raw, self.target, after_each)

    def answered(self) -> bool:
        """Whether the response to this request has been delivered."""
        return self.message.get("id") not in self.session.pending


def _is_tool_error(item: dict[str, Any]) -> bool:
    result = item.get("result")
    return isinstance(result, dict) and result.get("isError") is True


async def wait_disconnect(receive: Any) -> None:
    """Returns when the client goes away (ASGI ``http.disconnect``)."""
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
