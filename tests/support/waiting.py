"""Bounded waits: poll a condition until it holds or a deadline passes (never a bare sleep)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def until(probe: Callable[[], T | None], *, timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "") -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what or probe}")
        time.sleep(interval_s)


async def until_async(
    probe: Callable[[], T | Awaitable[T | None] | None],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.01,
    what: str = "",
) -> T:
    """``until`` for tests on an event loop: the loop keeps running between probes (which may be async)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what or probe}")
        await asyncio.sleep(interval_s)
