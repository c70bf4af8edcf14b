"""JWS verification for A2A (SPEC.md §5): the trusted store, and signed requests.

Signatures are checked with PyJWT; nothing here parses JOSE by hand beyond a peek at a header or
a claim to learn which key to use. The rules shared with signed Agent Cards (``cards``):

- ``alg`` must be EdDSA or ES256 (never ``none``, never HS*), and equal to the ``alg`` the
  trusted key is registered with: the token never chooses how it is checked.
- The key is the A2AAgent's ``signingKeys`` entry with the token's ``kid`` (the trusted store),
  and a key past its ``notAfter`` no longer verifies anything.
- A ``jku`` is accepted only as an https URL on an allowlisted host; the key still comes from
  the trusted store, never from the URL.

Signed requests: a compact JWS bearer with ``iss`` (the caller's A2AAgent ``ns/name``), ``aud``
(the URL called on this router), ``iat``/``exp`` (``exp`` not before ``iat`` and at most
``MAX_REQUEST_LIFETIME_S`` after it, checked with the agent's ``maxClockSkewSeconds``), ``jti``
(never twice: ``ReplayCache``) and ``body_sha256`` (base64url SHA-256 of the raw body, no padding).
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import datetime as dt
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from router.identity.principal import Principal
from router.policy import model
from router.policy import snapshot as snapshot_mod

ALLOWED_ALGS = frozenset({"EdDSA", "ES256"})
MAX_REQUEST_LIFETIME_S = 300
MAX_REPLAY_ENTRIES = 100_000
_REQUIRED_CLAIMS = ["iss", "aud", "iat", "exp", "jti"]
_KEY_CACHE_MAX = 4096


class JwsError(Exception):
    """A signature or claim that does not hold; ``reason`` is a short stable label for logs and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def b64u_decode(value: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JwsError("malformed", "not valid base64url") from exc


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def body_digest(body: bytes) -> str:
    """``body_sha256`` as a signed request carries it."""
    return b64u(hashlib.sha256(body).digest())


# -- the trusted store ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TrustedKey:
    kid: str
    alg: str
    key: Any  # a cryptography public key
    not_after: dt.datetime | None


def _public_key(spec: model.SigningKey) -> Any:
    if spec.jwk is not None:
        return jwt.PyJWK(dict(spec.jwk), algorithm=spec.alg).key
    raw = b64u_decode(spec.public_key_b64u or "")
    if spec.alg == "EdDSA":
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)


_key_cache: dict[int, tuple[model.A2AAgent, Mapping[str, TrustedKey]]] = {}


def trusted_keys(agent: model.A2AAgent) -> Mapping[str, TrustedKey]:
    """The agent's ``signingKeys`` by ``kid``, parsed once per agent object (policy objects are immutable)."""
    hit = _key_cache.get(id(agent))
    if hit is not None and hit[0] is agent:
        return hit[1]
    keys = {}
    for spec in agent.spec.signing_keys:
        not_after = model.parse_timestamp(spec.not_after) if spec.not_after else None
        keys[spec.kid] = TrustedKey(spec.kid, spec.alg, _public_key(spec), not_after)
    if len(_key_cache) >= _KEY_CACHE_MAX:
        _key_cache.clear()
    _key_cache[id(agent)] = (agent, keys)
    return keys


def choose_key(keys: Mapping[str, TrustedKey], header: Mapping[str, Any], now: dt.datetime) -> TrustedKey:
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:
        raise JwsError("alg_not_allowed", f"alg {alg!r} is not allowed (EdDSA or ES256 only)")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwsError("no_kid", "the JWS header has no kid")
    key = keys.get(kid)
    if key is None:
        raise JwsError("unknown_kid", f"kid {kid!r} is not one of the agent's signingKeys")
    if key.alg != alg:
        raise JwsError("alg_mismatch", f"kid {kid!r} is registered for {key.alg}, the JWS says {alg}")
    if key.not_after is not None and now >= key.not_after:
        raise JwsError("key_expired", f"key {kid!r} expired at {key.not_after.isoformat()}")
    return key


def check_jku(header: Mapping[str, Any], jku_hosts: frozenset[str]) -> None:
    jku = header.get("jku")
    if jku is None:
        return
    parts = urlsplit(jku) if isinstance(jku, str) else None
    if parts is None or parts.scheme != "https" or (parts.hostname or "").lower() not in jku_hosts:
        raise JwsError("jku_not_allowed", f"jku {jku!r} is not an https URL on an allowlisted host")


# -- signed requests --------------------------------------------------------------------------


class ReplayCache:
    """``(iss, jti)`` pairs seen, each kept until its token could no longer be accepted anyway.

    Bounded in time (an entry lives until ``exp`` + skew) and in size (``MAX_REPLAY_ENTRIES``):
    when full of live entries it refuses new tokens rather than forget one that could be replayed.
    """

    def __init__(self, max_entries: int = MAX_REPLAY_ENTRIES) -> None:
        self._max = max_entries
        self._seen: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: tuple[str, str], forget_at: float, now: float) -> None:
        seen = self._seen
        while seen:  # drop expired entries from the oldest end
            oldest = next(iter(seen.items()))
            if oldest[1] > now:
                break
            seen.popitem(last=False)
        if key in seen:
            raise JwsError("replayed", "this jti was used before")
        if len(seen) >= self._max:
            for k in [k for k, t in seen.items() if t <= now]:
                del seen[k]
            if len(seen) >= self._max:
                raise JwsError("replay_cache_full", "too many signed requests in flight; retry later")
        seen[key] = forget_at


class Verified(NamedTuple):
    principal: Principal
    jti: tuple[str, str]  # (iss, jti): seen once, here and (with a shared store) on every replica
    forget_at: float  # when the token could no longer be accepted anyway


def verify_request(
    token: str,
    *,
    body: bytes,
    audience: str | list[str],
    snapshot: snapshot_mod.Snapshot,
    replay: ReplayCache,
    jku_hosts: frozenset[str] = frozenset(),
    now: float | None = None,
) -> Verified:
    """The remote agent a signed request comes from, or ``JwsError`` saying why not."""
    now = time.time() if now is None else now
    try:
        header = jwt.get_unverified_header(token)
        # A peek at iss to find the key (an unverified jwt.decode costs ~30x more); verified below.
        unverified = orjson.loads(jwt.utils.base64url_decode(token.split(".")[1]))
    except (jwt.PyJWTError, ValueError, IndexError) as exc:
        raise JwsError("malformed", "the bearer is not a compact JWS") from exc
    iss = unverified.get("iss") if isinstance(unverified, dict) else None
    if not isinstance(iss, str):
        raise JwsError("unknown_issuer", "the signed request has no iss")
    namespace, _, name = iss.partition("/")
    agent = snapshot.a2a_agent(namespace, name) if namespace and name else None
    if agent is None:
        raise JwsError("unknown_issuer", f"iss {iss!r} is not an A2AAgent")
    key = choose_key(trusted_keys(agent), header, dt.datetime.fromtimestamp(now, dt.UTC))
    check_jku(header, jku_hosts)
    skew = agent.spec.trust.max_clock_skew_seconds
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[key.alg],
            audience=audience,
            issuer=iss,
            leeway=skew,
            options={"require": _REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError as exc:
        raise JwsError("expired", "the signed request has expired") from exc
    except jwt.InvalidAudienceError as exc:
        raise JwsError("wrong_audience", f"aud is not the URL called ({audience!r})") from exc
    except jwt.ImmatureSignatureError as exc:
        raise JwsError("not_yet_valid", "the signed request is issued in the future") from exc
    except jwt.InvalidSignatureError as exc:
        raise JwsError("bad_signature", "the signature does not verify") from exc
    except jwt.PyJWTError as exc:
        raise JwsError("invalid_claims", str(exc)) from exc
    iat, exp, jti = claims["iat"], claims["exp"], claims["jti"]
    if not isinstance(iat, int | float) or not isinstance(exp, int | float) or exp - iat > MAX_REQUEST_LIFETIME_S:
        raise JwsError("lifetime_too_long", f"exp must be at most {MAX_REQUEST_LIFETIME_S} s after iat")
    if exp < iat:
        raise JwsError("exp_before_iat", "exp is earlier than iat")
    if iat > now + skew:
        raise JwsError("not_yet_valid", "the signed request is issued in the future")
    if not isinstance(jti, str) or not jti:
        raise JwsError("invalid_claims", "jti must be a non-empty string")
    presented = claims.get("body_sha256")
    if not isinstance(presented, str) or not hmac.compare_digest(presented, body_digest(body)):
        raise JwsError("body_mismatch", "body_sha256 does not match the body")
    forget_at = float(exp) + skew
    replay.add((iss, jti), forget_at, now)
    return Verified(Principal("agent", iss, "signed-request"), (iss, jti), forget_at)
