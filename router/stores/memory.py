"""In-process counter store, for tests and single-process experiments; forgets on restart.

Every operation runs without an ``await`` in between, so on one event loop it is atomic.
Same semantics as the persistent stores, deadlines and expiry included.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

from router.stores import base


@dataclasses.dataclass(slots=True)
class _Cell:
    used: int
    reserved: int
    expires_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class _Held:
    counters: tuple[str, ...]
    amount: int
    deadline: float


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._cells: dict[str, _Cell] = {}
        self._held: dict[str, _Held] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, reservation id)
        self._expiries: list[tuple[float, str]] = []  # heap of (expires_at, counter)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _sweep(self, now: float) -> None:
        swept = 0
        while self._deadlines and self._deadlines[0][0] < now and swept < base.SWEEP_BATCH:
            _, rid = heapq.heappop(self._deadlines)
            if rid in self._held:
                self._drop(rid)
                swept += 1
        while self._expiries and self._expiries[0][0] < now:
            expires_at, counter = heapq.heappop(self._expiries)
            cell = self._cells.get(counter)
            if cell is not None and cell.expires_at <= expires_at:
                del self._cells[counter]

    def _drop(self, rid: str) -> _Held | None:
        held = self._held.pop(rid, None)
        if held is not None:
            for counter in held.counters:
                cell = self._cells.get(counter)
                if cell is not None:
                    cell.reserved = max(0, cell.reserved - held.amount)
        return held

    def _counter(self, counter: str) -> base.Counter:
        cell = self._cells.get(counter)
        return base.Counter(cell.used, cell.reserved) if cell is not None else base.Counter()

    async def reserve(
        self, reservation_id: str, charges: Sequence[base.Charge], amount: int, *, deadline: float, now: float
    ) -> base.Outcome:
        self._sweep(now)
        before = tuple(self._counter(ch.counter) for ch in charges)
        if not base.admits(before, charges, amount):
            return base.Outcome(False, before)
        for ch in charges:
            cell = self._cells.get(ch.counter)
            if cell is None:
                cell = self._cells[ch.counter] = _Cell(0, 0, ch.expires_at)
                heapq.heappush(self._expiries, (ch.expires_at, ch.counter))
            cell.reserved += amount
        self._held[reservation_id] = _Held(tuple(ch.counter for ch in charges), amount, deadline)
        heapq.heappush(self._deadlines, (deadline, reservation_id))
        return base.Outcome(True, before)

    async def settle(self, reservation_id: str, counters: Sequence[str], actual: int) -> None:
        held = self._drop(reservation_id)
        for counter in held.counters if held is not None else counters:
            cell = self._cells.get(counter)
            if cell is not None:
                cell.used += actual

    async def release(self, reservation_id: str, counters: Sequence[str]) -> None:
        self._drop(reservation_id)

    async def read(self, counters: Sequence[str]) -> list[base.Counter]:
        return [self._counter(c) for c in counters]

    async def ping(self) -> str | None:
        return None
