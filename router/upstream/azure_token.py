"""Upstream credential from azure-identity: a bearer token for ``foundry.scope``.

The async credentials of azure-identity do the network work (Workload Identity federation,
IMDS / App Service managed identity, or the ``DefaultAzureCredential`` chain) and never block
the loop. This broker keeps the current token and its ``Authorization`` header ready, so a
request costs a dictionary read: the token is refreshed in the background once its
``refresh_on`` (or ``REFRESH_BEFORE_S`` before expiry) has passed, and only a request that
finds no usable token at all waits for one (one fetch shared by all waiting requests).
azure-identity reads its own environment variables (``AZURE_CLIENT_ID``, ``IDENTITY_ENDPOINT``...).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from azure.core.credentials import AccessTokenInfo
from azure.core.exceptions import AzureError
from azure.identity import aio as identity_aio

from router import errors

log = logging.getLogger("kars.upstream.credentials")

REFRESH_BEFORE_S = 300  # azure-identity's own proactive refresh offset
RETRY_S = 30  # after a refresh that failed or returned the same token
EXPIRY_SKEW_S = 10  # a token this close to expiry is not sent


class AsyncTokenCredential(Protocol):
    async def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo: ...

    async def close(self) -> None: ...


def credential_for(kind: str) -> AsyncTokenCredential:
    """The azure-identity async credential for ``foundry.credential``."""
    if kind == "workload":
        return identity_aio.WorkloadIdentityCredential()
    if kind == "managed":
        return identity_aio.ManagedIdentityCredential()
    return identity_aio.DefaultAzureCredential()


class TokenBroker:
    def __init__(self, credential: AsyncTokenCredential, scope: str, *, clock: Callable[[], float] = time.time) -> None:
        self._credential = credential
        self._scope = scope
        self._clock = clock
        self._token: AccessTokenInfo | None = None
        self._headers: tuple[tuple[str, str], ...] = ()
        self._fetch: asyncio.Task[AccessTokenInfo] | None = None
        self._next_attempt = 0.0
        self.fetches = 0  # token requests made through the credential (tests, metrics)

    async def start(self) -> None:
        return None  # the first request (or /readyz) fetches the first token

    def _refresh_due(self, token: AccessTokenInfo, now: float) -> bool:
        due = token.refresh_on if token.refresh_on else token.expires_on - REFRESH_BEFORE_S
        return now >= due and now >= self._next_attempt

    async def headers(self) -> tuple[tuple[str, str], ...]:
        token = self._token
        now = self._clock()
        if token is None or now >= token.expires_on - EXPIRY_SKEW_S:
            await self._fetch_shared()
        elif self._fetch is None and self._refresh_due(token, now):
            self._start_fetch()  # answer with the current token; the next request gets the new one
        return self._headers

    def _start_fetch(self) -> asyncio.Task[AccessTokenInfo]:
        task = asyncio.create_task(self._get(), name="kars-token-refresh")
        task.add_done_callback(self._fetched)
        self._fetch = task
        return task

    async def _fetch_shared(self) -> None:
        task = self._fetch or self._start_fetch()
        try:
            await asyncio.shield(task)
        except AzureError as exc:
            raise errors.UpstreamError(
                f"could not obtain the upstream credential: {type(exc).__name__}", code="upstream_unavailable"
            ) from exc

    async def _get(self) -> AccessTokenInfo:
        self.fetches += 1
        return await self._credential.get_token_info(self._scope)

    def _fetched(self, task: asyncio.Task[AccessTokenInfo]) -> None:
        self._fetch = None
        if task.cancelled():
            return
        exc = task.exception()
        now = self._clock()
        if exc is not None:
            self._next_attempt = now + RETRY_S
            log.warning("upstream token refresh failed: %s", exc)
            return
        token = task.result()
        if self._token is not None and token.expires_on <= self._token.expires_on and token.token == self._token.token:
            self._next_attempt = now + RETRY_S  # the credential kept its cached token: do not ask again at once
        self._token = token
        self._headers = (("authorization", "Bearer " + token.token),)

    async def check(self) -> str | None:
        try:
            await self.headers()
        except errors.KarsError as exc:
            return exc.message
        return None

    async def aclose(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()
            await asyncio.gather(self._fetch, return_exceptions=True)
        await self._credential.close()
