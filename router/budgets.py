"""What a request may cost and which counters it charges (SPEC.md §3 tokenBudget). Pure, no I/O.

**Worst case.** Before forwarding, a request reserves the most it could cost:

- the prompt, estimated from the JSON body without a tokenizer: every string costs
  ``chars / 4`` plus half a token per extra UTF-8 byte (so CJK text, ~1 token per character in
  real tokenizers, is estimated at 1.25 per character rather than the 0.25 a plain ``chars / 4``
  would give), plus one (its last, partial token); every number costs 1 (token-id arrays of
  embeddings); a ``data:`` URL (an inline image) costs ``DATA_URL_TOKENS``; plus
  ``PROMPT_OVERHEAD_TOKENS``. Keys are not counted. This is an estimate: the settle afterwards is
  exact, and prompts held upstream (``previous_response_id``) are invisible here. A tokenizer
  (tiktoken) would cost milliseconds per request on the hot path.
- plus the output: the largest of ``max_completion_tokens``/``max_tokens``/``max_output_tokens``
  times the number of choices (``n``, ``best_of``); embeddings have no output. When the request
  names no maximum, the worst case is the smallest ``perRequestTokens`` of the policies that
  apply (or, with none, the prompt plus ``DEFAULT_OUTPUT_TOKENS``).

**Bounded output.** A request that names no output maximum could generate more than its worst
case, so the router adds the maximum it reserved for (``output_bound``): ``max_completion_tokens``
on chat completions (``max_tokens`` on Azure API versions before 2024-09-01 and on ``/models``),
``max_tokens`` on legacy completions, ``max_output_tokens`` on Responses, per choice. Only the
prompt estimate can then be short of the usage settled afterwards.

**Counters.** Each budget policy keeps its own counters: one per window it sets (hour, day,
month: UTC calendar windows) for the caller's scope key: the sandbox (``ns/name``), its
namespace (``ns``) or the whole cluster (``*``, every caller the policy applies to). The
counter id names the policy, not its limits, so a changed limit applies to the next request
and keeps the usage already counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from router import inference
from router.policy import model
from router.stores import base, windows

ASCII_CHARS_PER_TOKEN = 4
TOKENS_PER_EXTRA_UTF8_BYTE = 0.5
PROMPT_OVERHEAD_TOKENS = 8  # message framing the body does not spell out
DATA_URL_TOKENS = 1_500  # an inline image: the most a high-detail image costs on GPT-4o-class models
DEFAULT_OUTPUT_TOKENS = 4_096  # reserved when neither the request nor any policy bounds the output
MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
CHOICE_FIELDS = ("n", "best_of")
# A count larger than this is taken as this: ~a million requests of it fit a signed 64-bit counter
# (Redis HINCRBY, an SQLite INTEGER), where 10**19 asked once would overflow both.
MAX_COUNT = 10**12
MAX_COMPLETION_TOKENS_SINCE = "2024-09-01"  # Azure OpenAI API versions before it know only max_tokens
CLUSTER_KEY = "*"


def _count(value: Any) -> int | None:
    """``value`` as a count: a non-negative integer, also written as a float with no fraction
    (``100.0``, or ``1e30``, which is how the JSON parser reads an integer past 64 bits); at
    most ``MAX_COUNT``, which no request comes near and every counter store can add up."""
    if type(value) is int:
        return min(value, MAX_COUNT) if value >= 0 else None
    if type(value) is float and value >= 0 and value.is_integer():
        return int(min(value, MAX_COUNT))
    return None


def estimate_prompt_tokens(body: Any) -> int:
    """A cheap estimate of the prompt tokens in a request body (see the module docstring)."""
    texts: list[str] = []
    numbers = 0
    # Containers wait on a stack; the values of one are sorted in a plain loop. Strings are only
    # collected here and measured together below (in C), not one by one.
    stack = [body.values() if type(body) is dict else body if type(body) is list else (body,)]
    while stack:
        for value in stack.pop():
            kind = type(value)  # the parsed body holds exact JSON types: no isinstance chain per value
            if kind is str:
                texts.append(value)
            elif kind is dict:
                stack.append(value.values())
            elif kind is list:
                stack.append(value)
            elif kind is int or kind is float:  # not bool: true/false are not numbers here
                numbers += 1
    text = "".join(texts)
    images = 0
    if "data:" in text:  # rare: inline images are priced apart, not by their length
        kept = [t for t in texts if not t.startswith("data:")]
        images = len(texts) - len(kept)
        text = "".join(kept)
    chars = len(text)
    extra_bytes = 0 if text.isascii() else len(text.encode("utf-8", "surrogatepass")) - chars
    estimate = chars / ASCII_CHARS_PER_TOKEN + extra_bytes * TOKENS_PER_EXTRA_UTF8_BYTE
    # + one a string: no tokenizer merges across two JSON strings, so each ends a token of its own
    # (2,048 one-letter embedding inputs are 2,048 tokens, not 512).
    return math.ceil(estimate + numbers + len(texts) + images * DATA_URL_TOKENS) + PROMPT_OVERHEAD_TOKENS


def requested_output(body: Any) -> int | None:
    """The most output tokens the request asks for (all choices together), or None if unbounded."""
    if not isinstance(body, dict):
        return None
    most: int | None = None
    for field in MAX_OUTPUT_FIELDS:
        value = body.get(field)
        if value is not None and (count := _count(value)) is not None and (most is None or count > most):
            most = count
    if most is None:
        return None
    return min(most * _choices(body), MAX_COUNT)


def _choices(body: dict[str, Any]) -> int:
    choices = 1
    for field in CHOICE_FIELDS:
        value = body.get(field)
        if value is not None and (count := _count(value)) is not None and count > choices:
            choices = count
    return choices


def _output_field(route: inference.InferenceRoute, query: bytes) -> str | None:
    """The field that bounds the output of ``route``'s endpoint (None: the endpoint has none)."""
    if route.endpoint == "chat/completions":
        if inference.starts(route.upstream_path, inference.MODELS_PREFIX):
            return "max_tokens"
        return "max_tokens" if inference.predates(query, MAX_COMPLETION_TOKENS_SINCE) else "max_completion_tokens"
    if route.endpoint == "completions":
        return "max_tokens"
    if route.endpoint == "responses":
        return "max_output_tokens"
    return None


def output_bound(route: inference.InferenceRoute, query: bytes, body: Any, worst: WorstCase) -> tuple[str, int] | None:
    """The output maximum to add to a request that names none: ``(field, tokens a choice)``, or None."""
    if not worst.unbounded or not isinstance(body, dict):
        return None
    if any(body.get(named) is not None for named in MAX_OUTPUT_FIELDS):
        return None  # the caller named a maximum that is no count: the upstream refuses it, not a second field
    field = _output_field(route, query)
    if field is None:
        return None
    return field, max(1, (worst.tokens - worst.prompt) // _choices(body))


@dataclasses.dataclass(slots=True)  # not frozen: built per request (see router.stores.base.Counter)
class WorstCase:
    prompt: int  # the prompt estimate
    tokens: int  # what the request reserves
    unbounded: bool = False  # the request names no output maximum: ``tokens`` assumes one (output_bound)


def worst_case(action: str, body: Any, policies: Sequence[model.InferencePolicy]) -> WorstCase:
    prompt = estimate_prompt_tokens(body)
    if action == "embeddings":
        return WorstCase(prompt, prompt)
    output = requested_output(body)
    if output is not None:
        return WorstCase(prompt, prompt + output)
    caps = [p.spec.token_budget.per_request_tokens for p in policies if p.spec.token_budget is not None]
    bounded = [c for c in caps if c is not None]
    if bounded:
        return WorstCase(prompt, max(prompt, min(bounded)), unbounded=True)
    return WorstCase(prompt, prompt + DEFAULT_OUTPUT_TOKENS, unbounded=True)


def over_cap(
    policies: Sequence[model.InferencePolicy], tokens: int
) -> list[tuple[model.InferencePolicy, model.TokenBudget, int]]:
    """Every policy whose ``perRequestTokens`` is below ``tokens``: (policy, its budget, the cap), in order."""
    over = []
    for p in policies:
        budget = p.spec.token_budget
        if budget is not None and budget.per_request_tokens is not None and tokens > budget.per_request_tokens:
            over.append((p, budget, budget.per_request_tokens))
    return over


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    """One counter of one policy for one caller: what a reservation charges and /v1/budgets shows."""

    policy: str  # "ns/name" of the InferencePolicy
    scope: str  # sandbox | namespace | cluster
    key: str  # whose counter: "ns/name", "ns" or "*"
    span: windows.Span
    limit: int
    enforce: bool  # rejectOnExceed
    fail_open: bool

    @property
    def counter(self) -> str:
        return f"{self.policy}|{self.scope}:{self.key}|{self.span.name}"

    def charge(self) -> base.Charge:
        # The counter outlives its window by the reservation lifetime, so a late settle finds it.
        return base.Charge(self.counter, self.limit, self.span.end + base.RESERVATION_TTL_S, self.enforce)


def scope_key(scope: str, namespace: str, name: str) -> str:
    if scope == "sandbox":
        return f"{namespace}/{name}"
    if scope == "namespace":
        return namespace
    return CLUSTER_KEY


def lines(policies: Iterable[model.InferencePolicy], namespace: str, name: str, now: float) -> list[Line]:
    """Every counter the budget policies in ``policies`` keep for caller ``namespace/name`` at ``now``."""
    out = []
    for p in policies:
        budget = p.spec.token_budget
        if budget is None:
            continue
        limits: tuple[tuple[windows.Window, int | None], ...] = (
            ("hour", budget.hourly_tokens),
            ("day", budget.daily_tokens),
            ("month", budget.monthly_tokens),
        )
        key = scope_key(budget.scope, namespace, name)
        for window, limit in limits:
            if limit is not None:
                span = windows.span(window, now)
                out.append(
                    Line(
                        f"{p.namespace}/{p.name}",
                        budget.scope,
                        key,
                        span,
                        limit,
                        budget.reject_on_exceed,
                        budget.fail_open,
                    )
                )
    return out
