"""The Foundry / Azure OpenAI inference transport: forward SPEC.md §2 routes with the router's credential.

Routes: ``/openai/deployments/{d}/...``, ``/openai/v1/...`` (and ``/v1/...``, its alias),
``/openai/{endpoint}`` (the AzureOpenAI SDK's Responses, files...), ``/models/...``. The request
body is read through ``router._body`` (layers above may have read it already) and passed on
byte for byte, except that a chat stream gets ``stream_options.include_usage`` (SPEC.md §2) and a
fallback deployment gets its name in ``model``. The caller's credentials and hop-by-hop headers
(RFC 9110 §7.6.1) never go upstream; the broker's credential does. The reply is relayed by
``router.transports._reply``, which also records the usage for the budget layer.

modelPreference (InferencePolicy, most specific first): the caller's named deployment is served
when it can be. If it is one of the policy's deployments, the others (primary first, then the
fallbacks in order) are tried after it when it answers 429 or 5xx or cannot be reached; a
deployment outside the list is forwarded as named, with no fallback (the router never swaps in a
model the operator did not list for that caller). A request naming no deployment (``/models``
without ``model``) goes to the primary. Retries happen before any byte reached the caller only.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any
from urllib.parse import quote

import orjson
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import ASGIApp, Receive, Scope, Send

from router import _asgi, _body, errors, inference
from router.observability import metrics as metrics_mod
from router.policy import model
from router.policy import store as store_mod
from router.transports import _reply
from router.upstream import credentials
from router.upstream import http as http_mod

UPSTREAM = "foundry"
STREAM_OPTIONS_SINCE = "2024-09-01"  # older Azure API versions refuse stream_options (400)
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_DRAIN_BYTES = 64 * 1024  # a failed attempt's error body is read so its connection can be reused

# Never forwarded: hop-by-hop (RFC 9110 §7.6.1), the caller's credentials (SPEC.md §1), and what
# the client library sets itself. ``accept-encoding`` is replaced by identity: usage is read
# from the reply, and a compressed reply would hide it.
_DROP_REQUEST = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
        b"accept-encoding",
        b"authorization",
        b"api-key",
        b"x-api-key",
        b"cookie",
    }
)


def _forward_headers(scope: Scope) -> list[tuple[str, str]]:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    named = _asgi.header(scope, b"connection")
    drop = _DROP_REQUEST
    if named:  # headers the caller listed in Connection are hop-by-hop too
        drop = drop | {t.strip().lower() for t in named.split(b",")}
    out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k not in drop]
    out.append(("accept-encoding", "identity"))
    return out


def deployment_chain(named: str | None, preference: model.ModelPreference | None) -> list[str | None]:
    """The deployments to try, in order (see the module docstring)."""
    if preference is None:
        return [named]
    ordered: list[str | None] = [preference.primary.deployment, *(f.deployment for f in preference.fallback)]
    if named is None:
        return ordered
    if named not in ordered:
        return [named]
    return [named, *(d for d in ordered if d != named)]


class FoundryTransport:
    """The ASGI app behind every inference route; one instance per router app."""

    def __init__(
        self,
        *,
        client: http_mod.Client | None,
        broker: credentials.Broker | None,
        policy: store_mod.PolicyStore,
        metrics: metrics_mod.Metrics,
    ) -> None:
        self._client = client
        self._broker = broker
        self._policy = policy
        self._metrics = metrics
        self._latency = metrics.upstream_latency.labels(UPSTREAM)

    def routes(self, reserved: frozenset[str] = frozenset()) -> tuple[list[BaseRoute], list[BaseRoute]]:
        """Routes owned outright (``/openai/...``, ``/models/...``) and the ``/v1/...`` catch-all,
        which must come after the router's own ``/v1`` routes and leaves their paths (``reserved``)
        to them, so a wrong method there is their 405, not a request forwarded upstream."""
        owned: list[BaseRoute] = [PrefixRoute(p, _Entry(self)) for p in ("/openai/{path:path}", "/models/{path:path}")]
        return owned, [PrefixRoute("/v1/{path:path}", _Entry(self), reserved=reserved)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = inference.classify(scope["path"])
        if route is None:
            raise errors.NotFound(f"no inference route {scope['path']}")
        client, broker = self._client, self._broker
        if client is None or broker is None:
            raise errors.ServiceUnavailable("no Foundry endpoint is configured", code="upstream_not_configured")
        body = await _body.read(scope, receive)
        json_body = body and _body.is_json(scope)
        doc = await _body.read_json(scope, receive) if json_body else None
        # Watch for the caller going away while we wait on the upstream, and stop if it does.
        current = asyncio.current_task()
        assert current is not None
        link = _reply.Link()
        # The task's own loop, not asyncio.create_task: in Python 3.11 each running-loop lookup
        # is a getpid() system call (a fork check).
        watcher = current.get_loop().create_task(link.watch(_body.source(receive), current))
        try:
            await self._forward(scope, send, link, route, client, broker, body, doc)
        except asyncio.CancelledError:
            watcher.cancel()
            if link.gone and current.uncancel() == 0:
                return  # the caller left: nothing to answer; the upstream reply was closed
            raise
        except BaseException:
            watcher.cancel()
            raise
        # Answered: the watcher is not cancelled (an exception and its traceback, each request)
        # but ends by itself, as its pending receive() now returns http.disconnect (ASGI: once
        # the response is complete, receive says so; uvicorn wakes the pending call).

    async def _forward(
        self,
        scope: Scope,
        send: Send,
        link: _reply.Link,
        route: inference.InferenceRoute,
        client: http_mod.Client,
        broker: credentials.Broker,
        body: bytes,
        doc: Any,
    ) -> None:
        stream = isinstance(doc, dict) and doc.get("stream") is True
        strip = False
        query = scope.get("query_string", b"")
        if stream and route.endpoint == "chat/completions" and not inference.predates(query, STREAM_OPTIONS_SINCE):
            options = doc.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                extra = options if isinstance(options, dict) else {}
                doc = {**doc, "stream_options": {**extra, "include_usage": True}}
                body = orjson.dumps(doc)
                strip = True
        named = route.deployment
        if named is None and isinstance(doc, dict) and isinstance(doc.get("model"), str):
            named = doc["model"]
        chain = deployment_chain(named, self._preference(scope, route))
        headers = _forward_headers(scope)
        headers.extend(await broker.headers())
        suffix = "?" + query.decode("latin-1") if query else ""

        for attempt, deployment in enumerate(chain):
            last = attempt == len(chain) - 1
            path, payload = _target(route, deployment, named, doc, body)
            started = time.perf_counter()
            try:
                reply = await link.wait(
                    client.request(scope["method"], path + suffix, headers=headers, body=payload or None)
                )
            except errors.UpstreamError as exc:
                self._metrics.upstream_errors.labels(UPSTREAM, exc.code).inc()
                if last or exc.code != "upstream_unavailable":
                    raise
                continue
            except errors.UpstreamTimeout as exc:
                self._metrics.upstream_errors.labels(UPSTREAM, exc.code).inc()
                raise
            self._latency.observe(time.perf_counter() - started)
            if reply.status in RETRY_STATUSES:
                self._metrics.upstream_errors.labels(UPSTREAM, f"status_{reply.status}").inc()
                if not last:
                    try:
                        await link.wait(reply.read(MAX_DRAIN_BYTES))
                    except errors.KarsError:
                        pass
                    finally:
                        reply.close()
                    continue
            try:
                await _reply.relay(scope, send, reply, link, strip_usage_chunk=strip, on_error=self._count_error)
            finally:
                reply.close()
                # Also when the relay raised: a reply blocked by the safety layer was generated.
                self._account(scope, deployment, scope["state"].get(_asgi.USAGE))
            return

    def _count_error(self, code: str) -> None:
        self._metrics.upstream_errors.labels(UPSTREAM, code).inc()

    def _preference(self, scope: Scope, route: inference.InferenceRoute) -> model.ModelPreference | None:
        st = scope["state"]
        principal = st.get(_asgi.PRINCIPAL)
        if principal is None or principal.kind != "sandbox":
            return None
        namespace, _, name = principal.id.partition("/")
        snapshot = st.get(_asgi.SNAPSHOT) or self._policy.snapshot
        for policy in snapshot.inference_policies(namespace, name, route.action):
            if policy.spec.model_preference is not None:
                return policy.spec.model_preference  # type: ignore[no-any-return]
        return None

    def _account(self, scope: Scope, deployment: str | None, found: Any) -> None:
        st = scope["state"]
        fields = st.get(_asgi.LOG_FIELDS)
        if fields is not None and deployment is not None:
            fields["deployment"] = deployment
        if found is None:
            return
        label = deployment or ""
        self._metrics.tokens.labels("prompt", label).inc(found.prompt_tokens)
        self._metrics.tokens.labels("completion", label).inc(found.completion_tokens)
        if fields is not None:
            fields["promptTokens"] = found.prompt_tokens
            fields["completionTokens"] = found.completion_tokens


class PrefixRoute(BaseRoute):
    """Every HTTP path under one prefix (``/openai/{path:path}``), any method, to one ASGI app.

    Starlette's ``Route`` would match the busiest routes of the router with a regex and build
    path parameters that nothing reads (the transport classifies ``scope["path"]`` itself); a
    prefix test is enough. ``path`` keeps the template, which metrics and logs name the route by.
    """

    def __init__(self, path: str, endpoint: ASGIApp, *, reserved: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.prefix = path.partition("{")[0]
        self.endpoint = endpoint
        self.reserved = reserved  # paths under the prefix that other routes serve

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix) and scope["path"] not in self.reserved:
            return Match.FULL, {"endpoint": self.endpoint}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoint(scope, receive, send)


class _Entry:
    """One route's endpoint: a distinct object per route, so metrics and logs name the route matched."""

    __slots__ = ("_app",)

    def __init__(self, app: FoundryTransport) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


@functools.lru_cache(maxsize=4096)
def _quoted(path: str) -> str:
    return quote(path)


def _target(
    route: inference.InferenceRoute, deployment: str | None, named: str | None, doc: Any, body: bytes
) -> tuple[str, bytes]:
    """The upstream path and body for one attempt at ``deployment``."""
    path = route.upstream_path
    if deployment is None or deployment == named:
        return _quoted(path), body
    if route.deployment is not None:
        endpoint = path[len(inference.DEPLOYMENTS_PREFIX) :].partition("/")[2]
        return quote(f"{inference.DEPLOYMENTS_PREFIX}{deployment}/{endpoint}"), body
    if isinstance(doc, dict):
        return quote(path), orjson.dumps({**doc, "model": deployment})
    return quote(path), body
