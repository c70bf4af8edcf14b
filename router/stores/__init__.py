"""Budget counter stores: memory (tests), sqlite (embedded default), redis (shared by replicas).

``create(settings)`` picks one by ``budgets.store``; the interface is ``router.stores.base``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from router.settings import BudgetSettings
from router.stores import base

__all__ = ["base", "create", "shared_claim"]


def create(settings: BudgetSettings) -> base.CounterStore:
    """The configured store, not yet opened (the app's lifespan opens and closes it)."""
    if settings.store == "memory":
        from router.stores import memory as memory_store

        return memory_store.MemoryStore()
    if settings.store == "sqlite":
        from router.stores import sqlite as sqlite_store

        return sqlite_store.SqliteStore(settings.sqlite_path)
    from router.stores import redis as redis_store

    assert settings.redis_url is not None  # the settings validator requires it
    return redis_store.RedisStore(settings.redis_url)


def shared_claim(store: base.CounterStore) -> Callable[[str, float], Awaitable[bool]] | None:
    """The claim-once of a store every replica shares (Redis), else None (per-process stores)."""
    if store.name != "redis":
        return None
    from router.stores import redis as redis_store

    assert isinstance(store, redis_store.RedisStore)
    return store.claim_once
