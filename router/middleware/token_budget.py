"""Token budgets: reserve the worst case before forwarding, settle to actual usage after (SPEC.md §3).

Only on inference routes that generate (``router.inference.classify``) and only when a policy
with a ``tokenBudget`` applies to the caller. In order:

1. ``perRequestTokens`` below the request's worst case -> 429 ``per_request_tokens_exceeded``
   (needs no counter, so it is checked first).
2. Reserve the worst case on every counter of every budget that applies, in one atomic store
   operation. A counter that cannot take it -> 429 ``budget_exceeded`` with ``Retry-After``
   (seconds until the latest-resetting full window resets: retrying sooner cannot succeed),
   ``x-ratelimit-remaining-tokens`` and ``x-ratelimit-reset-tokens`` of that window. A full
   counter of a ``rejectOnExceed: false`` policy lets the request through, counted, with
   ``x-kars-budget: exceeded`` on the response, a metric and the access-log field ``budget``.
   A request that names no output maximum is forwarded with the one it reserved for
   (``budgets.output_bound``), so it cannot generate past it.
3. After the response: usage reported by the transport -> settle to it; output sent but no usage
   (a stream cut short) -> keep the whole reservation; no output -> release it.

Store unreachable -> 503 ``budget_store_unavailable``, unless every budget that applies has
``failOpen: true`` (then the request goes through uncounted, flagged ``x-kars-budget: unavailable``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any, NoReturn

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router import _asgi, _body, budgets, errors, inference
from router.identity.principal import Principal
from router.observability import metrics as metrics_mod
from router.policy import model
from router.policy import store as policy_store
from router.stores import base, windows

log = logging.getLogger("kars.budget")

FLAG_HEADER = b"x-kars-budget"
LOG_FIELD = "budget"  # access-log field: ok | exceeded | rejected | unavailable
Clock = Callable[[], float]
MAX_PLANS = 65_536  # cached per-caller plans; a stream of unknown callers cannot grow it further
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 30.0  # a settle the store could not take is retried, backing off


def budget_policies(snapshot: Any, principal: Principal, action: str) -> tuple[model.InferencePolicy, ...]:
    """The policies with a token budget that apply to ``principal`` for ``action``."""
    found = snapshot.inference_policies(principal.namespace, principal.name, action)
    return tuple(p for p in found if p.spec.token_budget is not None)


def _duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-tokens`` form: ``1h2m3s``, ``45s``."""
    total = max(1, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes or hours else "") + f"{secs}s"


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """A caller's counters under one snapshot, valid while ``since <= now < until`` (one UTC hour at most)."""

    snapshot: Any
    policies: tuple[model.InferencePolicy, ...]
    lines: tuple[budgets.Line, ...]
    charges: tuple[base.Charge, ...]
    counters: tuple[str, ...]
    reserved: tuple[Any, ...]  # bound metric children, one per line
    settled: tuple[Any, ...]
    since: float
    until: float


async def cancel_retries(retries: set[asyncio.Task[None]]) -> None:
    """At shutdown, before the store closes: stop the settles still being retried (their
    reservations are the store's to expire)."""
    for task in list(retries):
        task.cancel()
    await asyncio.gather(*retries, return_exceptions=True)


class TokenBudgetMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        store: base.CounterStore,
        policy: policy_store.PolicyStore,
        metrics: metrics_mod.Metrics,
        clock: Clock = time.time,
        retries: set[asyncio.Task[None]] | None = None,
    ) -> None:
        self.app = app
        self._store = store
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        # Plans by (namespace, name, action): the counters a caller charges change only with the
        # snapshot or the hour, so they are worked out once, not per request. Bounded.
        self._plans: dict[tuple[str, str, str], _Plan] = {}
        self._id_prefix = secrets.token_hex(8) + "-"
        self._id_counter = itertools.count(1)
        self._retries = retries if retries is not None else set()  # the app stops them (cancel_retries)

    def plan(self, snapshot: Any, principal: Principal, action: str, now: float) -> _Plan:
        key = (principal.namespace, principal.name, action)
        plan = self._plans.get(key)
        if plan is not None and plan.snapshot is snapshot and plan.since <= now < plan.until:
            return plan
        policies = budget_policies(snapshot, principal, action)
        lines = tuple(budgets.lines(policies, principal.namespace, principal.name, now))
        hour = windows.span("hour", now)  # the validity of a plan without counters
        m = self._metrics
        plan = _Plan(
            snapshot,
            policies,
            lines,
            tuple(line.charge() for line in lines),
            tuple(line.counter for line in lines),
            tuple(m.budget_tokens_reserved.labels(line.scope, line.span.window) for line in lines),
            tuple(m.budget_tokens_settled.labels(line.scope, line.span.window) for line in lines),
            max((line.span.start for line in lines), default=hour.start),
            min((line.span.end for line in lines), default=hour.end),
        )
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def retry_later(self, rid: str, counters: tuple[str, ...], actual: int, deadline: float) -> None:
        """Settle (or release, ``actual`` 0) reservation ``rid`` again and again until the store
        takes it or the reservation's deadline passes (then its sweep releases it, uncharged).
        A store whose finish failed did nothing (memory, SQLite) or can tell a repeat (Redis marks
        the reservation done, so a finish that landed unanswered is not counted twice)."""
        task = asyncio.get_running_loop().create_task(self._retry(rid, counters, actual, deadline))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, rid: str, counters: tuple[str, ...], actual: int, deadline: float) -> None:
        operation = "settle" if actual else "release"
        delay = RETRY_FIRST_S
        while self._clock() + delay < deadline:
            await asyncio.sleep(delay)
            try:
                if actual:
                    await self._store.settle(rid, counters, actual)
                else:
                    await self._store.release(rid, counters)
            except base.StoreUnavailable:
                self._metrics.budget_store_errors.labels(operation).inc()
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            log.warning("budget %s of reservation %s done on a retry (%d tokens)", operation, rid, actual)
            return
        log.error("budget %s of reservation %s given up: its deadline passed", operation, rid)

    def next_reservation_id(self) -> str:
        """Unique across replicas and restarts: a random per-instance prefix and a counter.

        (uuid4 per request cost ~10% of a budgeted request's CPU here: a getrandom call each.)
        """
        return f"{self._id_prefix}{next(self._id_counter):x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        route = inference.classify(scope["path"])
        st = scope["state"]
        principal = st.get(_asgi.PRINCIPAL)
        if route is None or not route.generates or principal is None:
            return await self.app(scope, receive, send)
        snapshot = st.setdefault(_asgi.SNAPSHOT, self._policy.snapshot)
        now = self._clock()
        plan = self.plan(snapshot, principal, route.action, now)
        if not plan.policies:
            return await self.app(scope, receive, send)
        # A JSON body is read for its prompt and output bounds; a form (an image edit's) is not
        # estimated: it reserves what the policies allow a request.
        body = await _body.read_json(scope, receive) if _body.is_json(scope) else None
        await _Budgeted(self, scope, plan, now).run(route, body, receive, send)


class _Budgeted:
    """One budgeted request: reserve, forward, settle."""

    __slots__ = ("fields", "mw", "now", "plan", "policies", "scope")

    def __init__(self, mw: TokenBudgetMiddleware, scope: Scope, plan: _Plan, now: float) -> None:
        self.mw = mw
        self.scope = scope
        self.plan = plan
        self.policies = plan.policies
        self.now = now
        self.fields: dict[str, Any] = scope["state"].setdefault(_asgi.LOG_FIELDS, {})

    async def run(self, route: inference.InferenceRoute, body: Any, receive: Receive, send: Send) -> None:
        mw, m, plan, now = self.mw, self.mw._metrics, self.plan, self.now
        worst = budgets.worst_case(route.action, body, self.policies)
        over_cap = self._check_cap(worst)
        # A request that names no output maximum gets the one it reserves for (budgets: "Bounded output").
        bound = budgets.output_bound(route, self.scope["query_string"], body, worst)
        if bound is not None:
            field, tokens = bound
            _body.rewrite_json(self.scope, {**body, field: tokens})
            self.fields["budgetMaxOutputTokens"] = tokens
        receive = _body.replay(self.scope, receive)
        if not plan.charges:  # only per-request caps: nothing to count, no store to ask
            self.fields[LOG_FIELD] = "exceeded" if over_cap else "ok"
            return await mw.app(self.scope, receive, _flagging(send, b"exceeded") if over_cap else send)
        rid = mw.next_reservation_id()
        deadline = now + base.RESERVATION_TTL_S
        try:
            outcome = await mw._store.reserve(rid, plan.charges, worst.tokens, deadline=deadline, now=now)
        except base.StoreUnavailable as exc:
            m.budget_store_errors.labels("reserve").inc()
            self.fields[LOG_FIELD] = "unavailable"
            if all(line.fail_open for line in plan.lines):
                log.warning("budget store unavailable, failing open: %s", exc)
                return await mw.app(self.scope, receive, _flagging(send, b"unavailable"))
            m.budget_rejections.labels("budget_store_unavailable").inc()
            raise errors.ServiceUnavailable(
                "the token budget store is unavailable", code="budget_store_unavailable"
            ) from None

        fit = [base.fits(c, ch, worst.tokens) for ch, c in zip(plan.charges, outcome.before, strict=True)]
        if not outcome.admitted:
            judged = zip(plan.lines, outcome.before, fit, strict=True)
            self._refuse([(line, c) for line, c, ok in judged if line.enforce and not ok], worst)
        over = [line for line, ok in zip(plan.lines, fit, strict=True) if not ok]  # all rejectOnExceed: false
        for child in plan.reserved:
            child.inc(worst.tokens)
        for line in over:
            m.budget_over_limit_allowed.labels(line.scope, line.span.window).inc()
        exceeded = bool(over) or over_cap
        self.fields[LOG_FIELD] = "exceeded" if exceeded else "ok"
        self.fields["budgetReservedTokens"] = worst.tokens
        cancelled = False
        try:
            await mw.app(self.scope, receive, _flagging(send, b"exceeded") if exceeded else send)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            finish = self._finish(rid, worst.tokens, deadline)
            # A cancelled request still settles (or releases): shielded, then. Only then, as a
            # shield costs a task and extra event-loop turns on every request.
            await (asyncio.shield(finish) if cancelled else finish)

    def _check_cap(self, worst: budgets.WorstCase) -> bool:
        """Refuse a request over an enforced ``perRequestTokens``; whether it is over one that is not
        (``rejectOnExceed: false``: allowed, flagged and counted, as a full budget is)."""
        capped = budgets.over_cap(self.policies, worst.tokens)
        if not capped:
            return False
        m = self.mw._metrics
        enforced = [c for c in capped if c[1].reject_on_exceed]
        if not enforced:
            for _, budget, _ in capped:
                m.budget_over_limit_allowed.labels(budget.scope, "request").inc()
            return True
        policy, budget, cap = enforced[0]
        m.budget_rejections.labels("per_request_tokens_exceeded").inc()
        m.budget_tokens_rejected.labels(budget.scope, "request").inc(worst.tokens)
        self.fields[LOG_FIELD] = "rejected"
        raise errors.TokenBudgetExceeded(
            f"this request may use up to {worst.tokens} tokens (prompt estimate {worst.prompt} + maximum "
            f"output); InferencePolicy {policy.namespace}/{policy.name} allows {cap} per request",
            code="per_request_tokens_exceeded",
            headers={"x-should-retry": "false"},
        )

    def _refuse(self, full: list[tuple[budgets.Line, base.Counter]], worst: budgets.WorstCase) -> NoReturn:
        m = self.mw._metrics
        for line, _ in full:
            m.budget_tokens_rejected.labels(line.scope, line.span.window).inc(worst.tokens)
        m.budget_rejections.labels("budget_exceeded").inc()
        self.fields[LOG_FIELD] = "rejected"
        # The window that resets last: retrying before it resets cannot succeed.
        line, counter = max(full, key=lambda lc: lc[0].span.end)
        wait_s = line.span.seconds_left(self.now)
        raise errors.TokenBudgetExceeded(
            f"token budget exceeded: InferencePolicy {line.policy} allows {line.limit} tokens per "
            f"{line.span.window} for {line.scope} {line.key}; {counter.used} used, {counter.reserved} reserved, "
            f"this request may use up to {worst.tokens}; the {line.span.window} resets at {line.span.resets_at}",
            headers={
                "retry-after": str(max(1, math.ceil(wait_s))),
                "x-ratelimit-remaining-tokens": str(counter.remaining(line.limit)),
                "x-ratelimit-reset-tokens": _duration(wait_s),
                "x-should-retry": "false",
            },
        )

    async def _finish(self, rid: str, reserved: int, deadline: float) -> None:
        st = self.scope["state"]
        usage = st.get(_asgi.USAGE)
        store, plan = self.mw._store, self.plan
        if usage is not None:
            actual, operation = usage.total_tokens, "settle"
        elif st.get(_asgi.UPSTREAM_OUTPUT):
            actual, operation = reserved, "settle"  # output without usage: charged in full (SPEC.md §3)
        else:
            actual, operation = 0, "release"
        try:
            if operation == "settle":
                await store.settle(rid, plan.counters, actual)
            else:
                await store.release(rid, plan.counters)
        except base.StoreUnavailable as exc:
            # Retried in the background; the reservation holds its place meanwhile.
            self.mw._metrics.budget_store_errors.labels(operation).inc()
            log.error("budget %s of reservation %s failed, retrying: %s", operation, rid, exc)
            self.mw.retry_later(rid, plan.counters, actual, deadline)
            return
        self.fields["budgetChargedTokens"] = actual
        if actual:
            for child in plan.settled:
                child.inc(actual)


def _flagging(send: Send, value: bytes) -> Send:
    """``send`` that adds ``x-kars-budget: <value>`` to the response start."""

    async def flagged(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (FLAG_HEADER, value)]}
        await send(message)

    return flagged
