"""Read the router's ``GET /internal/policy-status`` (SPEC.md §3), with backoff when it is down.

The admin token is read from its file on every poll, so a rotated Secret takes effect
without a restart. One pooled HTTP client for the controller's lifetime.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("kars.controller.router")

POLICY_STATUS_PATH = "/internal/policy-status"
REQUEST_TIMEOUT_S = 5.0


class RouterUnavailable(Exception):
    """The router could not be asked (down, wrong token, bad answer)."""


class RouterStatusClient:
    def __init__(self, base_url: str, token_file: Path | None, *, poll_s: float, max_poll_s: float) -> None:
        self._url = base_url.rstrip("/") + POLICY_STATUS_PATH
        self._token_file = token_file
        self._client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S)
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.next_delay_s = poll_s

    def _headers(self) -> dict[str, str]:
        if self._token_file is None:
            return {}
        token = self._token_file.read_text(encoding="utf-8").strip()
        return {"Authorization": f"Bearer {token}"}

    async def fetch(self) -> dict[str, Any]:
        """The status document; on failure the next delay doubles up to ``max_poll_s``."""
        try:
            response = await self._client.get(self._url, headers=self._headers())
            response.raise_for_status()
            data = response.json()
            if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
                raise RouterUnavailable(f"{self._url}: not a policy-status document")
        except (httpx.HTTPError, OSError, ValueError) as exc:
            self.next_delay_s = min(self.next_delay_s * 2, self.max_poll_s)
            raise RouterUnavailable(f"{self._url}: {type(exc).__name__}: {exc}") from exc
        except RouterUnavailable:
            self.next_delay_s = min(self.next_delay_s * 2, self.max_poll_s)
            raise
        self.next_delay_s = self.poll_s
        return data

    async def aclose(self) -> None:
        await self._client.aclose()
