"""JWS layer (SPEC.md §5): signed A2A requests in, signed Agent Cards out. Opt-in per A2AAgent.

In: the identity layer hands over a bearer whose ``iss`` names an A2AAgent (``SIGNED_REQUEST``);
it is verified here (``router.identity.jws``) against the raw body, with the URL of the route
called as its audience (on ``a2a.publicUrls`` when set: ``audiences_of``), or the request is
refused with 401 and the reason logged. Never a fallback. An agent whose A2AAgent sets
``trust.requireSignedRequests`` is not accepted any other way (a trusted proxy's
``X-A2A-Agent-Subject`` naming it is a 401).

Out: for an A2AAgent with ``signingKeys``, its card (``/a2a/{agent}/.well-known/agent-card.json``
or ``agent.json``) is held back (at most ``a2a.maxCardBytes``), verified, and only then sent on
unchanged, byte for byte; a card that does not verify is never served (502 ``upstream_error``).
So is its extended card: the reply to ``GetExtendedAgentCard`` (v1.0) or
``agent/getAuthenticatedExtendedCard`` (v0.3) is held back the same way and its ``result`` verified;
a JSON-RPC error passes through. Every other method's reply streams untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router import _asgi, _body, errors
from router.identity import cards
from router.identity import jws as jws_mod
from router.middleware import identity
from router.observability import metrics as metrics_mod
from router.policy import model
from router.policy import store as store_mod
from router.stores import base as stores_base

log = logging.getLogger("kars.jws")

SharedClaim = Callable[[str, float], Awaitable[bool]]  # claim a key until a time: True the first time

CARD_SUFFIXES = ("/.well-known/agent-card.json", "/.well-known/agent.json")
A2A_PREFIX = "/a2a/"
# JSON-RPC methods whose ``result`` is an Agent Card (A2A v1.0 and v0.3 names).
EXTENDED_CARD_METHODS = frozenset({"GetExtendedAgentCard", "agent/getAuthenticatedExtendedCard"})


def audiences_of(scope: Scope, public_urls: Sequence[str] = ()) -> list[str]:
    """The URL of the route called on this router (``aud`` of §5).

    With ``public_urls`` (``a2a.publicUrls``): one of those bases + the route path, whatever the
    ``Host`` header says (behind a gateway the scheme seen here is not the caller's, and a ``Host``
    is the caller's to choose). Without: the request's own scheme and ``Host``, as the caller
    addressed this router directly (development, loopback). A WebSocket route may be named by its
    ``ws(s)://`` or its ``http(s)://`` URL: both are accepted.
    """
    if public_urls:
        path = scope["path"]
        bases = list(public_urls)
        if scope["type"] == "websocket":
            bases += ["ws" + b[len("http") :] for b in public_urls]  # http://h -> ws://h, https://h -> wss://h
        return [base + path for base in bases]
    host = _asgi.header(scope, b"host")
    if host is not None:
        authority = host.decode("latin-1")
    else:
        server = scope.get("server") or ("localhost", None)
        authority = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
    scheme: str = scope.get("scheme", "http")
    rest = f"://{authority}{scope.get('root_path', '')}{scope['path']}"
    http_scheme = {"ws": "http", "wss": "https"}.get(scheme)
    return [scheme + rest] if http_scheme is None else [scheme + rest, http_scheme + rest]


def rpc_agent(path: str) -> str | None:
    """``{agent}`` when ``path`` is the JSON-RPC route ``/a2a/{agent}``."""
    agent = path[len(A2A_PREFIX) :] if path.startswith(A2A_PREFIX) else ""
    return agent if agent and "/" not in agent else None


def card_agent(path: str) -> str | None:
    """``{agent}`` when ``path`` is one of the agent card routes."""
    if not path.startswith(A2A_PREFIX):
        return None
    for suffix in CARD_SUFFIXES:
        if path.endswith(suffix):
            agent = path[len(A2A_PREFIX) : -len(suffix)]
            return agent if agent and "/" not in agent else None
    return None


class JwsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: store_mod.PolicyStore,
        metrics: metrics_mod.Metrics,
        jku_allowed_hosts: list[str],
        max_card_bytes: int,
        public_urls: Sequence[str] = (),
        shared_replay: SharedClaim | None = None,
    ) -> None:
        self.app = app
        self._policy = policy
        self._metrics = metrics
        self._jku_hosts = frozenset(h.lower() for h in jku_allowed_hosts)
        self._max_card_bytes = max_card_bytes
        self._public_urls = tuple(public_urls)
        self._replay = jws_mod.ReplayCache()  # this replica's: a replay to it costs no round trip
        self._shared_replay = shared_replay  # every replica's (Redis), when the router has one

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        st = scope["state"]
        token = st.pop(identity.SIGNED_REQUEST, None)
        if token is not None:
            receive = await self._verify_request(scope, receive, token)
        else:
            self._refuse_unsigned_agent(scope)
        if scope["type"] == "http" and scope["path"].startswith(A2A_PREFIX):  # the rest pay one test
            method = scope.get("method")
            if method in ("GET", "HEAD"):  # a HEAD is answered as a GET
                agent = self._signing_agent(scope, card_agent(scope["path"]))
                if agent is not None:
                    return await self._serve_verified_card(scope, receive, send, agent)
            elif method == "POST":
                agent = self._signing_agent(scope, rpc_agent(scope["path"]))
                if agent is not None:
                    try:
                        request = await _body.read_json(scope, receive)
                    except errors.InvalidRequest:
                        request = None  # the layers below refuse it in their own order (trust first)
                    receive = _body.replay(scope, receive)
                    if isinstance(request, dict) and request.get("method") in EXTENDED_CARD_METHODS:
                        return await self._serve_verified_extended_card(scope, receive, send, agent)
        await self.app(scope, receive, send)

    # -- signed requests --------------------------------------------------------------------

    async def _verify_request(self, scope: Scope, receive: Receive, token: str) -> Receive:
        body = await _body.read(scope, receive) if scope["type"] == "http" else b""
        try:
            principal, (iss, jti), forget_at = jws_mod.verify_request(
                token,
                body=body,
                audience=audiences_of(scope, self._public_urls),
                snapshot=self._policy.snapshot,
                replay=self._replay,
                jku_hosts=self._jku_hosts,
            )
            if self._shared_replay is not None and not await self._claim(iss, jti, forget_at):
                raise jws_mod.JwsError("replayed", "this jti was used before (on another replica)")
        except jws_mod.JwsError as exc:
            self._metrics.signed_request_rejections.labels(exc.reason).inc()
            log.warning("signed request refused on %s: %s (%s)", scope["path"], exc.reason, exc.message)
            if exc.reason == "replay_cache_full":
                raise errors.TooManyRequests(exc.message, headers={"Retry-After": "5"}) from None
            raise errors.Unauthenticated(f"signed request rejected: {exc.message}") from None
        scope["state"][_asgi.PRINCIPAL] = principal
        return _body.replay(scope, receive) if scope["type"] == "http" else receive

    async def _claim(self, iss: str, jti: str, forget_at: float) -> bool:
        assert self._shared_replay is not None
        try:
            return await self._shared_replay(f"jti:{iss}:{jti}", forget_at)
        except stores_base.StoreUnavailable as exc:
            log.error("signed request refused: the shared replay store is unavailable: %s", exc)
            raise errors.ServiceUnavailable(
                "signed requests cannot be checked for replay right now", code="identity_unavailable"
            ) from None

    def _refuse_unsigned_agent(self, scope: Scope) -> None:
        principal = scope["state"].get(_asgi.PRINCIPAL)
        if principal is None or principal.kind != "agent" or principal.mode == "signed-request":
            return
        agent = self._policy.snapshot.a2a_agent(principal.namespace, principal.name)
        if agent is not None and agent.spec.trust.require_signed_requests:
            self._metrics.signed_request_rejections.labels("unsigned").inc()
            log.warning("unsigned request from %s refused: its A2AAgent requires signed requests", principal.id)
            raise errors.Unauthenticated(f"{principal.id} must send signed requests")

    # -- signed agent cards -----------------------------------------------------------------

    def _signing_agent(self, scope: Scope, name: str | None) -> model.A2AAgent | None:
        """The A2AAgent ``name`` of the caller's namespace, when it has ``signingKeys``."""
        principal = scope["state"].get(_asgi.PRINCIPAL)
        if name is None or principal is None:
            return None
        agent = self._policy.snapshot.a2a_agent(principal.namespace, name)
        return agent if agent is not None and agent.spec.signing_keys else None

    async def _held_reply(self, scope: Scope, receive: Receive) -> tuple[list[Message], int | None, bytes]:
        """The layers below answer into a buffer (at most ``a2a.maxCardBytes``): messages, status, body."""
        held: list[Message] = []
        size = 0

        async def holding_send(message: Message) -> None:
            nonlocal size
            if message["type"] == "http.response.body":
                size += len(message.get("body", b""))
                if size > self._max_card_bytes:
                    raise errors.UpstreamError(f"agent card larger than {self._max_card_bytes} bytes")
            held.append(message)

        await self.app(scope, receive, holding_send)
        start = next((m for m in held if m["type"] == "http.response.start"), None)
        raw = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
        return held, (start["status"] if start is not None else None), raw

    def _verify(self, agent: model.A2AAgent, card: bytes | object, what: str) -> None:
        """Verify a card of ``agent`` (raw, or parsed out of a reply) or raise 502 ``upstream_error``."""
        keys, now = jws_mod.trusted_keys(agent), dt.datetime.now(dt.UTC)
        try:
            if isinstance(card, bytes):
                kid = cards.verify_card(card, keys, now=now, jku_hosts=self._jku_hosts)
            else:
                kid = cards.verify_card_object(card, keys, now=now, jku_hosts=self._jku_hosts)
        except jws_mod.JwsError as exc:
            self._metrics.a2a_card_verifications.labels("failed").inc()
            log.warning("%s of %s/%s refused: %s (%s)", what, agent.namespace, agent.name, exc.reason, exc.message)
            raise errors.UpstreamError(f"the {what} does not verify: {exc.reason}") from None
        self._metrics.a2a_card_verifications.labels("ok").inc()
        log.debug("%s of %s/%s verified with kid %s", what, agent.namespace, agent.name, kid)

    async def _serve_verified_card(self, scope: Scope, receive: Receive, send: Send, agent: model.A2AAgent) -> None:
        held, status, raw = await self._held_reply(scope, receive)
        if status == 200:
            self._verify(agent, raw, "agent card")
        for message in held:
            await send(message)

    async def _serve_verified_extended_card(
        self, scope: Scope, receive: Receive, send: Send, agent: model.A2AAgent
    ) -> None:
        """A JSON-RPC reply carrying a card (``result``) is sent on only if the card verifies."""
        held, status, raw = await self._held_reply(scope, receive)
        try:
            reply = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            reply = None
        if isinstance(reply, dict) and "result" in reply:
            self._verify(agent, reply["result"], "extended agent card")
        elif status == 200 and not (isinstance(reply, dict) and "error" in reply):
            # Neither a card nor a JSON-RPC error (an SSE stream, say): nothing here can be vouched for.
            self._metrics.a2a_card_verifications.labels("failed").inc()
            log.warning("extended agent card of %s/%s refused: no JSON-RPC reply", agent.namespace, agent.name)
            raise errors.UpstreamError("the extended agent card does not verify: malformed")
        for message in held:
            await send(message)
