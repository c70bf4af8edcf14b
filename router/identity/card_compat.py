"""The v0.3 fields a2a-sdk's stock card route adds to a signed v1.0 Agent Card, taken off again.

a2a-sdk (``a2a.server.request_handlers.response_helpers.agent_card_to_dict``) serves
``MessageToDict(card)`` merged with ``to_compat_agent_card(card)``: every key of the v0.3 form that
the v1.0 form lacks is added, at any depth (objects by key, lists by index). The signature covers
only the v1.0 form. The added fields are:

- top level: ``url``, ``preferredTransport``, ``protocolVersion``, ``additionalInterfaces``,
  ``supportsAuthenticatedExtendedCard`` (only when true) and ``security``;
- ``securitySchemes.<name>``: ``type`` and the scheme's own fields, flattened out of its
  ``apiKeySecurityScheme`` / ``httpAuthSecurityScheme`` / ... object;
- ``capabilities.extensions[i].required`` (``false`` when the v1.0 form leaves it out);
- ``skills[i].security``;
- empty values (``tags: []``, ``url: ""``, ...), which the canonical form without empties covers.

``without_derived_fields`` removes them only when every one is exactly what the signed fields imply,
so an unsigned field can never say something the signature does not.
"""

from __future__ import annotations

import re
from typing import Any

_TOP_LEVEL_KEYS = (
    "url",
    "preferredTransport",
    "protocolVersion",
    "additionalInterfaces",
    "supportsAuthenticatedExtendedCard",
    "security",
)
_LEGACY_VERSION_RE = re.compile(r"^0\.(\d+)")
DEFAULT_LEGACY_VERSION = "0.3"  # a2a-sdk's constants.PROTOCOL_VERSION_0_3

# v1.0 scheme object -> (v0.3 ``type``, fields always set, fields set when not empty); a2a-sdk
# ``to_compat_security_scheme``. The v0.3 name of ``location`` is ``in``.
_SCHEMES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "apiKeySecurityScheme": ("apiKey", ("location", "name"), ("description",)),
    "httpAuthSecurityScheme": ("http", ("scheme",), ("bearerFormat", "description")),
    "oauth2SecurityScheme": ("oauth2", (), ("oauth2MetadataUrl", "description")),
    "openIdConnectSecurityScheme": ("openIdConnect", ("openIdConnectUrl",), ("description",)),
    "mtlsSecurityScheme": ("mutualTLS", (), ("description",)),
}
# OAuth flow -> its URL fields always set (a2a-sdk ``to_compat_oauth_flows``; deviceCode has no v0.3 form).
_FLOWS: dict[str, tuple[str, ...]] = {
    "authorizationCode": ("authorizationUrl", "tokenUrl"),
    "clientCredentials": ("tokenUrl",),
    "implicit": ("authorizationUrl",),
    "password": ("tokenUrl",),
}


class _Mismatch(Exception):
    """A field in a derived place holds something the signed fields do not imply."""


def _is_legacy(interface: Any) -> bool:
    """a2a-sdk's test for a v0.3 interface: no protocol version, or one in [0.3, 1.0)."""
    if not isinstance(interface, dict):
        return False
    version = interface.get("protocolVersion")
    if not version:
        return True
    return isinstance(version, str) and (m := _LEGACY_VERSION_RE.match(version)) is not None and int(m.group(1)) >= 3


def _requirements(value: Any) -> list[dict[str, Any]]:
    """v1.0 ``securityRequirements`` in the v0.3 form: ``[{scheme: [scope, ...]}]``."""
    if not isinstance(value, list):
        return []
    out = []
    for requirement in value:
        schemes = requirement.get("schemes", {}) if isinstance(requirement, dict) else {}
        out.append({k: v.get("list", []) if isinstance(v, dict) else v for k, v in schemes.items()})
    return out


def _compat_scheme(scheme: dict[str, Any]) -> dict[str, Any]:
    for wrapper, (kind, always, when_set) in _SCHEMES.items():
        fields = scheme.get(wrapper)
        if not isinstance(fields, dict):
            continue
        out: dict[str, Any] = {"type": kind}
        out.update({("in" if f == "location" else f): fields.get(f, "") for f in always})
        out.update({f: fields[f] for f in when_set if fields.get(f)})
        if wrapper == "oauth2SecurityScheme":
            out["flows"] = _compat_flows(fields.get("flows"))
        return out
    raise _Mismatch("a security scheme of no known type")


def _compat_flows(flows: Any) -> dict[str, Any]:
    out = {}
    for name, urls in _FLOWS.items():
        flow = flows.get(name) if isinstance(flows, dict) else None
        if isinstance(flow, dict):
            compat = {u: flow.get(u, "") for u in urls}
            compat["scopes"] = flow.get("scopes", {})
            if flow.get("refreshUrl"):
                compat["refreshUrl"] = flow["refreshUrl"]
            out[name] = compat
            break  # one flow (a oneof in v1.0)
    return out


def _without_extra(obj: dict[str, Any], keep: frozenset[str], expected: dict[str, Any]) -> dict[str, Any]:
    """``obj`` without the keys outside ``keep``, each of which must equal ``expected``'s."""
    extra = {k: v for k, v in obj.items() if k not in keep}
    if any(k not in expected or expected[k] != v for k, v in extra.items()):
        raise _Mismatch(f"unsigned fields {sorted(extra)}")
    return {k: v for k, v in obj.items() if k in keep}


def _strip_nested(card: dict[str, Any]) -> dict[str, Any]:
    out = dict(card)
    schemes = card.get("securitySchemes")
    if isinstance(schemes, dict):
        out["securitySchemes"] = {
            name: _without_extra(s, frozenset(_SCHEMES), _compat_scheme(s)) if isinstance(s, dict) else s
            for name, s in schemes.items()
        }
    capabilities = card.get("capabilities")
    if isinstance(capabilities, dict) and isinstance(capabilities.get("extensions"), list):
        # v1.0 leaves out ``required: false``; v0.3 always says it.
        extensions = [
            {k: v for k, v in e.items() if not (k == "required" and v is False)} if isinstance(e, dict) else e
            for e in capabilities["extensions"]
        ]
        out["capabilities"] = {**capabilities, "extensions": extensions}
    skills = card.get("skills")
    if isinstance(skills, list):
        out["skills"] = [_strip_skill(s) if isinstance(s, dict) else s for s in skills]
    return out


def _strip_skill(skill: dict[str, Any]) -> dict[str, Any]:
    if "security" not in skill:
        return skill
    if skill["security"] != _requirements(skill.get("securityRequirements")):
        raise _Mismatch("skills[].security")
    return {k: v for k, v in skill.items() if k != "security"}


def without_derived_fields(card: dict[str, Any]) -> dict[str, Any] | None:
    """The card without a2a-sdk's v0.3 compatibility fields, if each equals what the signed fields
    imply; None when there are none or one does not match."""
    present = [k for k in _TOP_LEVEL_KEYS if k in card]
    interfaces = card.get("supportedInterfaces")
    if not present or not isinstance(interfaces, list):
        return None
    legacy = [i for i in interfaces if _is_legacy(i)]
    if not legacy:
        return None  # a2a-sdk adds nothing to a card with no v0.3 interface
    primary = legacy[0]
    capabilities = card.get("capabilities")
    expected = {
        "url": primary.get("url", ""),
        "preferredTransport": primary.get("protocolBinding", ""),
        "protocolVersion": primary.get("protocolVersion") or DEFAULT_LEGACY_VERSION,
        "additionalInterfaces": [
            {"url": i.get("url", ""), "transport": i.get("protocolBinding", "")} for i in legacy[1:]
        ],
        "supportsAuthenticatedExtendedCard": capabilities.get("extendedAgentCard")
        if isinstance(capabilities, dict)
        else None,
        "security": _requirements(card.get("securityRequirements")),
    }
    if any(card[key] != expected[key] for key in present):
        return None
    try:
        return _strip_nested({k: v for k, v in card.items() if k not in _TOP_LEVEL_KEYS})
    except _Mismatch:
        return None
