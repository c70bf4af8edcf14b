"""Signed Agent Cards (A2A v1.0 §8.4), verified against the A2AAgent's trusted keys.

``signatures: [{protected, signature, header?}]``: JWS JSON serialization with a detached payload;
the payload is the RFC 8785 (JCS) form of the card without ``signatures``. a2a-sdk's signer drops
every empty string, list and object before canonicalising, so both forms are tried. a2a-sdk's
stock card route also adds v0.3 fields (``url``, ``preferredTransport``, ``securitySchemes.<k>.type``,
...) that the signature does not cover: such a card is accepted only when every one of them is
exactly what the signed fields imply (``card_compat``), so an unsigned field can never point a
v0.3 client elsewhere. ``validFrom``/``validUntil`` in the protected header bound the signature's
lifetime; ``alg``, ``kid``, ``jku`` and key expiry follow the rules of ``router.identity.jws``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import jwt
import rfc8785

from router.identity import card_compat, jws
from router.identity.jws import JwsError, TrustedKey
from router.policy import model

MAX_CARD_SIGNATURES = 8


def _drop_empty(value: Any) -> Any:
    """The value as a2a-sdk canonicalises it: empty strings, lists and objects removed, recursively."""
    if isinstance(value, dict):
        kept = {k: c for k, v in value.items() if (c := _drop_empty(v)) is not None}
        return kept or None
    if isinstance(value, list):
        items = [c for v in value if (c := _drop_empty(v)) is not None]
        return items or None
    if value == "":
        return None
    return value


def _instant(value: Any, name: str) -> dt.datetime:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    if isinstance(value, str):
        try:
            return model.parse_timestamp(value)
        except ValueError:
            pass
    raise JwsError("malformed", f"{name} is neither a NumericDate nor an RFC 3339 timestamp")


def verify_card(
    raw: bytes, keys: Mapping[str, TrustedKey], *, now: dt.datetime, jku_hosts: frozenset[str] = frozenset()
) -> str:
    """Check a signed Agent Card's ``signatures``; the ``kid`` that verified, or ``JwsError``."""
    try:
        card = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JwsError("malformed", "the agent card is not JSON") from exc
    return verify_card_object(card, keys, now=now, jku_hosts=jku_hosts)


def verify_card_object(
    card: Any, keys: Mapping[str, TrustedKey], *, now: dt.datetime, jku_hosts: frozenset[str] = frozenset()
) -> str:
    """``verify_card`` for a card already parsed (the ``result`` of an extended card reply)."""
    if not isinstance(card, dict):
        raise JwsError("malformed", "the agent card is not a JSON object")
    signatures = card.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise JwsError("unsigned", "the agent card has no signatures")
    unsigned = {k: v for k, v in card.items() if k != "signatures"}
    bases = [unsigned]
    derived = card_compat.without_derived_fields(unsigned)
    if derived is not None:
        bases.append(derived)
    try:
        forms: list[bytes] = []
        for base in bases:
            forms.append(rfc8785.dumps(base))
            compact = _drop_empty(base) or {}
            if compact != base:
                forms.append(rfc8785.dumps(compact))
    except (rfc8785.CanonicalizationError, ValueError, TypeError) as exc:
        raise JwsError("malformed", f"the agent card has no canonical form: {exc}") from exc
    failures: list[JwsError] = []
    for entry in signatures[:MAX_CARD_SIGNATURES]:
        try:
            return _verify_card_signature(entry, forms, keys, now, jku_hosts)
        except JwsError as exc:
            failures.append(exc)
    first = failures[0] if failures else JwsError("malformed", "no signature entry could be read")
    raise JwsError(first.reason, "; ".join(f.message for f in failures))


def _verify_card_signature(
    entry: Any, forms: list[bytes], keys: Mapping[str, TrustedKey], now: dt.datetime, jku_hosts: frozenset[str]
) -> str:
    if not isinstance(entry, dict):
        raise JwsError("malformed", "a signature entry is not an object")
    protected, signature = entry.get("protected"), entry.get("signature")
    if not isinstance(protected, str) or not isinstance(signature, str):
        raise JwsError("malformed", "a signature entry lacks protected or signature")
    try:
        header = json.loads(jws.b64u_decode(protected))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JwsError("malformed", "the protected header is not JSON") from exc
    if not isinstance(header, dict):
        raise JwsError("malformed", "the protected header is not a JSON object")
    key = jws.choose_key(keys, header, now)
    jws.check_jku(header, jku_hosts)
    if "validFrom" in header and now < _instant(header["validFrom"], "validFrom"):
        raise JwsError("not_yet_valid", "the card signature is not valid yet (validFrom)")
    if "validUntil" in header and now >= _instant(header["validUntil"], "validUntil"):
        raise JwsError("expired", "the card signature has expired (validUntil)")
    for payload in forms:
        token = f"{protected}.{jws.b64u(payload)}.{signature}"
        try:
            jwt.api_jws.decode(token, key.key, algorithms=[key.alg])
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            raise JwsError("malformed", f"the card signature cannot be checked: {exc}") from exc
        return key.kid
    raise JwsError("bad_signature", f"the signature by {key.kid!r} does not match the card")
