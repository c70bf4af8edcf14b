"""Ceilings, findings and Azure's ``content_filter_result`` shape: pure data, no I/O.

A *ceiling* is the highest severity a category may reach (SPEC.md §3). The effective ceilings of
one request are the cluster floor tightened by every InferencePolicy ``contentSafety`` that
applies, never loosened (a loosening policy was already refused at load). A *finding* is what one
provider saw: a harm category with a severity (``hate``, ``self_harm``, ``sexual``, ``violence``,
Azure's annotation names), or a detection (``jailbreak``, ``indirect_attack``,
``custom_blocklists``). Severities are ranks 0..3 for Safe, Low, Medium, High.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from router.policy import model

HARM = ("hate", "self_harm", "sexual", "violence")  # Azure annotation names, in this order everywhere
SEVERITY_NAMES = ("safe", "low", "medium", "high")  # Azure's annotation values, by rank
RANK = {name: rank for rank, name in enumerate(SEVERITY_NAMES)}
_POLICY_FIELDS = ("hate", "self_harm", "sexual", "violence")  # model.ContentSafety / SafetyFloor fields

JAILBREAK = "jailbreak"  # a direct attack in the user's prompt
INDIRECT = "indirect_attack"  # an attack carried by documents (tool results, retrieved text)
BLOCKLIST = "custom_blocklists"


class Unavailable(Exception):
    """A provider could not give an answer (unreachable, erroring, malformed reply)."""

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Ceilings:
    """The effective limits of one request."""

    harm: tuple[int, int, int, int]  # highest allowed rank per HARM category
    shields: bool = False  # requirePromptShields: attacks detected upstream or by Content Safety block
    fail_open: bool = False  # a provider that cannot answer lets the request through

    def allows(self, category: str, rank: int) -> bool:
        return rank <= self.harm[HARM.index(category)]


def effective(floor: model.SafetyFloor, policies: Iterable[model.ContentSafety]) -> Ceilings:
    """The floor tightened by ``policies``; failOpen only when the floor allows it and every policy asks."""
    harm = [model.SEVERITY_RANK[getattr(floor, f)] for f in _POLICY_FIELDS]
    shields = False
    asked: list[bool] = []
    for cs in policies:
        for i, f in enumerate(_POLICY_FIELDS):
            wanted = getattr(cs, f)
            if wanted is not None:
                harm[i] = min(harm[i], model.SEVERITY_RANK[wanted])
        shields = shields or cs.require_prompt_shields
        asked.append(cs.fail_open)
    fail_open = floor.allow_fail_open and bool(asked) and all(asked)
    return Ceilings((harm[0], harm[1], harm[2], harm[3]), shields=shields, fail_open=fail_open)


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    category: str  # a HARM name, JAILBREAK, INDIRECT or BLOCKLIST
    provider: str  # foundry | content_safety | local
    severity: int | None = None  # rank, for HARM categories
    name: str | None = None  # the blocklist (or built-in pattern set) that matched


def tripped(findings: Iterable[Finding], ceilings: Ceilings) -> list[Finding]:
    """The findings that block under ``ceilings``.

    Harm categories block above their ceiling. Attacks detected by Foundry or Content Safety block
    when a policy requires prompt shields; the local floor's own hits (the operator's blocklists and
    injection patterns) always block.
    """
    out = []
    for f in findings:
        if f.category in HARM:
            if f.severity is not None and not ceilings.allows(f.category, f.severity):
                out.append(f)
        elif f.provider == "local" or ceilings.shields:
            out.append(f)
    return out


def content_filter_result(blocked: Sequence[Finding]) -> dict[str, Any]:
    """Azure's ``innererror.content_filter_result`` for ``blocked`` (the categories that tripped)."""
    result: dict[str, Any] = {}
    for f in blocked:
        if f.category in HARM:
            prev = result.get(f.category)
            rank = f.severity or 0
            if prev is None or RANK[prev["severity"]] < rank:
                result[f.category] = {"filtered": True, "severity": SEVERITY_NAMES[rank]}
        elif f.category == BLOCKLIST:
            entry = result.setdefault(BLOCKLIST, {"filtered": True, "details": []})
            detail = {"filtered": True, "id": f.name or ""}
            if detail not in entry["details"]:
                entry["details"].append(detail)
        else:
            result[f.category] = {"filtered": True, "detected": True}
    return result


def summary(blocked: Sequence[Finding]) -> str:
    """``violence(content_safety), jailbreak(local)``: for messages and the access log."""
    seen = dict.fromkeys(f"{f.category}({f.provider})" for f in blocked)
    return ", ".join(seen)
