"""Identity: attribute each request to a principal, or refuse it with 401 (SPEC.md §1).

Sources, in order: sidecar mode (a loopback caller is the configured sandbox); a bearer token
(``Authorization: Bearer`` or, for Azure SDKs, ``api-key``) that is a JWT, verified against the
router's own key or the cluster's JWKS; ``X-A2A-Agent-Subject`` from a trusted proxy. The
subject header is removed from every request, so no later layer and no upstream sees a forged
one. A JWT that fails verification is a 401, never a fall-through to a weaker source. Bearer
values that are not JWTs (the API key an OpenAI client sends) are not credentials of ours.

A signed A2A request (SPEC.md §5) is a JWT whose ``iss`` names an A2AAgent of the policy in force:
this layer does not verify it, it leaves the principal unset and hands the token on under
``SIGNED_REQUEST``; the JWS layer next in line must then verify it or answer 401.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import jwt
import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from router import _asgi, errors
from router.identity import verifier as verifier_mod
from router.identity.principal import Principal
from router.observability import metrics as metrics_mod
from router.policy import store as store_mod

SUBJECT_HEADER = b"x-a2a-agent-subject"
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_SUBJECT_CHARS = 512
SIGNED_REQUEST = "kars.signed_request"  # the bearer of a signed A2A request, for the JWS layer to verify


class IdentityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        verifier: verifier_mod.TokenVerifier,
        sidecar_sandbox: str | None,
        trusted_proxies: Iterable[str],
        metrics: metrics_mod.Metrics,
        policy: store_mod.PolicyStore | None = None,
    ) -> None:
        self.app = app
        self._policy = policy
        self._verifier = verifier
        self._sidecar = Principal("sandbox", sidecar_sandbox, "sidecar") if sidecar_sandbox else None
        self._proxies = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in EXEMPT_PATHS:
            return await self.app(scope, receive, send)
        subject = self._take_subject(scope)
        st = scope["state"]
        if _asgi.PRINCIPAL not in st:  # the admin gate may have decided already
            try:
                principal = await self._identify(scope, subject)
            except errors.KarsError as exc:
                self._metrics.identity_rejections.labels(exc.code).inc()
                raise
            if principal is not None:
                st[_asgi.PRINCIPAL] = principal
        await self.app(scope, receive, send)

    def _take_subject(self, scope: Scope) -> bytes | None:
        """The subject header's value if a trusted proxy sent it; always removed from the scope."""
        value = _asgi.header(scope, SUBJECT_HEADER)
        if value is None:
            return None
        _asgi.without_headers(scope, frozenset({SUBJECT_HEADER}))
        host = _asgi.client_host(scope)
        ip = _asgi.parse_ip(host) if host else None
        if ip is None or not any(ip in net for net in self._proxies):
            return None
        return value

    async def _identify(self, scope: Scope, subject: bytes | None) -> Principal | None:
        if self._sidecar is not None and _asgi.is_loopback(scope):
            return self._sidecar
        token = _bearer(scope)
        if token is not None:
            if self._policy is not None and _names_an_agent(token, self._policy):
                scope["state"][SIGNED_REQUEST] = token
                return None
            return await self._verifier.verify(token)
        if subject is not None:
            text = subject.decode("latin-1").strip()
            if not text or len(text) > MAX_SUBJECT_CHARS or not text.isprintable():
                raise errors.Unauthenticated("malformed X-A2A-Agent-Subject")
            return Principal("agent", text, "trusted-proxy")
        if _asgi.header(scope, b"authorization") is not None or _asgi.header(scope, b"api-key") is not None:
            raise errors.Unauthenticated("credentials are not a token this router accepts")
        raise errors.Unauthenticated("no credentials", code="missing_credentials")


def _bearer(scope: Scope) -> str | None:
    """A JWT from ``Authorization: Bearer`` or ``api-key``; opaque API keys are ignored."""
    auth = _asgi.header(scope, b"authorization")
    if auth is not None:
        scheme, _, value = auth.decode("latin-1").partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and verifier_mod.looks_like_jwt(value):
            return value
    key = _asgi.header(scope, b"api-key")
    if key is not None:
        value = key.decode("latin-1").strip()
        if verifier_mod.looks_like_jwt(value):
            return value
    return None


def _names_an_agent(token: str, policy: store_mod.PolicyStore) -> bool:
    """Whether the (unverified) ``iss`` of ``token`` is an A2AAgent ``ns/name`` in the policy in force.

    Only a peek at one claim to choose the verifier (``jwt.decode`` without verification costs
    ~30x more); the JWS layer verifies everything, signature first.
    """
    snap = policy.snapshot
    if not snap.has_a2a_agents:
        return False
    try:
        claims = orjson.loads(jwt.utils.base64url_decode(token.split(".")[1]))
    except (ValueError, IndexError, UnicodeDecodeError):
        return False
    iss = claims.get("iss") if isinstance(claims, dict) else None
    if not isinstance(iss, str) or iss.count("/") != 1:
        return False
    namespace, _, name = iss.partition("/")
    return snap.a2a_agent(namespace, name) is not None
