"""Upstream credential from a mounted secret file, sent as ``api-key`` (Azure OpenAI key auth).

The file is read at start and re-read in the background every ``RELOAD_S`` (Kubernetes
updates a mounted Secret in place), off the event loop. A request never waits for the file
unless no key has been read yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from router import errors

log = logging.getLogger("kars.upstream.credentials")

RELOAD_S = 60.0
HEADER = "api-key"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


class ApiKeyBroker:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._headers: tuple[tuple[str, str], ...] = ()
        self._loaded_at = 0.0
        self._reload: asyncio.Task[None] | None = None
        self._error: str | None = None

    async def start(self) -> None:
        await self._load()

    async def _load(self) -> None:
        try:
            key = await asyncio.to_thread(_read, self._path)
        except OSError as exc:
            self._error = f"cannot read foundry.apiKeyFile {self._path}: {exc.strerror or exc}"
            log.warning("%s", self._error)
            return
        finally:
            self._loaded_at = self._clock()
        if not key:
            self._error = f"foundry.apiKeyFile {self._path} is empty"
            log.warning("%s", self._error)
            return
        self._error = None
        self._headers = ((HEADER, key),)

    async def headers(self) -> tuple[tuple[str, str], ...]:
        if not self._headers:
            await self._load()
            if not self._headers:
                raise errors.UpstreamError(self._error or "no upstream API key", code="upstream_unavailable")
        elif self._clock() - self._loaded_at >= RELOAD_S and self._reload is None:
            self._reload = asyncio.create_task(self._background_reload(), name="kars-api-key-reload")
        return self._headers

    async def _background_reload(self) -> None:
        try:
            await self._load()
        finally:
            self._reload = None

    async def check(self) -> str | None:
        await self._load()
        return None if self._headers and self._error is None else self._error

    async def aclose(self) -> None:
        if self._reload is not None:
            self._reload.cancel()
            await asyncio.gather(self._reload, return_exceptions=True)
