"""Status shapes the controller writes (SPEC.md §3, §8) and the condition arithmetic.

The models give the CRDs their ``status`` schema; ``set_condition`` keeps
``lastTransitionTime`` when a condition's status did not change, as Kubernetes API
conventions ask. Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

ConditionStatus = Literal["True", "False", "Unknown"]
MESSAGE_MAX_CHARS = 32768  # the CRDs' maxLength of a condition's message (characters, not bytes)
TRUNCATED = " … (truncated)"
SandboxPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Expired"]


class _Status(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class Condition(_Status):
    """One observation of the object's state (Kubernetes API conventions)."""

    type: str = Field(min_length=1, max_length=316)
    status: ConditionStatus
    reason: str = Field(min_length=1, max_length=1024)
    message: str = Field(default="", max_length=MESSAGE_MAX_CHARS)
    last_transition_time: str
    observed_generation: int | None = Field(default=None, ge=0)


class PolicyStatus(_Status):
    """Status of a policy CR: the digest the controller projected and whether the router loaded it."""

    observed_generation: int | None = None
    digest: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class SandboxStatus(_Status):
    """Status of a KarsSandbox, kept current from its Pod."""

    phase: SandboxPhase | None = None
    pod_name: str | None = None
    policy_digest: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


def iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def clip(message: str) -> str:
    """``message`` cut to fit the CRD's maxLength, marked as cut: the API server refuses (422) a
    whole status patch with one message too long, and the message of a large invalid CR (a
    TrustGraph's findings, the router's lastError) can be longer."""
    if len(message) <= MESSAGE_MAX_CHARS:
        return message
    return message[: MESSAGE_MAX_CHARS - len(TRUNCATED)] + TRUNCATED


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    now: dt.datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A new conditions list with ``type_`` set; other conditions are kept as they were."""
    out: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    for cond in conditions or []:
        if cond.get("type") == type_:
            previous = cond
        else:
            out.append(dict(cond))
    changed = previous is None or previous.get("status") != status
    new: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": clip(message),
        "lastTransitionTime": iso(now) if changed or previous is None else previous["lastTransitionTime"],
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out.append(new)
    return sorted(out, key=lambda c: str(c.get("type")))


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def same_conditions(a: list[dict[str, Any]] | None, b: list[dict[str, Any]] | None) -> bool:
    """Equal apart from ``lastTransitionTime`` (used to skip no-op status patches)."""

    def strip(conds: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        return sorted(
            ({k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conds or []),
            key=lambda c: str(c.get("type")),
        )

    return strip(a) == strip(b)
