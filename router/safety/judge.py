"""One request's content-safety decisions: findings in, refusal (or not) out, counted and logged.

``Judge`` holds the request's effective ceilings (``verdict.effective``) and turns what the
providers found into a decision: a block is a 400 ``content_filter`` in Azure's shape (SPEC.md §3,
``innererror.content_filter_result`` with the categories that tripped); a provider that could not
answer is a 503 ``content_safety_unavailable`` unless failOpen applies. Each decision is counted
(``kars_safety_blocks``, ``kars_safety_unavailable``) and written to the access-log field ``safety``
(``passed``, ``blocked``, ``fail_open``, ``unavailable``; ``safetyBlocked`` says what tripped).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

from router import errors
from router.observability import metrics as metrics_mod
from router.safety import providers, texts, verdict

log = logging.getLogger("kars.safety")

LOG_FIELD = "safety"
PROMPT_MESSAGE = "The prompt was filtered by the content-safety policy ({}). Please modify your prompt and retry."
OUTPUT_MESSAGE = "The model output was filtered by the content-safety policy ({})."


class Judge:
    __slots__ = ("_fields", "_metrics", "ceilings", "output_providers", "providers")

    def __init__(
        self,
        safety: providers.Safety,
        ceilings: verdict.Ceilings,
        metrics: metrics_mod.Metrics,
        fields: dict[str, Any],
    ) -> None:
        self.providers = safety.providers
        self.output_providers = safety.output_providers
        self.ceilings = ceilings
        self._metrics = metrics
        self._fields = fields

    async def check_prompt(self, prompt: texts.Prompt) -> None:
        """Raise the refusal for ``prompt``, if any."""
        if prompt and self.providers:
            calls = [(p.name, p.check_prompt(prompt, shields=self.ceilings.shields)) for p in self.providers]
            found, down = await gather(calls)
            refusal = self.decide(found, down, "prompt")
            if refusal is not None:
                raise refusal
        self._fields.setdefault(LOG_FIELD, "passed")

    def decide(
        self, found: Sequence[verdict.Finding], down: verdict.Unavailable | None, stage: str
    ) -> errors.KarsError | None:
        blocked = verdict.tripped(found, self.ceilings)
        if blocked:
            return self.block(blocked, stage)
        if down is not None:
            return self._unavailable(down, stage)
        return None

    def block(self, blocked: Sequence[verdict.Finding], stage: str) -> errors.KarsError:
        for category, provider in dict.fromkeys((f.category, f.provider) for f in blocked):
            self._metrics.safety_blocks.labels(category, provider, stage).inc()
        what = verdict.summary(blocked)
        self._fields[LOG_FIELD] = "blocked"
        self._fields["safetyBlocked"] = f"{stage}: {what}"
        template = PROMPT_MESSAGE if stage == "prompt" else OUTPUT_MESSAGE
        result = verdict.content_filter_result(blocked)
        inner = {"code": "ResponsibleAIPolicyViolation", "content_filter_result": result}
        return errors.InvalidRequest(
            template.format(what),
            code="content_filter",
            extra={"param": "prompt" if stage == "prompt" else None, "innererror": inner},
            headers={"x-should-retry": "false"},
        )

    def note(self, key: str, value: str) -> None:
        """An extra access-log field."""
        self._fields[key] = value

    def upstream_blocked(self, filtered: Sequence[verdict.Finding]) -> None:
        """The upstream refused the prompt itself (its own content filter): count it, pass it on."""
        for category, provider in dict.fromkeys((f.category, f.provider) for f in filtered):
            self._metrics.safety_blocks.labels(category, provider, "prompt").inc()
        self._fields[LOG_FIELD] = "blocked"
        self._fields["safetyBlocked"] = "prompt: " + (verdict.summary(filtered) or "foundry")

    def _unavailable(self, down: verdict.Unavailable, stage: str) -> errors.KarsError | None:
        log.warning("content safety provider unavailable (%s): %s", stage, down)
        if self.ceilings.fail_open:
            self._metrics.safety_unavailable.labels(down.provider, "fail_open").inc()
            self._fields[LOG_FIELD] = "fail_open"
            return None
        self._metrics.safety_unavailable.labels(down.provider, "fail_closed").inc()
        self._fields[LOG_FIELD] = "unavailable"
        return errors.ServiceUnavailable(
            f"content safety check unavailable ({down.provider})", code="content_safety_unavailable"
        )


async def gather(
    calls: Sequence[tuple[str, Awaitable[list[verdict.Finding]]]],
) -> tuple[list[verdict.Finding], verdict.Unavailable | None]:
    """Run provider checks concurrently: every finding, and the first provider that could not answer."""
    if len(calls) == 1:  # the common case (local floor only): no task
        try:
            return await calls[0][1], None
        except verdict.Unavailable as exc:
            return [], exc
    results = await asyncio.gather(*(c for _, c in calls), return_exceptions=True)
    found: list[verdict.Finding] = []
    down: verdict.Unavailable | None = None
    for result in results:
        if isinstance(result, verdict.Unavailable):
            down = down or result
        elif isinstance(result, BaseException):
            raise result
        else:
            found.extend(result)
    return found, down
