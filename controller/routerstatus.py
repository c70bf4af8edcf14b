"""Read the router's ``GET /internal/policy-status`` (SPEC.md §3), with backoff when it is down.

The admin token is read from its file on every poll, so a rotated Secret takes effect
without a restart. One pooled HTTP client for the controller's lifetime.

With ``replicas=True`` the URL's host is a headless Service: it resolves to every ready router
pod, each is asked, and the answers are merged (``merge``) so that a policy counts as loaded only
once every replica reports its digest (a Service URL would answer from one replica at random).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from controller import projection

log = logging.getLogger("kars.controller.router")

POLICY_STATUS_PATH = "/internal/policy-status"
REQUEST_TIMEOUT_S = 5.0


class RouterUnavailable(Exception):
    """The router could not be asked (down, wrong token, bad answer)."""


Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to (a headless Service: one per ready pod), without blocking."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def merge(documents: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One status from every replica's: an entry keeps its digest only where all replicas report
    that digest, carries any replica's ``lastError``, and the union of their warnings."""
    docs = list(documents)
    merged: dict[projection.Key, dict[str, Any]] = {}
    seen: dict[projection.Key, int] = {}
    for doc in docs:
        for entry in doc.get("entries", []) or []:
            key = projection.status_key(entry)
            seen[key] = seen.get(key, 0) + 1
            into = merged.setdefault(key, {**entry, "warnings": []})
            if into.get("digest") != entry.get("digest"):
                into["digest"] = None  # the replicas disagree: not loaded everywhere yet
            if entry.get("lastError") and not into.get("lastError"):
                into["lastError"] = entry["lastError"]
            into["warnings"] = sorted({*into["warnings"], *(entry.get("warnings") or [])})
    for key, entry in merged.items():
        if seen[key] < len(docs):
            entry["digest"] = None  # a replica does not have it at all
    return {"entries": list(merged.values()), "replicas": len(docs)}


class RouterStatusClient:
    def __init__(
        self,
        base_url: str,
        token_file: Path | None,
        *,
        poll_s: float,
        max_poll_s: float,
        replicas: bool = False,
        resolver: Resolver = resolve,
    ) -> None:
        self._base = urllib.parse.urlsplit(base_url.rstrip("/"))
        self._url = base_url.rstrip("/") + POLICY_STATUS_PATH
        self._token_file = token_file
        self._client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S)
        self._replicas = replicas
        self._resolver = resolver
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.next_delay_s = poll_s

    def _headers(self) -> dict[str, str]:
        if self._token_file is None:
            return {}
        token = self._token_file.read_text(encoding="utf-8").strip()
        return {"Authorization": f"Bearer {token}"}

    async def fetch(self) -> dict[str, Any]:
        """The status document (every replica's, merged); on failure the next delay doubles up to ``max_poll_s``."""
        try:
            if not self._replicas:
                data = await self._fetch_one(self._url)
            else:
                data = merge(await asyncio.gather(*(self._fetch_one(url) for url in await self._replica_urls())))
        except RouterUnavailable:
            self.next_delay_s = min(self.next_delay_s * 2, self.max_poll_s)
            raise
        self.next_delay_s = self.poll_s
        return data

    async def _replica_urls(self) -> list[str]:
        host = self._base.hostname or ""
        try:
            addresses = await self._resolver(host)
        except OSError as exc:
            raise RouterUnavailable(f"{host}: cannot resolve the router replicas: {exc}") from exc
        if not addresses:
            raise RouterUnavailable(f"{host}: no router replica is ready")
        port = f":{self._base.port}" if self._base.port else ""
        path = self._base.path + POLICY_STATUS_PATH
        hosts = [f"[{a}]{port}" if ":" in a else f"{a}{port}" for a in addresses]  # an IPv6 address in brackets
        return [urllib.parse.urlunsplit((self._base.scheme, host, path, "", "")) for host in hosts]

    async def _fetch_one(self, url: str) -> dict[str, Any]:
        try:
            response = await self._client.get(url, headers=self._headers())
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            raise RouterUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise RouterUnavailable(f"{url}: not a policy-status document")
        return data

    async def aclose(self) -> None:
        await self._client.aclose()
