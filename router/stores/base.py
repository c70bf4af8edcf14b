"""The counter-store interface of token budgets, and the one admission rule every store applies.

A request's reservation charges one amount to several counters at once (every window of every
budget policy that applies: hour, day, month, for each of sandbox, namespace, cluster). A store does each
operation on all of them atomically:

- ``reserve``: if every *enforced* counter can take ``amount`` (``used + reserved + amount <=
  limit``), add it to ``reserved`` on all of them and remember the reservation; otherwise change
  nothing. Counters of ``rejectOnExceed: false`` policies are charged without being checked.
  The answer carries each counter as the store saw it at that instant, so a refusal can say
  which window was full and by how much.
- ``settle``: move the reservation into ``used`` at the actual token count.
- ``release``: drop the reservation.
- ``read``: the counters as they are now.

Crash safety: every reservation carries an id and a deadline. A router that dies mid-request
never settles; its reservations are found by deadline and released by the next ``reserve`` on
any replica that shares the store (each ``reserve`` first sweeps a bounded number of
reservations whose deadline has passed). A ``settle`` that arrives after its reservation was
swept still records the usage, without releasing twice. Counters expire a grace period after
their window ends (``Charge.expires_at``), so a settle near a window's end still finds its counter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

# How long a reservation may live before a sweep releases it. It bounds how long a crashed
# router's in-flight reservations hold budget; it must outlast the longest request (upstream
# requests time out well before an hour).
RESERVATION_TTL_S = 3600.0
# Reservations released per sweep, so one reserve never does unbounded work.
SWEEP_BATCH = 16


class StoreUnavailable(Exception):
    """The store cannot be reached or did not answer in time (rendered as 503 by the caller)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Charge:
    """One counter a reservation charges."""

    counter: str  # stable id: policy, scope key and window span (see router.budgets)
    limit: int
    expires_at: float  # epoch seconds after which the counter may be dropped
    enforce: bool = True  # False: count it, never refuse on it (rejectOnExceed: false)


# Values built on every request (Counter, Outcome; memory.Held, budgets.WorstCase, usage.Usage) are
# plain slotted dataclasses that nothing mutates, not frozen ones: a frozen dataclass's __init__ sets
# each field through object.__setattr__, ~4x the cost (bench instructions: 13k a request for the five).
@dataclasses.dataclass(slots=True)
class Counter:
    used: int = 0
    reserved: int = 0

    def remaining(self, limit: int) -> int:
        """Tokens still admissible under ``limit`` (never negative, even after a limit was lowered)."""
        return max(0, limit - self.used - self.reserved)


@dataclasses.dataclass(slots=True)  # not frozen: built per request (see Counter)
class Outcome:
    admitted: bool
    before: tuple[Counter, ...]  # each charge's counter just before this reserve, in charge order


def fits(counter: Counter, charge: Charge, amount: int) -> bool:
    return counter.used + counter.reserved + amount <= charge.limit


def admits(before: Sequence[Counter], charges: Sequence[Charge], amount: int) -> bool:
    """The admission rule, the same in every store (Redis runs it in Lua, see redis.py)."""
    return all(fits(c, ch, amount) or not ch.enforce for c, ch in zip(before, charges, strict=True))


class CounterStore(Protocol):
    """What the token-budget layer needs from a store. All methods raise ``StoreUnavailable``."""

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def reserve(
        self, reservation_id: str, charges: Sequence[Charge], amount: int, *, deadline: float, now: float
    ) -> Outcome: ...

    async def settle(self, reservation_id: str, counters: Sequence[str], actual: int) -> None: ...

    async def release(self, reservation_id: str, counters: Sequence[str]) -> None: ...

    async def read(self, counters: Sequence[str]) -> list[Counter]: ...

    async def ping(self) -> str | None:
        """None when reachable, else a short reason (for ``/readyz``)."""
        ...
