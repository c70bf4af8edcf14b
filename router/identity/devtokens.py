"""Router-issued tokens: EdDSA JWTs signed with the router's own key (SPEC.md §1).

For laptops, CI and the embedded default, where there is no cluster to issue
service-account tokens. The key is an Ed25519 PEM file, created (mode 0600) if missing.
Tokens carry ``sub`` = ``namespace/name`` of the sandbox; the ``kid`` is the key's RFC 7638
thumbprint, so a router picks its own key by ``kid`` and never by anything else the token says.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import secrets
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ISSUER = "kars-router"
ALGORITHM = "EdDSA"
DEFAULT_TTL = dt.timedelta(hours=1)
DEV_TTL = dt.timedelta(hours=24)  # the token `kars router` prints at start
MAX_TTL = dt.timedelta(days=366)  # `kars token issue --ttl`: a year, for CI secrets; no more


class KeyFileError(Exception):
    """The key file exists but does not hold an Ed25519 private key."""


def load_or_create_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 key at ``path``; a new one is written there (0600) when the file is absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot create the key: {exc.strerror or exc}") from exc
        return key
    except OSError as exc:  # a directory, no permission, ...
        raise KeyFileError(f"{path}: cannot read the key: {exc.strerror or exc}") from exc
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key") from exc
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return loaded


def _b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_jwk(key: ed25519.Ed25519PublicKey) -> dict[str, str]:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64u(raw)}


def key_id(key: ed25519.Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256) of the public key."""
    members = public_jwk(key)
    canonical = json.dumps({k: members[k] for k in ("crv", "kty", "x")}, separators=(",", ":"))
    return _b64u(hashlib.sha256(canonical.encode()).digest())


def issue(
    key: ed25519.Ed25519PrivateKey,
    sandbox: str,
    *,
    audience: str,
    ttl: dt.timedelta = DEFAULT_TTL,
    now: dt.datetime | None = None,
) -> str:
    """A bearer token for ``sandbox`` (``namespace/name``)."""
    now = now or dt.datetime.now(dt.UTC)
    claims = {
        "iss": ISSUER,
        "aud": audience,
        "sub": sandbox,
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()),
        "exp": int((now + ttl).timestamp()),
        "jti": secrets.token_urlsafe(12),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": key_id(key.public_key())})


def parse_ttl(text: str) -> dt.timedelta:
    """``90s``, ``15m``, ``1h``, ``7d`` -> timedelta."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not (text[:-1].isascii() and text[:-1].isdigit()):
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 1h or 7d")
    seconds = int(text[:-1]) * units[text[-1]]
    if not 0 < seconds <= MAX_TTL.total_seconds():
        raise ValueError(f"{text!r}: a token lives more than 0s and at most {MAX_TTL.days}d")
    return dt.timedelta(seconds=seconds)
