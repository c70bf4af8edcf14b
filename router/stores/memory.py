"""In-process counter store, for tests and single-process experiments; forgets on restart.

Every operation runs without an ``await`` in between, so on one event loop it is atomic.
Same semantics as the persistent stores, deadlines and expiry included. With ``journal=True`` it
also remembers which counters and reservations changed since ``take_changes()`` was last called:
the SQLite store keeps its counters here and writes those changes behind (``router.stores.sqlite``).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

from router.stores import base

# The deadline heap drops a settled reservation lazily; it is rebuilt from the reservations still
# held once stale entries outnumber them (and this floor), so it stays as small as what is held.
COMPACT_FLOOR = 1024


@dataclasses.dataclass(slots=True)
class _Cell:
    used: int
    reserved: int
    expires_at: float


@dataclasses.dataclass(slots=True)  # not frozen: built per request (see router.stores.base.Counter)
class Held:
    counters: tuple[str, ...]
    amount: int
    deadline: float


@dataclasses.dataclass(frozen=True, slots=True)
class Changes:
    """Counters and reservations as they are now, for each one changed; None where one is gone."""

    cells: dict[str, tuple[int, int, float] | None]  # counter -> (used, reserved, expires_at)
    held: dict[str, Held | None]

    def __bool__(self) -> bool:
        return bool(self.cells or self.held)


class MemoryStore:
    name = "memory"

    def __init__(self, *, journal: bool = False) -> None:
        self._cells: dict[str, _Cell] = {}
        self._held: dict[str, Held] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, reservation id), see COMPACT_FLOOR
        self._expiries: list[tuple[float, str]] = []  # heap of (expires_at, counter)
        # Ids of the counters and reservations changed since the last take_changes(); kept only
        # when asked for (journal=True), or a plain memory store would remember every id forever.
        self._changed_cells: set[str] = set()
        self._changed_held: set[str] = set()
        self._journal = journal

    def load(self, cells: dict[str, tuple[int, int, float]], held: dict[str, Held]) -> None:
        """Start from saved state (before the first operation; not a change)."""
        for counter, (used, reserved, expires_at) in cells.items():
            self._cells[counter] = _Cell(used, reserved, expires_at)
            self._expiries.append((expires_at, counter))
        heapq.heapify(self._expiries)
        self._held.update(held)
        self._deadlines.extend((h.deadline, rid) for rid, h in held.items())
        heapq.heapify(self._deadlines)

    def take_changes(self) -> Changes:
        """What changed since the last call (needs ``journal=True``), and forget it."""
        cells: dict[str, tuple[int, int, float] | None] = {}
        for counter in self._changed_cells:
            cell = self._cells.get(counter)
            cells[counter] = (cell.used, cell.reserved, cell.expires_at) if cell is not None else None
        held = {rid: self._held.get(rid) for rid in self._changed_held}
        self._changed_cells.clear()
        self._changed_held.clear()
        return Changes(cells, held)

    def mark_changed(self, changes: Changes) -> None:
        """Remember ``changes`` as not yet taken again (a write of them failed)."""
        self._changed_cells.update(changes.cells)
        self._changed_held.update(changes.held)

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
                if self._journal:
                    self._changed_cells.add(counter)

    def _drop(self, rid: str) -> Held | None:
        held = self._held.pop(rid, None)
        if held is not None:
            for counter in held.counters:
                cell = self._cells.get(counter)
                if cell is not None:
                    cell.reserved = max(0, cell.reserved - held.amount)
            if self._journal:
                self._changed_cells.update(held.counters)
                self._changed_held.add(rid)
        return held

    def _counter(self, counter: str) -> base.Counter:
        cell = self._cells.get(counter)
        return base.Counter(cell.used, cell.reserved) if cell is not None else base.Counter()

    async def reserve(
        self, reservation_id: str, charges: Sequence[base.Charge], amount: int, *, deadline: float, now: float
    ) -> base.Outcome:
        self._sweep(now)
        before = tuple([self._counter(ch.counter) for ch in charges])
        if not base.admits(before, charges, amount):
            return base.Outcome(False, before)
        cells = self._cells
        for ch in charges:
            cell = cells.get(ch.counter)
            if cell is None:
                cell = cells[ch.counter] = _Cell(0, 0, ch.expires_at)
                heapq.heappush(self._expiries, (ch.expires_at, ch.counter))
            cell.reserved += amount
        held = Held(tuple([ch.counter for ch in charges]), amount, deadline)
        self._held[reservation_id] = held
        if len(self._deadlines) > 2 * len(self._held) + COMPACT_FLOOR:
            self._deadlines = [(h.deadline, rid) for rid, h in self._held.items()]
            heapq.heapify(self._deadlines)
        else:
            heapq.heappush(self._deadlines, (deadline, reservation_id))
        if self._journal:
            self._changed_cells.update(held.counters)
            self._changed_held.add(reservation_id)
        return base.Outcome(True, before)

    async def settle(self, reservation_id: str, counters: Sequence[str], actual: int) -> None:
        held = self._drop(reservation_id)
        targets = held.counters if held is not None else counters
        for counter in targets:
            cell = self._cells.get(counter)
            if cell is not None:
                cell.used += actual
        if self._journal:
            self._changed_cells.update(targets)

    async def release(self, reservation_id: str, counters: Sequence[str]) -> None:
        self._drop(reservation_id)

    async def read(self, counters: Sequence[str]) -> list[base.Counter]:
        return [self._counter(c) for c in counters]

    async def ping(self) -> str | None:
        return None
