"""Identity over real HTTP: every mode accepted, every forged or stale credential refused with 401."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from router import _asgi
from router.identity import devtokens, verifier
from tests.fakes import oidc
from tests.support import servers, tokens


@pytest.fixture
def fake_oidc() -> Iterator[tuple[oidc.FakeOidc, servers.ServerThread]]:
    fake = oidc.FakeOidc()
    with servers.serve(fake.app) as srv:
        yield fake, srv


def whoami(srv: servers.ServerThread, **headers: str) -> httpx.Response:
    return httpx.get(f"{srv.url}/v1/whoami", headers=headers, timeout=5)


def dev_token(srv: Any, sandbox: str = "default/dev", **kw: Any) -> str:
    return devtokens.issue(srv.app.state.kars.dev_key, sandbox, audience="kars-router", **kw)


def assert_401(resp: httpx.Response, code: str = "invalid_credentials") -> None:
    assert resp.status_code == 401, resp.text
    err = resp.json()["error"]
    assert err["code"] == code
    assert err["type"] == "authentication_error"
    # RFC 6750 §3: the challenge, with invalid_token only when a token was presented.
    invalid = ', error="invalid_token"' if code == "invalid_credentials" else ""
    assert resp.headers["www-authenticate"] == f'Bearer realm="kars"{invalid}'


# -- router-issued tokens ------------------------------------------------------------------


def test_router_token_in_authorization_or_api_key(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    token = dev_token(srv, "team-a/agent-1")
    for headers in ({"Authorization": f"Bearer {token}"}, {"api-key": token}):
        resp = whoami(srv, **headers)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"principal": "team-a/agent-1", "kind": "sandbox", "mode": "router-token"}


def test_no_credentials_is_401_missing(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    assert_401(whoami(srv), "missing_credentials")


def test_opaque_api_key_is_not_a_credential_of_ours(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    assert_401(whoami(srv, Authorization="Bearer sk-not-a-jwt"))
    assert_401(whoami(srv, **{"api-key": "0123456789abcdef"}))


def test_expired_router_token(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    token = dev_token(srv, now=past, ttl=dt.timedelta(hours=1))
    resp = whoami(srv, Authorization=f"Bearer {token}")
    assert_401(resp)
    assert "expired" in resp.json()["error"]["message"]


def test_wrong_audience_router_token(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    token = devtokens.issue(srv.app.state.kars.dev_key, "default/dev", audience="someone-else")
    resp = whoami(srv, Authorization=f"Bearer {token}")
    assert_401(resp)
    assert "audience" in resp.json()["error"]["message"]


def test_token_signed_by_another_key_with_our_kid(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    ours = srv.app.state.kars.dev_key
    attacker = ed25519.Ed25519PrivateKey.generate()
    kid = devtokens.key_id(ours.public_key())
    token = jwt.encode(tokens.claims_for("default/dev"), attacker, algorithm="EdDSA", headers={"kid": kid})
    assert_401(whoami(srv, Authorization=f"Bearer {token}"))
    # And a token from another router (its own kid) is simply an unknown key.
    foreign = devtokens.issue(attacker, "default/dev", audience="kars-router")
    assert_401(whoami(srv, Authorization=f"Bearer {foreign}"))


def test_alg_none_is_refused(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    kid = devtokens.key_id(srv.app.state.kars.dev_key.public_key())
    token = tokens.unsigned({"kid": kid, "typ": "JWT"}, tokens.claims_for("default/dev"))
    assert_401(whoami(srv, Authorization=f"Bearer {token}"))


def test_hs256_keyed_with_the_public_key_is_refused(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    public = srv.app.state.kars.dev_key.public_key()
    kid = devtokens.key_id(public)
    claims = tokens.claims_for("default/dev")
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for secret in (pem, raw):
        assert_401(whoami(srv, Authorization=f"Bearer {tokens.hs256({'kid': kid}, claims, secret)}"))


def test_tampered_claims_are_refused(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    head, _, sig = dev_token(srv, "team-a/agent-1").split(".")
    forged_claims = tokens.b64u(json.dumps(tokens.claims_for("team-b/admin")).encode())
    assert_401(whoami(srv, Authorization=f"Bearer {head}.{forged_claims}.{sig}"))


def test_malformed_jwt_is_refused(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    assert_401(whoami(srv, Authorization="Bearer eyJhbGciOi.not-base64!.x"))


# -- service-account tokens via JWKS --------------------------------------------------------


def sa_settings(srv: servers.ServerThread) -> dict[str, Any]:
    return {"identity": {"jwksUrl": f"{srv.url}/openid/v1/jwks", "issuer": oidc.ISSUER}}


def test_service_account_token_accepted(router_server: Callable[..., Any], fake_oidc: Any) -> None:
    fake, idp = fake_oidc
    srv = router_server(**sa_settings(idp))
    resp = whoami(srv, Authorization=f"Bearer {fake.token('team-a', 'agent-7')}")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"principal": "team-a/agent-7", "kind": "sandbox", "mode": "service-account"}


def test_service_account_tokens_rejected(router_server: Callable[..., Any], fake_oidc: Any) -> None:
    fake, idp = fake_oidc
    srv = router_server(**sa_settings(idp))
    bad = {
        "expired": fake.token(now=time.time() - 7200, lifetime_s=3600),
        "wrong audience": fake.token(audience="vault"),
        "wrong issuer": fake.token(issuer="https://evil.example"),
        "wrong key, known kid": fake.token(key=oidc.SigningKey("k8s-key-1", oidc.new_key("x").private)),
    }
    public_pem = (
        fake.keys[0]
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    claims = jwt.decode(fake.token(), options={"verify_signature": False})
    bad["alg none"] = tokens.unsigned({"kid": "k8s-key-1"}, claims)
    bad["hs256 with public key"] = tokens.hs256({"kid": "k8s-key-1"}, claims, public_pem)
    for label, token in bad.items():
        resp = whoami(srv, Authorization=f"Bearer {token}")
        assert resp.status_code == 401, f"{label}: {resp.status_code} {resp.text}"


def test_service_account_token_from_a_clock_slightly_ahead_is_accepted(
    router_server: Callable[..., Any], fake_oidc: Any
) -> None:
    """Issued 'in the future' by a few seconds of clock drift: accepted; by minutes: refused."""
    fake, idp = fake_oidc
    srv = router_server(**sa_settings(idp))
    ahead = fake.token("team-a", "agent-7", now=time.time() + verifier.CLOCK_SKEW_S / 3)
    assert whoami(srv, Authorization=f"Bearer {ahead}").status_code == 200
    far_ahead = fake.token("team-a", "agent-7", now=time.time() + verifier.CLOCK_SKEW_S * 4)
    assert_401(whoami(srv, Authorization=f"Bearer {far_ahead}"))
    just_expired = fake.token("team-a", "agent-7", now=time.time() - 3600 - verifier.CLOCK_SKEW_S / 3)
    assert whoami(srv, Authorization=f"Bearer {just_expired}").status_code == 200


def test_unknown_kid_refetches_once_then_is_rate_limited(router_server: Callable[..., Any], fake_oidc: Any) -> None:
    fake, idp = fake_oidc
    srv = router_server(**sa_settings(idp))
    assert whoami(srv, Authorization=f"Bearer {fake.token()}").status_code == 200
    assert fake.fetches == 1

    # The cluster rotates in a new key: the first token with the new kid triggers a refetch...
    rotated = oidc.new_key("k8s-key-2")
    fake.keys.append(rotated)
    srv.app.state.kars.verifier._jwks._fetched_at -= 60  # the minimum refetch interval has passed
    assert whoami(srv, Authorization=f"Bearer {fake.token(key=rotated)}").status_code == 200
    assert fake.fetches == 2

    # ...but a stream of tokens with made-up kids does not hammer the JWKS endpoint.
    for i in range(5):
        bogus = fake.token(key=oidc.SigningKey(f"made-up-{i}", rotated.private))
        assert_401(whoami(srv, Authorization=f"Bearer {bogus}"))
    assert fake.fetches == 2


def test_verified_token_is_cached(router_server: Callable[..., Any], fake_oidc: Any) -> None:
    fake, idp = fake_oidc
    srv = router_server(**sa_settings(idp))
    token = fake.token()
    for _ in range(3):
        assert whoami(srv, Authorization=f"Bearer {token}").status_code == 200
    assert fake.fetches == 1
    assert token in srv.app.state.kars.verifier._cache


def test_jwks_down_with_no_keys_is_503_not_a_pass(router_server: Callable[..., Any], dead_port: int) -> None:
    srv = router_server(identity={"jwksUrl": f"http://127.0.0.1:{dead_port}/openid/v1/jwks"})
    fake = oidc.FakeOidc()
    for _ in range(3):  # the first fetch fails; the next ones are not tried yet (MIN_REFETCH_S)
        resp = whoami(srv, Authorization=f"Bearer {fake.token()}")
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "identity_unavailable"


def test_jwks_never_fetched_is_503_until_it_answers(router_server: Callable[..., Any], fake_oidc: Any) -> None:
    """A good token is never told it is bad (401) because the key set could not be fetched."""
    fake, idp = fake_oidc
    fake.down = True
    srv = router_server(**sa_settings(idp))
    token = fake.token()
    for _ in range(3):
        resp = whoami(srv, Authorization=f"Bearer {token}")
        assert (resp.status_code, resp.json()["error"]["code"]) == (503, "identity_unavailable")
    assert fake.fetches == 1  # and the endpoint is not hammered meanwhile
    fake.down = False
    srv.app.state.kars.verifier._jwks._fetched_at -= 60  # the minimum refetch interval has passed
    assert whoami(srv, Authorization=f"Bearer {token}").status_code == 200
    fake.down = True  # a key set already known stays in use; a kid it lacks is a 401
    srv.app.state.kars.verifier._jwks._fetched_at -= 60
    assert_401(whoami(srv, Authorization=f"Bearer {fake.token(key=oidc.new_key('made-up'))}"))


# -- sidecar and trusted proxy --------------------------------------------------------------


def test_sidecar_mode_attributes_loopback_callers(router_server: Callable[..., Any]) -> None:
    srv = router_server(server={"sandbox": "team-a/solo"})
    resp = whoami(srv, Authorization="Bearer sk-whatever-the-sdk-sends")
    assert resp.status_code == 200
    assert resp.json() == {"principal": "team-a/solo", "kind": "sandbox", "mode": "sidecar"}


def echo_headers(request: Request) -> JSONResponse:
    return JSONResponse({"headers": dict(request.headers), "principal": request.scope["state"]["kars.principal"].id})


def test_subject_header_from_untrusted_peer_is_stripped(router_server: Callable[..., Any]) -> None:
    srv = router_server(identity={"trustedProxies": ["10.0.0.0/8"]})
    srv.app.router.routes.insert(0, Route("/v1/echo", echo_headers))
    # Alone it proves nothing: no credentials.
    assert_401(whoami(srv, **{"X-A2A-Agent-Subject": "team-b/boss"}), "missing_credentials")
    # With a real token, the forged subject neither wins nor reaches any later layer.
    token = dev_token(srv, "team-a/agent-1")
    resp = httpx.get(
        f"{srv.url}/v1/echo", headers={"Authorization": f"Bearer {token}", "X-A2A-Agent-Subject": "team-b/boss"}
    )
    assert resp.status_code == 200
    assert resp.json()["principal"] == "team-a/agent-1"
    assert "x-a2a-agent-subject" not in resp.json()["headers"]


def test_subject_header_from_trusted_proxy_is_the_principal(router_server: Callable[..., Any]) -> None:
    srv = router_server(identity={"trustedProxies": ["127.0.0.1/32"]})
    srv.app.router.routes.insert(0, Route("/v1/echo", echo_headers))
    resp = httpx.get(f"{srv.url}/v1/echo", headers={"X-A2A-Agent-Subject": "partner/agent-9"})
    assert resp.status_code == 200
    assert resp.json()["principal"] == "partner/agent-9"
    assert "x-a2a-agent-subject" not in resp.json()["headers"]
    assert whoami(srv, **{"X-A2A-Agent-Subject": "partner/agent-9"}).json()["mode"] == "trusted-proxy"


def test_bad_token_never_falls_back_to_trusted_proxy(router_server: Callable[..., Any]) -> None:
    srv = router_server(identity={"trustedProxies": ["127.0.0.1/32"]})
    expired = dev_token(srv, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=3), ttl=dt.timedelta(hours=1))
    assert_401(whoami(srv, Authorization=f"Bearer {expired}", **{"X-A2A-Agent-Subject": "partner/agent-9"}))


def test_identity_rejections_are_counted(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    whoami(srv)
    whoami(srv, Authorization="Bearer sk-x")
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert 'kars_identity_rejections_total{code="missing_credentials"} 1.0' in metrics
    assert 'kars_identity_rejections_total{code="invalid_credentials"} 1.0' in metrics


def test_an_ipv4_peer_on_a_dual_stack_socket_is_an_ipv4_peer() -> None:
    """Served on ``::``, an IPv4 caller's address is ``::ffff:a.b.c.d``: it must still match
    IPv4 trustedProxies CIDRs, and ``::ffff:127.0.0.1`` is loopback (sidecar mode, admin)."""
    assert _asgi.parse_ip("::ffff:10.0.0.1") in ipaddress.ip_network("10.0.0.0/8")
    assert _asgi.is_loopback({"client": ("::ffff:127.0.0.1", 50000)})
    assert not _asgi.is_loopback({"client": ("::ffff:10.0.0.1", 50000)})
    assert _asgi.parse_ip("fd00::1") == ipaddress.ip_address("fd00::1")
