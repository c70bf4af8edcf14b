"""The counter-store contract, run against every store: memory, SQLite (a file) and Redis (a real server)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from router.stores import base, memory, sqlite
from router.stores import redis as redis_store
from tests.support import waiting

NOW = float(int(time.time()))  # Redis expires keys by its own (real) clock
LATER = NOW + 60
FAR = NOW + 10 * 86400  # counters' expiry in these tests: well after every "now" used


def charge(counter: str, limit: int, *, enforce: bool = True, expires_at: float = FAR) -> base.Charge:
    return base.Charge(counter, limit, expires_at, enforce)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[base.CounterStore]:
    s: base.CounterStore
    if request.param == "memory":
        s = memory.MemoryStore()
    elif request.param == "sqlite":
        s = sqlite.SqliteStore(tmp_path / "budgets.db")
    else:
        s = redis_store.RedisStore(request.getfixturevalue("redis_url"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def reserve(s: base.CounterStore, rid: str, charges: list[base.Charge], amount: int, **kw: float) -> base.Outcome:
    kw.setdefault("now", NOW)
    kw.setdefault("deadline", NOW + base.RESERVATION_TTL_S)
    return await s.reserve(rid, charges, amount, deadline=kw["deadline"], now=kw["now"])


async def test_reserve_settle_release(store: base.CounterStore) -> None:
    charges = [charge("a", 100), charge("b", 1000)]
    out = await reserve(store, "r1", charges, 60)
    assert out == base.Outcome(True, (base.Counter(0, 0), base.Counter(0, 0)))
    assert await store.read(["a", "b"]) == [base.Counter(0, 60), base.Counter(0, 60)]

    await store.settle("r1", ["a", "b"], 25)
    assert await store.read(["a", "b"]) == [base.Counter(25, 0), base.Counter(25, 0)]

    out = await reserve(store, "r2", charges, 70)
    assert out == base.Outcome(True, (base.Counter(25, 0), base.Counter(25, 0)))
    await store.release("r2", ["a", "b"])
    assert await store.read(["a", "b"]) == [base.Counter(25, 0), base.Counter(25, 0)]


async def test_refusal_changes_nothing_on_any_counter(store: base.CounterStore) -> None:
    await reserve(store, "r1", [charge("a", 100)], 90)
    out = await reserve(store, "r2", [charge("b", 1000), charge("a", 100)], 20)
    assert out == base.Outcome(False, (base.Counter(0, 0), base.Counter(0, 90)))
    assert await store.read(["a", "b"]) == [base.Counter(0, 90), base.Counter(0, 0)]
    # Exactly to the limit is allowed.
    assert (await reserve(store, "r3", [charge("b", 1000), charge("a", 100)], 10)).admitted


async def test_unenforced_counter_is_charged_past_its_limit(store: base.CounterStore) -> None:
    await store.settle("none", [], 0)  # settling an unknown reservation with no counters is harmless
    await reserve(store, "r1", [charge("soft", 50, enforce=False)], 40)
    out = await reserve(store, "r2", [charge("soft", 50, enforce=False), charge("hard", 500)], 40)
    assert out.admitted
    assert not base.fits(out.before[0], charge("soft", 50), 40)
    assert await store.read(["soft", "hard"]) == [base.Counter(0, 80), base.Counter(0, 40)]


async def test_settle_above_the_reservation_counts_actual_usage(store: base.CounterStore) -> None:
    await reserve(store, "r1", [charge("a", 100)], 50)
    await store.settle("r1", ["a"], 130)
    assert await store.read(["a"]) == [base.Counter(130, 0)]
    out = await reserve(store, "r2", [charge("a", 100)], 1)
    assert not out.admitted
    assert out.before[0].remaining(100) == 0  # never negative


async def test_expired_reservations_are_swept_by_the_next_reserve(store: base.CounterStore) -> None:
    await reserve(store, "dead", [charge("a", 100)], 80, deadline=NOW + 10)  # a router that crashed
    out = await reserve(store, "r2", [charge("a", 100)], 50, now=NOW + 5)
    assert not out.admitted  # still within its deadline
    out = await reserve(store, "r3", [charge("a", 100)], 50, now=NOW + 11)
    assert out.admitted
    assert out.before == (base.Counter(0, 0),)
    # The crashed router's settle arrives after all: usage is recorded, nothing released twice.
    await store.settle("dead", ["a"], 30)
    assert await store.read(["a"]) == [base.Counter(30, 50)]
    await store.release("dead", ["a"])
    assert await store.read(["a"]) == [base.Counter(30, 50)]


async def test_counters_expire_after_their_window(store: base.CounterStore) -> None:
    now = time.time()  # Redis expires keys on its own clock
    await reserve(store, "r1", [charge("old", 100, expires_at=now - 5)], 10, now=now - 10, deadline=now + 100)
    await store.settle("r1", ["old"], 10)
    await reserve(store, "r2", [charge("new", 100)], 10, now=now, deadline=now + 100)
    assert await store.read(["old"]) == [base.Counter(0, 0)]


async def test_concurrent_reserves_never_overcommit(store: base.CounterStore) -> None:
    limit, amount, n = 1000, 7, 300
    outs = await asyncio.gather(
        *(reserve(store, f"r{i}", [charge("day", limit), charge("month", 10 * limit)], amount) for i in range(n))
    )
    admitted = sum(o.admitted for o in outs)
    assert admitted == limit // amount
    assert await store.read(["day", "month"]) == [base.Counter(0, admitted * amount)] * 2
    for o in outs:
        if not o.admitted:
            assert o.before[0].used + o.before[0].reserved + amount > limit


async def test_read_of_unknown_counters(store: base.CounterStore) -> None:
    assert await store.read([]) == []
    assert await store.read(["nope"]) == [base.Counter()]
    assert await store.ping() is None


# -- store-specific ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_settled_reservations_leave_nothing_behind_in_process(kind: str, tmp_path: Path) -> None:
    """A busy router settles thousands of reservations a second, each with an hour's deadline:
    what the store keeps must follow what is held, not what was ever reserved. A crashed
    reservation among them is still swept when its deadline passes."""
    s = memory.MemoryStore() if kind == "memory" else sqlite.SqliteStore(tmp_path / "budgets.db")
    await s.open()
    try:
        await reserve(s, "crashed", [charge("a", 10**9)], 5, deadline=NOW + 10)
        tracemalloc.start()
        try:
            for i in range(20_000):
                await reserve(s, f"r{i}", [charge("a", 10**9)], 3)
                await s.settle(f"r{i}", ["a"], 1)
                if i % 1000 == 0:
                    await asyncio.sleep(0.02)  # as a server's loop would: SQLite writes behind
            grown, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert grown < 500_000  # ~125 bytes a settled reservation, ~2.5 MB, when they were kept
        assert await s.read(["a"]) == [base.Counter(20_000, 5)]
        await reserve(s, "later", [charge("a", 10**9)], 1, now=NOW + 11)  # sweeps the crashed one
        assert await s.read(["a"]) == [base.Counter(20_000, 1)]
    finally:
        await s.close()


async def test_sqlite_counters_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "budgets.db"
    s = sqlite.SqliteStore(path)
    await s.open()
    await reserve(s, "r1", [charge("a", 100)], 10)
    await s.settle("r1", ["a"], 7)
    await reserve(s, "r2", [charge("a", 100)], 20)  # in flight when the router stops
    await s.close()
    s = sqlite.SqliteStore(path)
    await s.open()
    try:
        assert await s.read(["a"]) == [base.Counter(7, 20)]
        await s.settle("r2", ["a"], 5)
        assert await s.read(["a"]) == [base.Counter(12, 0)]
    finally:
        await s.close()


def on_disk(path: Path, counter: str) -> tuple[int, int] | None:
    """A counter as the file holds it, read by another connection (as the sqlite3 shell would)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT used, reserved FROM counters WHERE id = ?", (counter,)).fetchone()
    return (int(row[0]), int(row[1])) if row else None


async def test_sqlite_changes_reach_the_file_while_the_store_runs(tmp_path: Path) -> None:
    path = tmp_path / "budgets.db"
    s = sqlite.SqliteStore(path)
    await s.open()
    try:
        await reserve(s, "r1", [charge("a", 100)], 10)
        await waiting.until_async(lambda: on_disk(path, "a") == (0, 10), what="the reservation on disk")
        assert on_disk(path, "a") == (0, 10)  # written while the store is open, not at close
        await s.settle("r1", ["a"], 7)
        await waiting.until_async(lambda: on_disk(path, "a") == (7, 0), what="the settle on disk")
        assert on_disk(path, "a") == (7, 0)
    finally:
        await s.close()


async def recovered(s: sqlite.SqliteStore) -> None:
    """Wait until the store reports its retried write succeeded. It clears its error when the write
    returns to the loop, which is after the commit is visible to another connection: so wait for
    the report, then look at the file (never the other way round)."""

    async def healthy() -> bool:
        return await s.ping() is None

    await waiting.until_async(healthy, what="the recovery reported")


async def test_sqlite_a_failed_write_keeps_counting_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "RETRY_INTERVAL_S", 0.05)
    path = tmp_path / "budgets.db"
    s = sqlite.SqliteStore(path)
    await s.open()
    try:
        await reserve(s, "r0", [charge("a", 1000)], 10)
        await waiting.until_async(lambda: on_disk(path, "a") == (0, 10), what="the first write")
        with contextlib.closing(sqlite3.connect(path)) as db:  # every write to the counters now fails
            db.execute("CREATE TRIGGER fail BEFORE UPDATE ON counters BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
        for i in range(1, 4):
            assert (await reserve(s, f"r{i}", [charge("a", 1000)], 10)).admitted
        await s.settle("r0", ["a"], 4)
        reason = await waiting.until_async(s.ping, what="the failed write reported")
        assert "disk on fire" in reason
        assert await s.read(["a"]) == [base.Counter(4, 30)]  # counting went on, exactly
        assert on_disk(path, "a") == (0, 10)  # nothing half-written
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("DROP TRIGGER fail")
        await recovered(s)
        assert on_disk(path, "a") == (4, 30)
    finally:
        await s.close()
    s = sqlite.SqliteStore(path)
    await s.open()
    try:
        assert await s.read(["a"]) == [base.Counter(4, 30)]
    finally:
        await s.close()


def reservations_on_disk(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {str(row[0]) for row in db.execute("SELECT id FROM reservations")}


def log_deletes(path: Path) -> None:
    """From now on the file logs every reservation row deleted from it (a trigger, in its own table)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(
            "CREATE TABLE deleted (id TEXT NOT NULL);"
            "CREATE TRIGGER log_delete AFTER DELETE ON reservations BEGIN INSERT INTO deleted VALUES (old.id); END;"
        )


def deletes_logged(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [str(row[0]) for row in db.execute("SELECT id FROM deleted ORDER BY rowid")]


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL run by every connection opened in the test, values bound in. The trace is set by the
    thread that opens the connection, which is the thread that uses it (the store's own)."""
    seen: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = connect(*args, **kwargs)
        db.set_trace_callback(seen.append)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    return seen


async def test_sqlite_a_reservation_that_never_reached_the_file_costs_no_sql(
    tmp_path: Path, statements: list[str]
) -> None:
    """Under load most reservations are reserved and settled within one flush: the file never holds
    them, and a DELETE for each would be ~100 useless statements in every transaction. (A DELETE of
    a missing row fires no trigger, hence the trace.)"""
    path = tmp_path / "budgets.db"
    s = sqlite.SqliteStore(path)
    await s.open()
    try:
        log_deletes(path)
        await reserve(s, "kept", [charge("a", 100)], 10)
        await waiting.until_async(lambda: reservations_on_disk(path) == {"kept"}, what="the reservation on disk")
        await reserve(s, "quick", [charge("a", 100)], 20)
        await s.settle("quick", ["a"], 3)  # no await here yields to the flusher: both in one window
        await s.settle("kept", ["a"], 7)
        await waiting.until_async(lambda: on_disk(path, "a") == (10, 0), what="the settles on disk")
        assert reservations_on_disk(path) == set()
        assert deletes_logged(path) == ["kept"]  # the one the file held is deleted
        deletes = {q for q in statements if q.startswith("DELETE FROM reservations")}  # a trigger repeats it
        assert deletes == {"DELETE FROM reservations WHERE id = 'kept'"}  # and "quick" cost no SQL
    finally:
        await s.close()


async def test_sqlite_a_reservation_read_back_at_open_is_deleted_when_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "budgets.db"
    s = sqlite.SqliteStore(path)
    await s.open()
    await reserve(s, "r1", [charge("a", 100)], 10)  # in flight when the router stops
    await s.close()
    assert reservations_on_disk(path) == {"r1"}
    log_deletes(path)
    s = sqlite.SqliteStore(path)
    await s.open()
    try:
        await s.settle("r1", ["a"], 4)
        await waiting.until_async(lambda: not reservations_on_disk(path), what="the reservation deleted")
        assert deletes_logged(path) == ["r1"]
    finally:
        await s.close()
    s = sqlite.SqliteStore(path)
    await s.open()
    try:
        assert await s.read(["a"]) == [base.Counter(4, 0)]  # not held again after a restart
    finally:
        await s.close()


async def test_sqlite_a_delete_in_a_failed_write_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rolled-back DELETE leaves the row in the file: the retry must still know it is there."""
    monkeypatch.setattr(sqlite, "RETRY_INTERVAL_S", 0.05)
    path = tmp_path / "budgets.db"
    s = sqlite.SqliteStore(path)
    await s.open()
    try:
        await reserve(s, "r0", [charge("a", 100)], 10)
        await waiting.until_async(lambda: reservations_on_disk(path) == {"r0"}, what="the reservation on disk")
        with contextlib.closing(sqlite3.connect(path)) as db:  # every write to the counters now fails
            db.execute("CREATE TRIGGER fail BEFORE UPDATE ON counters BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
        await s.settle("r0", ["a"], 4)
        assert "disk on fire" in await waiting.until_async(s.ping, what="the failed write reported")
        assert reservations_on_disk(path) == {"r0"}  # rolled back
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("DROP TRIGGER fail")
        await recovered(s)
        assert reservations_on_disk(path) == set()  # the retried delete
        assert on_disk(path, "a") == (4, 0)
    finally:
        await s.close()


async def test_sqlite_one_process_owns_the_file(tmp_path: Path) -> None:
    path = tmp_path / "budgets.db"
    first = sqlite.SqliteStore(path)
    await first.open()
    second = sqlite.SqliteStore(path)
    try:
        with pytest.raises(base.StoreUnavailable, match=r"in use by another router process.*redis"):
            await second.open()
        assert await second.ping() is not None
    finally:
        await first.close()
    await second.open()  # released with the first one's close (or its death)
    await second.close()


async def test_sqlite_unusable_path_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = sqlite.SqliteStore(blocker / "budgets.db")
    with pytest.raises((base.StoreUnavailable, OSError)):
        await s.open()
    with pytest.raises(base.StoreUnavailable):
        await reserve(sqlite.SqliteStore(tmp_path / "never-opened.db"), "r", [charge("a", 1)], 1)
    s2 = sqlite.SqliteStore(tmp_path / "x.db")
    assert await s2.ping() is not None  # not open


async def test_redis_scripts_are_idempotent_under_client_retries(redis_url: str) -> None:
    s = redis_store.RedisStore(redis_url)
    await s.open()
    try:
        assert (await reserve(s, "r1", [charge("a", 100)], 60)).admitted
        assert (await reserve(s, "r1", [charge("a", 100)], 60)).admitted  # a retried reserve: charged once
        assert await s.read(["a"]) == [base.Counter(0, 60)]
        await s.settle("r1", ["a"], 40)
        await s.settle("r1", ["a"], 40)  # a retried settle: counted once
        await s.release("r1", ["a"])
        assert await s.read(["a"]) == [base.Counter(40, 0)]
    finally:
        await s.close()


async def test_redis_keys_expire_with_their_window(redis_url: str, redis_server: object) -> None:
    s = redis_store.RedisStore(redis_url)
    await s.open()
    try:
        await reserve(s, "r1", [charge("a", 100, expires_at=NOW + 86400)], 60)
        ttl_at = await s._client.expiretime("kars:budget:c:a")  # type: ignore[union-attr]
        assert ttl_at == int(NOW + 86400)
        # The reservation's record outlives its deadline as long as its counters live, so a sweep
        # after any idle time still finds what to release.
        assert await s._client.expiretime("kars:budget:r:r1") == int(NOW + 86400)  # type: ignore[union-attr]
    finally:
        await s.close()


async def test_redis_unreachable_is_unavailable(dead_port: int) -> None:
    s = redis_store.RedisStore(f"redis://127.0.0.1:{dead_port}/0")
    await s.open()
    try:
        started = time.monotonic()
        with pytest.raises(base.StoreUnavailable):
            await reserve(s, "r", [charge("a", 1)], 1)
        assert time.monotonic() - started < 5  # fails fast, never hangs a request
        assert (await s.ping()) is not None
        with pytest.raises(base.StoreUnavailable):
            await s.read(["a"])
    finally:
        await s.close()
