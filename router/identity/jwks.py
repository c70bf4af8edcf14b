"""A cached JSON Web Key Set: the cluster's OIDC keys for service-account tokens.

Keys are fetched once and kept for ``REFRESH_S``; a token with an unknown ``kid`` triggers a
refetch, at most once per ``MIN_REFETCH_S`` and one fetch at a time (concurrent callers wait
for the same fetch). A failed fetch keeps the keys already known. Until one fetch has succeeded
there is no key set to judge a token by: every lookup is 503 ``identity_unavailable`` (fail
closed, but never a 401 that calls a good token bad), retried at most once per ``MIN_REFETCH_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import jwt

from router import errors

log = logging.getLogger("kars.identity")

REFRESH_S = 300.0
MIN_REFETCH_S = 10.0
FETCH_TIMEOUT_S = 5.0
MAX_JWKS_BYTES = 1024 * 1024

# Asymmetric algorithms only: never "none", never HS* (SPEC.md §1).
_DEFAULT_ALG: dict[tuple[object, object], str] = {
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
    ("EC", "P-384"): "ES384",
    ("OKP", "Ed25519"): "EdDSA",
}
ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"})


def _unavailable() -> errors.ServiceUnavailable:
    return errors.ServiceUnavailable(
        "cannot verify the token: the signing key set is unavailable", code="identity_unavailable"
    )


class JwksCache:
    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        bearer: Callable[[], str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._client = client
        self._bearer = bearer
        self._clock = clock
        self._keys: dict[str, tuple[jwt.PyJWK, str]] = {}
        self._known = False  # a fetch has succeeded: a kid missing from _keys is unknown, not unseen
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key(self, kid: str) -> tuple[jwt.PyJWK, str] | None:
        """The key and its algorithm for ``kid``, refetching the set if needed and allowed."""
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= REFRESH_S
        if not stale and kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            now = self._clock()
            fresh = self._fetched_at is not None and now - self._fetched_at < REFRESH_S
            if kid in self._keys and fresh:
                return self._keys[kid]
            if self._fetched_at is None or now - self._fetched_at >= MIN_REFETCH_S:
                await self._fetch()
        if not self._known:
            raise _unavailable()
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        self.fetches += 1
        self._fetched_at = self._clock()
        headers = {"accept": "application/json"}
        token = self._bearer() if self._bearer else None
        if token:
            headers["authorization"] = f"Bearer {token}"
        try:
            resp = await self._client.get(self.url, headers=headers, timeout=FETCH_TIMEOUT_S)
            if resp.status_code != 200:
                raise ValueError(f"HTTP {resp.status_code}")
            if len(resp.content) > MAX_JWKS_BYTES:
                raise ValueError("JWKS too large")
            keys = self._parse(resp.json())
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("jwks fetch from %s failed: %s", self.url, exc)
            if not self._known:
                raise _unavailable() from exc
            return
        self._keys, self._known = keys, True

    @staticmethod
    def _parse(doc: object) -> dict[str, tuple[jwt.PyJWK, str]]:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("not a JWK set")
        keys: dict[str, tuple[jwt.PyJWK, str]] = {}
        for item in doc["keys"]:
            if not isinstance(item, dict) or not isinstance(item.get("kid"), str):
                continue
            alg = item.get("alg") or _DEFAULT_ALG.get((item.get("kty"), item.get("crv")))
            if alg not in ALLOWED_ALGORITHMS or item.get("use", "sig") != "sig":
                continue
            try:
                keys[item["kid"]] = (jwt.PyJWK(item, algorithm=alg), alg)
            except jwt.PyJWTError:
                continue
        return keys
