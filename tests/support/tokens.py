"""Forging tokens on purpose: ``alg: none`` and HS256-keyed-with-the-public-key. Test code only."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims_for(sandbox: str, *, audience: str = "kars-router", lifetime_s: int = 600) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "kars-router", "aud": audience, "sub": sandbox, "iat": now, "nbf": now, "exp": now + lifetime_s}


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token with ``alg: none`` and an empty signature."""
    h = b64u(json.dumps({**header, "alg": "none"}).encode())
    c = b64u(json.dumps(claims).encode())
    return f"{h}.{c}."


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token keyed with ``secret`` (the classic attack: the verifier's public key)."""
    h = b64u(json.dumps({**header, "alg": "HS256", "typ": "JWT"}).encode())
    c = b64u(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{h}.{c}".encode(), hashlib.sha256).digest()
    return f"{h}.{c}.{b64u(sig)}"
