"""Verifying bearer tokens into principals.

The signing key is chosen by the token's ``kid`` from keys this router trusts: its own
router-issued key, or the cluster's JWKS. The algorithm comes from the key, never from the
token, so ``alg: none`` and HS256-signed-with-the-public-key forgeries fail. Verified tokens are
cached until their ``exp``; failures are never cached and never fall back to a weaker mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from router import errors
from router.identity import devtokens, jwks
from router.identity.principal import Principal

MAX_CACHED_TOKENS = 10_000
MAX_TOKEN_BYTES = 16 * 1024
_REQUIRED = ["exp", "iat", "aud", "iss", "sub"]
CLOCK_SKEW_S = 30  # how far the issuer's clock may be from this router's (exp, iat and nbf)


def looks_like_jwt(value: str) -> bool:
    """A compact JWS has three base64url segments; API keys and opaque tokens do not."""
    return value.count(".") == 2 and value[:2] == "ey"


class TokenVerifier:
    def __init__(
        self,
        *,
        audience: str,
        dev_key: ed25519.Ed25519PrivateKey | None,
        jwks_cache: jwks.JwksCache | None,
        issuer: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.issuer = issuer
        self._jwks = jwks_cache
        self._clock = clock
        self._dev_kid: str | None = None
        self._dev_public: ed25519.Ed25519PublicKey | None = None
        if dev_key is not None:
            self._dev_public = dev_key.public_key()
            self._dev_kid = devtokens.key_id(self._dev_public)
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def verify(self, token: str) -> Principal:
        hit = self._cache.get(token)
        now = self._clock()
        if hit is not None:
            if hit[1] > now:
                return hit[0]
            del self._cache[token]
        if len(token) > MAX_TOKEN_BYTES:
            raise errors.Unauthenticated("bearer token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise errors.Unauthenticated("malformed bearer token") from exc
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise errors.Unauthenticated("bearer token has no key id (kid)")

        if kid == self._dev_kid:
            principal, exp = self._verify_dev(token)
        elif self._jwks is not None:
            principal, exp = await self._verify_service_account(token, kid)
        else:
            raise errors.Unauthenticated("bearer token signed by an unknown key")

        if len(self._cache) >= MAX_CACHED_TOKENS:
            # Drop the oldest entry (dicts keep insertion order).
            self._cache.pop(next(iter(self._cache)))
        self._cache[token] = (principal, exp)
        return principal

    def _decode(self, token: str, key: Any, algorithm: str, issuer: str | None) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=issuer,
                leeway=CLOCK_SKEW_S,
                options={"require": _REQUIRED if issuer else [c for c in _REQUIRED if c != "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise errors.Unauthenticated("bearer token expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise errors.Unauthenticated(f"bearer token audience is not {self.audience!r}") from exc
        except jwt.PyJWTError as exc:
            raise errors.Unauthenticated(f"bearer token rejected: {exc}") from exc

    def _verify_dev(self, token: str) -> tuple[Principal, float]:
        claims = self._decode(token, self._dev_public, devtokens.ALGORITHM, devtokens.ISSUER)
        sub = claims["sub"]
        if not isinstance(sub, str) or sub.count("/") != 1:
            raise errors.Unauthenticated("router token subject is not namespace/name")
        return Principal("sandbox", sub, "router-token"), float(claims["exp"])

    async def _verify_service_account(self, token: str, kid: str) -> tuple[Principal, float]:
        assert self._jwks is not None
        found = await self._jwks.key(kid)
        if found is None:
            raise errors.Unauthenticated("bearer token signed by an unknown key")
        key, alg = found
        claims = self._decode(token, key, alg, self.issuer)
        k8s = claims.get("kubernetes.io")
        namespace = k8s.get("namespace") if isinstance(k8s, dict) else None
        sa = k8s.get("serviceaccount") if isinstance(k8s, dict) else None
        name = sa.get("name") if isinstance(sa, dict) else None
        if not isinstance(namespace, str) or not isinstance(name, str) or not namespace or not name:
            raise errors.Unauthenticated("service-account token lacks kubernetes.io namespace/serviceaccount")
        return Principal("sandbox", f"{namespace}/{name}", "service-account"), float(claims["exp"])
