"""SQLite counter store: the embedded default; counters survive a restart.

One dedicated thread owns the connection and runs every operation, so the event loop never
blocks on disk. Writes run in ``BEGIN IMMEDIATE`` transactions (the write lock is taken before
reading), which makes reserve/settle atomic across every counter of a request, and across
processes that share the file. Writes that arrive while the thread is busy are applied one after
the other in one transaction (group commit): the same result as one transaction each, with one
commit and one wake-up of the event loop per batch instead of per operation. The database runs
in WAL mode with ``synchronous=NORMAL``: a committed transaction survives a crash of the process
(not necessarily of the machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from router.stores import base

BUSY_TIMEOUT_MS = 5000  # how long a transaction waits for another process's write lock
EXPIRED_BATCH = 64  # expired counters deleted per reserve

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    id TEXT PRIMARY KEY, used INTEGER NOT NULL, reserved INTEGER NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS counters_expiry ON counters (expires_at);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, deadline REAL NOT NULL, amount INTEGER NOT NULL, counters TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_deadline ON reservations (deadline);
"""
_SEP = "\n"  # counter ids never contain a newline

_Done = tuple["asyncio.Future[Any]", Any, "Exception | None"]


def _resolve(outcomes: list[_Done]) -> None:
    """On the event loop: hand each batched write its result."""
    for future, result, exc in outcomes:
        if future.cancelled():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


class SqliteStore:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # guards the two below, shared by the loop and the store's thread
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._draining = False

    # -- thread plumbing ----------------------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._executor is None:
            raise base.StoreUnavailable("the SQLite budget store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except sqlite3.Error as exc:
            raise base.StoreUnavailable(f"SQLite budget store at {self._path}: {exc}") from exc

    async def _write(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` in a write transaction, batched with the writes queued beside it."""
        if self._executor is None or self._loop is None:
            raise base.StoreUnavailable("the SQLite budget store is not open")
        future: asyncio.Future[_T] = self._loop.create_future()
        with self._lock:
            self._pending.append((body, future))
            start, self._draining = not self._draining, True
        if start:
            try:
                self._executor.submit(self._drain)
            except RuntimeError:  # shut down while this write was arriving
                with self._lock:
                    self._pending.clear()
                    self._draining = False
                raise base.StoreUnavailable("the SQLite budget store is closed") from None
        try:
            return await future
        except sqlite3.Error as exc:
            raise base.StoreUnavailable(f"SQLite budget store at {self._path}: {exc}") from exc

    def _drain(self) -> None:
        """On the store's thread: commit what is queued, batch after batch, until nothing is."""
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._draining = False
                    return
            outcomes = self._commit(batch)
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                self._loop.call_soon_threadsafe(_resolve, outcomes)

    def _commit(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]) -> list[_Done]:
        db = self._db
        try:
            if db is None:
                raise sqlite3.ProgrammingError("the database is closed")
            db.execute("BEGIN IMMEDIATE")
            try:
                results = [body(db) for body, _ in batch]
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except Exception as exc:  # the whole batch failed and changed nothing
            return [(future, None, exc) for _, future in batch]
        return [(future, result, None) for (_, future), result in zip(batch, results, strict=True)]

    def _connect(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
        self._db = db

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kars-sqlite")
        await self._run(self._connect)

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._run(self._disconnect)
        self._executor.shutdown(wait=True)
        self._executor = None

    # -- operations (each runs on the store's thread) -----------------------------------------

    @staticmethod
    def _drop(db: sqlite3.Connection, rid: str) -> tuple[int, list[str]] | None:
        row = db.execute("SELECT amount, counters FROM reservations WHERE id = ?", (rid,)).fetchone()
        if row is None:
            return None
        amount, counters = int(row[0]), str(row[1]).split(_SEP)
        db.executemany(
            "UPDATE counters SET reserved = max(0, reserved - ?) WHERE id = ?", [(amount, c) for c in counters]
        )
        db.execute("DELETE FROM reservations WHERE id = ?", (rid,))
        return amount, counters

    @classmethod
    def _sweep(cls, db: sqlite3.Connection, now: float) -> None:
        expired = db.execute(
            "SELECT id FROM reservations WHERE deadline < ? ORDER BY deadline LIMIT ?", (now, base.SWEEP_BATCH)
        ).fetchall()
        for (rid,) in expired:
            cls._drop(db, rid)
        db.execute(
            "DELETE FROM counters WHERE id IN (SELECT id FROM counters WHERE expires_at < ? LIMIT ?)",
            (now, EXPIRED_BATCH),
        )

    @staticmethod
    def _counters(db: sqlite3.Connection, counters: Sequence[str]) -> list[base.Counter]:
        """One statement, so the counters come from one consistent read."""
        marks = ",".join("?" * len(counters))
        rows = db.execute(f"SELECT id, used, reserved FROM counters WHERE id IN ({marks})", tuple(counters))
        found = {str(r[0]): base.Counter(int(r[1]), int(r[2])) for r in rows}
        return [found.get(c, base.Counter()) for c in counters]

    def _reserve(
        self, rid: str, charges: Sequence[base.Charge], amount: int, deadline: float, now: float
    ) -> Callable[[sqlite3.Connection], base.Outcome]:
        def body(db: sqlite3.Connection) -> base.Outcome:
            self._sweep(db, now)
            before = tuple(self._counters(db, [ch.counter for ch in charges]))
            if not base.admits(before, charges, amount):
                return base.Outcome(False, before)
            db.executemany(
                "INSERT INTO counters (id, used, reserved, expires_at) VALUES (?, 0, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET reserved = reserved + excluded.reserved, "
                "expires_at = max(expires_at, excluded.expires_at)",
                [(ch.counter, amount, ch.expires_at) for ch in charges],
            )
            db.execute(
                "INSERT INTO reservations (id, deadline, amount, counters) VALUES (?, ?, ?, ?)",
                (rid, deadline, amount, _SEP.join(ch.counter for ch in charges)),
            )
            return base.Outcome(True, before)

        return body

    def _settle(self, rid: str, counters: Sequence[str], actual: int) -> Callable[[sqlite3.Connection], None]:
        def body(db: sqlite3.Connection) -> None:
            held = self._drop(db, rid)
            targets = held[1] if held is not None else counters
            db.executemany("UPDATE counters SET used = used + ? WHERE id = ?", [(actual, c) for c in targets])

        return body

    def _read(self, counters: Sequence[str]) -> list[base.Counter]:
        assert self._db is not None
        return self._counters(self._db, counters)

    def _ping(self) -> None:
        assert self._db is not None
        self._db.execute("SELECT 1").fetchone()

    # -- the interface ------------------------------------------------------------------------

    async def reserve(
        self, reservation_id: str, charges: Sequence[base.Charge], amount: int, *, deadline: float, now: float
    ) -> base.Outcome:
        return await self._write(self._reserve(reservation_id, list(charges), amount, deadline, now))

    async def settle(self, reservation_id: str, counters: Sequence[str], actual: int) -> None:
        await self._write(self._settle(reservation_id, list(counters), actual))

    async def release(self, reservation_id: str, counters: Sequence[str]) -> None:
        await self._write(lambda db: self._drop(db, reservation_id))

    async def read(self, counters: Sequence[str]) -> list[base.Counter]:
        return await self._run(self._read, list(counters))

    async def ping(self) -> str | None:
        try:
            await self._run(self._ping)
        except base.StoreUnavailable as exc:
            return str(exc)
        return None
