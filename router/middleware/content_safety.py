"""Content safety on inference routes that generate text (SPEC.md §3): prompt before, output after.

The last layer before the transport (identity -> jws -> trust_graph -> token_budget ->
content_safety). For a ``chat`` / ``responses`` / ``image`` request: the effective ceilings
are the cluster floor tightened by the caller's InferencePolicies' ``contentSafety``
(``verdict.effective``); the prompt's text (``router.safety.texts``) goes to every provider at
once; a refusal is raised before anything is forwarded. The output is then checked as it passes
(``router.safety.guard.OutputGuard``). Embeddings and audio are not checked (they generate no
text). Every body is read as JSON but a form (``router._body.is_json``); a form's prompt (an
image edit's) is its ``prompt`` field.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from router import _asgi, _body, inference
from router.identity.principal import Principal
from router.observability import metrics as metrics_mod
from router.policy import store as policy_store
from router.safety import guard, providers, texts, verdict
from router.safety import judge as judge_mod

CHECKED_ACTIONS = frozenset({"chat", "responses", "image"})
MAX_KNOWN = 65_536  # cached per-caller ceilings


class ContentSafetyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        safety: providers.Safety,
        policy: policy_store.PolicyStore,
        metrics: metrics_mod.Metrics,
    ) -> None:
        self.app = app
        self._safety = safety
        self._policy = policy
        self._metrics = metrics
        self._floor_only = verdict.effective(safety.floor, ())
        # Ceilings by (namespace, name, action), valid for the snapshot they were worked out on. Bounded.
        self._known: dict[tuple[str, str, str], tuple[Any, verdict.Ceilings]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        route = inference.classify(scope["path"])
        if route is None or route.action not in CHECKED_ACTIONS:
            return await self.app(scope, receive, send)
        st = scope["state"]
        ceilings = self._ceilings(st, route.action)
        judge = judge_mod.Judge(self._safety, ceilings, self._metrics, st.setdefault(_asgi.LOG_FIELDS, {}))
        if _body.is_json(scope):
            doc = await _body.read_json(scope, receive)
        else:  # a form (an image edit): its prompt is a text field
            doc = await _body.read_form_fields(scope, receive)
        await judge.check_prompt(texts.prompt_of(route.action, doc))
        out = guard.OutputGuard(send, judge, st)
        try:
            await self.app(scope, _body.replay(scope, receive), out.send)
        except guard.Blocked as exc:
            if not exc.answered:
                raise exc.error from None

    def _ceilings(self, st: dict[str, Any], action: str) -> verdict.Ceilings:
        """The caller's effective ceilings: worked out once per caller, action and policy snapshot."""
        principal = st.get(_asgi.PRINCIPAL)
        if not isinstance(principal, Principal) or principal.kind != "sandbox":
            return self._floor_only
        snapshot = st.setdefault(_asgi.SNAPSHOT, self._policy.snapshot)
        key = (principal.namespace, principal.name, action)
        known = self._known.get(key)
        if known is not None and known[0] is snapshot:
            return known[1]
        found = snapshot.inference_policies(principal.namespace, principal.name, action)
        ceilings = verdict.effective(
            self._safety.floor, [p.spec.content_safety for p in found if p.spec.content_safety is not None]
        )
        if len(self._known) >= MAX_KNOWN:
            self._known.clear()
        self._known[key] = (snapshot, ceilings)
        return ceilings
