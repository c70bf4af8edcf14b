"""SQLite counter store: the embedded default of one router process; counters survive a restart.

The counters live in memory (``router.stores.memory``: every operation is atomic on the event
loop, with no thread hop and no disk on the request's path) and are written behind to one SQLite
file: what changed is written in one transaction on the store's own thread, at most every
``FLUSH_INTERVAL_S`` (at once when the store was idle), and on close. At open the file is read
back, reservations included, so a restart keeps the usage, and a crashed router's reservations
are released by deadline (``router.stores.base``). A crash loses at most the changes of the last
``FLUSH_INTERVAL_S``: reservations that would have been released anyway, and the settled usage
of the requests that ended in that time. A reservation reserved and ended between two writes
never reaches the file and costs no SQL: the store's thread knows which reservations the file
holds, and deletes only those.

One process owns the file: ``open`` takes an exclusive lock (``flock`` on ``<path>.lock``), and
a second router pointed at the same file fails to start and says so. Replicas that share
budgets use Redis (``router.stores.redis``). Other readers (the ``sqlite3`` shell) may read the
file while the router runs: it is in WAL mode with ``synchronous=NORMAL`` (a committed
transaction survives a crash of the process, not necessarily of the machine).

A write that fails (disk full, I/O error) is retried on the next flush with everything changed
since; the counters in memory stay exact, and ``ping`` (readiness) reports the error until a
write succeeds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from router.stores import base, memory

log = logging.getLogger("kars.budget")

BUSY_TIMEOUT_MS = 5000  # how long a write waits for a reader (the sqlite3 shell) to let go
FLUSH_INTERVAL_S = 0.05  # the most a crash can lose; ~150 us of CPU a transaction, 20 a second at most
RETRY_INTERVAL_S = 1.0  # between attempts after a failed write

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    id TEXT PRIMARY KEY, used INTEGER NOT NULL, reserved INTEGER NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, deadline REAL NOT NULL, amount INTEGER NOT NULL, counters TEXT NOT NULL
) WITHOUT ROWID;
"""
_SEP = "\n"  # counter ids never contain a newline

_UPSERT_COUNTER = (
    "INSERT INTO counters (id, used, reserved, expires_at) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
    "used = excluded.used, reserved = excluded.reserved, expires_at = excluded.expires_at"
)
_UPSERT_RESERVATION = (
    "INSERT INTO reservations (id, deadline, amount, counters) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
    "deadline = excluded.deadline, amount = excluded.amount, counters = excluded.counters"
)


class SqliteStore:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._counters = memory.MemoryStore(journal=True)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._last_flush = 0.0  # loop time
        self._error: str | None = None  # of the last write, until one succeeds
        self._sleeping = False  # the flusher waits for its next turn (and may be cancelled)
        self._closing = False
        # Reservations the file holds as of the last COMMIT. Touched only on the store's one thread
        # (_connect, _write, _disconnect), so it needs no lock with the event loop.
        self._on_disk: set[str] = set()

    # -- the thread ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._executor is None:
            raise base.StoreUnavailable("the SQLite budget store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except (sqlite3.Error, OSError) as exc:
            raise base.StoreUnavailable(f"SQLite budget store at {self._path}: {exc}") from exc

    def _connect(self) -> tuple[dict[str, tuple[int, int, float]], dict[str, memory.Held]]:
        """Take the file (or fail), open it, and read back what is in it."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self._path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise base.StoreUnavailable(
                f"SQLite budget store at {self._path} is in use by another router process; one process owns "
                "a budgets.sqlitePath (replicas that share budgets use budgets.store: redis)"
            ) from None
        self._lock_fd = fd
        db = sqlite3.connect(self._path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        self._db = db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
        cells = {
            str(i): (int(u), int(r), float(e))
            for i, u, r, e in db.execute("SELECT id, used, reserved, expires_at FROM counters")
        }
        held = {
            str(i): memory.Held(tuple(str(c).split(_SEP)), int(a), float(d))
            for i, d, a, c in db.execute("SELECT id, deadline, amount, counters FROM reservations")
        }
        self._on_disk = set(held)
        return cells, held

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._on_disk = set()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # and with it the lock
            self._lock_fd = None

    def _write(self, changes: memory.Changes) -> None:
        db = self._db
        if db is None:
            raise sqlite3.ProgrammingError("the database is closed")
        gone = [(c,) for c, cell in changes.cells.items() if cell is None]
        cells = [(c, *cell) for c, cell in changes.cells.items() if cell is not None]
        # Ended before it was ever written (most are: reserved and settled within one flush): no SQL.
        ended = [(rid,) for rid, held in changes.held.items() if held is None and rid in self._on_disk]
        held = [(rid, h.deadline, h.amount, _SEP.join(h.counters)) for rid, h in changes.held.items() if h is not None]
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM counters WHERE id = ?", gone)
            db.executemany(_UPSERT_COUNTER, cells)
            db.executemany("DELETE FROM reservations WHERE id = ?", ended)
            db.executemany(_UPSERT_RESERVATION, held)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise  # _on_disk unchanged: the retry deletes what the file still holds
        self._on_disk.difference_update(rid for (rid,) in ended)
        self._on_disk.update(row[0] for row in held)

    # -- writing behind -----------------------------------------------------------------------

    def _changed(self) -> None:
        if self._flusher is None and self._executor is not None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush(), name="kars-sqlite-flush")

    async def _flush(self) -> None:
        """Write what changed, at most every FLUSH_INTERVAL_S, until nothing is left to write."""
        loop = asyncio.get_running_loop()
        try:
            while not self._closing:
                wait = self._last_flush + FLUSH_INTERVAL_S - loop.time()
                if wait > 0:
                    self._sleeping = True
                    try:
                        await asyncio.sleep(wait)
                    finally:
                        self._sleeping = False
                if not await self._write_changes():
                    return
        finally:
            self._flusher = None

    async def _write_changes(self) -> bool:
        """One transaction of everything changed; False when there was nothing to write."""
        changes = self._counters.take_changes()
        if not changes:
            return False
        self._last_flush = asyncio.get_running_loop().time()
        try:
            await self._run(self._write, changes)
        except base.StoreUnavailable as exc:
            self._counters.mark_changed(changes)
            if self._error is None:
                log.error("writing budget counters failed; retrying every %g s: %s", RETRY_INTERVAL_S, exc)
            self._error = str(exc)
            self._last_flush += RETRY_INTERVAL_S - FLUSH_INTERVAL_S
            return True
        if self._error is not None:
            log.warning("budget counters written again after a failure")
            self._error = None
        return True

    # -- the interface ------------------------------------------------------------------------

    async def open(self) -> None:
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kars-sqlite")
        try:
            cells, held = await self._run(self._connect)
        except BaseException:
            await self._shutdown()
            raise
        self._counters.load(cells, held)

    async def close(self) -> None:
        if self._executor is None:
            return
        self._closing = True
        flusher = self._flusher
        if flusher is not None:
            if self._sleeping:
                flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)  # a write under way completes
        try:
            await self._write_changes()
            if self._error is not None:
                log.error("budget counter changes since the last good write are lost: %s", self._error)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        executor = self._executor
        if executor is None:
            return
        try:
            await self._run(self._disconnect)
        finally:
            self._executor = None
            executor.shutdown(wait=True)

    async def reserve(
        self, reservation_id: str, charges: Sequence[base.Charge], amount: int, *, deadline: float, now: float
    ) -> base.Outcome:
        self._check_open()
        outcome = await self._counters.reserve(reservation_id, charges, amount, deadline=deadline, now=now)
        self._changed()
        return outcome

    async def settle(self, reservation_id: str, counters: Sequence[str], actual: int) -> None:
        self._check_open()
        await self._counters.settle(reservation_id, counters, actual)
        self._changed()

    async def release(self, reservation_id: str, counters: Sequence[str]) -> None:
        self._check_open()
        await self._counters.release(reservation_id, counters)
        self._changed()

    async def read(self, counters: Sequence[str]) -> list[base.Counter]:
        self._check_open()
        return await self._counters.read(counters)

    async def ping(self) -> str | None:
        if self._executor is None:
            return "the SQLite budget store is not open"
        return self._error

    def _check_open(self) -> None:
        if self._executor is None:
            raise base.StoreUnavailable("the SQLite budget store is not open")
