"""Signed Agent Cards and signed A2A requests with real EdDSA and ES256 keys (SPEC.md §5).

Every forgery is refused (a card: 502 ``upstream_error``; a request: 401) and the reason is logged.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import rfc8785
import websockets
from a2a.client import ClientConfig, create_client
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.types import (
    AgentCard,
    AgentExtension,
    APIKeySecurityScheme,
    Message,
    Part,
    Role,
    SecurityRequirement,
    SecurityScheme,
    SendMessageRequest,
    StringList,
)
from a2a.utils.signing import create_agent_card_signer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router.identity import cards, devtokens
from router.identity import jws as jws_mod
from tests.router.test_a2a import a2a_agent_yaml
from tests.support import a2a_agent, servers, tokens, trustgraphs

WAIT_S = 10.0


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclasses.dataclass
class Keys:
    ed: ed25519.Ed25519PrivateKey = dataclasses.field(default_factory=ed25519.Ed25519PrivateKey.generate)
    es: ec.EllipticCurvePrivateKey = dataclasses.field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    @property
    def ed_raw(self) -> bytes:
        return self.ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def signing_keys_yaml(self, not_after: str | None = None) -> str:
        es_point = self.es.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        extra = f", notAfter: '{not_after}'" if not_after else ""
        return (
            "signingKeys:\n"
            f"  - {{kid: ed-1, alg: EdDSA, publicKeyB64u: {b64u(self.ed_raw)}{extra}}}\n"
            f"  - {{kid: es-1, alg: ES256, publicKeyB64u: {b64u(es_point)}}}\n"
        )


@dataclasses.dataclass
class Env:
    router: Any
    agent: a2a_agent.Agent
    keys: Keys

    @property
    def base(self) -> str:
        return f"{self.router.url}/a2a/echo"

    def card_url(self) -> str:
        return self.base + "/.well-known/agent-card.json"

    def sandbox_auth(self) -> dict[str, str]:
        tok = devtokens.issue(self.router.app.state.kars.dev_key, "remote/sandbox", audience="kars-router")
        return {"Authorization": f"Bearer {tok}"}

    def card_dict(self) -> dict[str, Any]:
        return dict(MessageToDict(a2a_agent.make_card(self.base)))


@pytest.fixture
def keys() -> Keys:
    return Keys()


ROUTER_SETTINGS: dict[str, Any] = {
    "a2a": {"jkuAllowedHosts": ["keys.example"]},
    "identity": {"trustedProxies": ["127.0.0.1/32"]},
}


@contextlib.contextmanager
def echo_agent(policy_dir: Path, keys: Keys) -> Iterator[a2a_agent.Agent]:
    """The remote agent ``remote/echo`` served on loopback, ``remote/caller`` that signs, and the edges."""
    agent = a2a_agent.build(a2a_agent.make_card("http://placeholder"))
    with servers.serve(agent.app) as agent_srv:
        docs = [
            a2a_agent_yaml("echo", agent_srv.url + "/", "remote", keys.signing_keys_yaml()),
            a2a_agent_yaml(
                "caller",
                "http://127.0.0.1:9/",
                "remote",
                keys.signing_keys_yaml() + "trust: {requireSignedRequests: true, maxClockSkewSeconds: 30}\n",
            ),
        ]
        (policy_dir / "agents.yaml").write_text("---\n".join(docs))
        graph = trustgraphs.Graph().edge("remote/caller", "remote/echo").edge("remote/sandbox", "remote/echo")
        graph.write(policy_dir)
        yield agent
        agent.executor.gate.set()


@pytest.fixture
def env(router_server: Callable[..., Any], policy_dir: Path, keys: Keys) -> Iterator[Env]:
    with echo_agent(policy_dir, keys) as agent:
        yield Env(router_server(**ROUTER_SETTINGS), agent, keys)


@pytest.fixture
def reasons(caplog: pytest.LogCaptureFixture) -> Generator[Callable[[], list[str]]]:
    caplog.set_level(logging.WARNING, logger="kars.jws")

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "kars.jws"]

    yield logged


def serve_card(env: Env, card: dict[str, Any]) -> bytes:
    body = json.dumps(card, indent=2, ensure_ascii=False).encode()
    env.agent.card_body[0] = body
    return body


# -- signed agent cards -----------------------------------------------------------------------


def test_eddsa_card_signed_per_spec_is_served_byte_for_byte(env: Env) -> None:
    card = env.card_dict()
    card["documentationUrl"] = ""  # an empty value the spec's canonical form keeps
    body = serve_card(env, a2a_agent.sign_card_dict(card, env.keys.ed, alg="EdDSA", kid="ed-1"))
    resp = httpx.get(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S)
    assert resp.status_code == 200, resp.text
    assert resp.content == body


def test_es256_card_signed_by_a2a_sdk_is_accepted(env: Env) -> None:
    signer = create_agent_card_signer(
        signing_key=env.keys.es,  # type: ignore[arg-type]
        protected_header={"alg": "ES256", "kid": "es-1", "typ": "JOSE"},  # type: ignore[typeddict-item]
    )
    signed = dict(MessageToDict(signer(a2a_agent.make_card(env.base))))
    signed["iconUrl"] = ""  # a2a-sdk's canonical form drops it: the second form must match
    raw_signature = jws_mod.b64u_decode(signed["signatures"][0]["signature"])
    assert len(raw_signature) == 64  # ES256 as raw R||S
    body = serve_card(env, signed)
    resp = httpx.get(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S)
    assert resp.status_code == 200, resp.text
    assert resp.content == body


def forged_signature(header: dict[str, Any], signature: bytes = b"") -> dict[str, str]:
    return {"protected": b64u(json.dumps(header).encode()), "signature": b64u(signature)}


def card_forgeries(env: Env) -> dict[str, tuple[dict[str, Any], str]]:
    card = env.card_dict()
    ed, keys = env.keys.ed, env.keys
    tampered = a2a_agent.sign_card_dict(card, ed, alg="EdDSA", kid="ed-1")
    tampered["description"] = "something else"
    past = int(time.time()) - 10
    hs_secret = keys.ed_raw
    hs_card = dict(card)
    hs_header = {"alg": "HS256", "kid": "ed-1"}
    payload = rfc8785.dumps(card)
    hs_token = jwt.api_jws.encode(payload, hs_secret, algorithm="HS256", headers=hs_header)
    head, _, sig = hs_token.split(".")
    hs_card["signatures"] = [{"protected": head, "signature": sig}]
    return {
        "tampered payload": (tampered, "bad_signature"),
        "wrong kid": (a2a_agent.sign_card_dict(card, ed, alg="EdDSA", kid="ed-2"), "unknown_kid"),
        "alg none": ({**card, "signatures": [forged_signature({"alg": "none", "kid": "ed-1"})]}, "alg_not_allowed"),
        "HS256": (hs_card, "alg_not_allowed"),
        "expired": (
            a2a_agent.sign_card_dict(card, ed, alg="EdDSA", kid="ed-1", header={"validUntil": past}),
            "expired",
        ),
        "not yet valid": (
            a2a_agent.sign_card_dict(card, ed, alg="EdDSA", kid="ed-1", header={"validFrom": "2999-01-01T00:00:00Z"}),
            "not_yet_valid",
        ),
        "jku elsewhere": (
            a2a_agent.sign_card_dict(card, ed, alg="EdDSA", kid="ed-1", header={"jku": "https://evil.example/k"}),
            "jku_not_allowed",
        ),
        "jku over http": (
            a2a_agent.sign_card_dict(card, ed, alg="EdDSA", kid="ed-1", header={"jku": "http://keys.example/k"}),
            "jku_not_allowed",
        ),
        "alg of another key": (a2a_agent.sign_card_dict(card, keys.es, alg="ES256", kid="ed-1"), "alg_mismatch"),
        "unsigned": (card, "unsigned"),
    }


def test_forged_cards_are_never_served(env: Env, reasons: Callable[[], list[str]]) -> None:
    for name, (card, reason) in card_forgeries(env).items():
        serve_card(env, card)
        resp = httpx.get(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S)
        assert resp.status_code == 502, (name, resp.text)
        assert resp.json()["error"]["code"] == "upstream_error", name
        assert reason in resp.json()["error"]["message"], name
        assert any(reason in line for line in reasons()), (name, reasons())
        assert env.agent.card_body[0] not in resp.content
        head = httpx.head(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S)
        assert head.status_code == 502, (name, head.headers)  # nor vouched for by a HEAD


def test_jku_on_an_allowlisted_host_is_accepted(env: Env) -> None:
    header = {"jku": "https://keys.example/jwks.json"}
    signed = a2a_agent.sign_card_dict(env.card_dict(), env.keys.ed, alg="EdDSA", kid="ed-1", header=header)
    body = serve_card(env, signed)
    resp = httpx.get(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S)
    assert resp.status_code == 200 and resp.content == body
    head = httpx.head(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(body))


def test_one_good_signature_among_bad_ones_is_enough() -> None:
    keys = Keys()
    agent_keys = {
        "ed-1": jws_mod.TrustedKey("ed-1", "EdDSA", keys.ed.public_key(), None),
    }
    card = {"name": "x", "skills": []}
    signed = a2a_agent.sign_card_dict(card, Keys().ed, alg="EdDSA", kid="ed-1")  # someone else's key
    signed = a2a_agent.sign_card_dict(signed, keys.ed, alg="EdDSA", kid="ed-1")
    assert cards.verify_card(json.dumps(signed).encode(), agent_keys, now=dt.datetime.now(dt.UTC)) == "ed-1"
    expired = dict(agent_keys)
    expired["ed-1"] = dataclasses.replace(agent_keys["ed-1"], not_after=dt.datetime.now(dt.UTC))
    with pytest.raises(jws_mod.JwsError) as info:
        cards.verify_card(json.dumps(signed).encode(), expired, now=dt.datetime.now(dt.UTC))
    assert info.value.reason == "key_expired"


# -- signed requests --------------------------------------------------------------------------


class SignedRequests(httpx.Auth):
    """What a remote agent does: sign every request for the URL it calls, over the body it sends."""

    requires_request_body = True

    def __init__(self, key: Any, alg: str, kid: str, iss: str = "remote/caller") -> None:
        self.key, self.alg, self.kid, self.iss = key, alg, kid, iss

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        url = str(request.url.copy_with(query=None))
        token = sign(self.key, self.alg, self.kid, body=request.content, aud=url, iss=self.iss)
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


def claims(*, body: bytes, aud: str, iss: str = "remote/caller", **over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": iss,
        "aud": aud,
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "body_sha256": b64u(hashlib.sha256(body).digest()),
    }
    base.update(over)
    return base


def sign(
    key: Any, alg: str, kid: str, *, body: bytes, aud: str, header: dict[str, Any] | None = None, **over: Any
) -> str:
    return jwt.encode(claims(body=body, aud=aud, **over), key, algorithm=alg, headers={"kid": kid, **(header or {})})


@pytest.fixture
async def signed_client(env: Env) -> AsyncIterator[Callable[[Any, str, str], httpx.AsyncClient]]:
    made: list[httpx.AsyncClient] = []

    def make(key: Any, alg: str, kid: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(auth=SignedRequests(key, alg, kid), timeout=WAIT_S)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
async def test_signed_requests_from_the_a2a_sdk_client_are_accepted(
    env: Env, signed_client: Callable[..., httpx.AsyncClient], alg: str
) -> None:
    key, kid = (env.keys.ed, "ed-1") if alg == "EdDSA" else (env.keys.es, "es-1")
    http = signed_client(key, alg, kid)
    serve_card(env, a2a_agent.sign_card_dict(env.card_dict(), env.keys.ed, alg="EdDSA", kid="ed-1"))
    client = await create_client(env.base, client_config=ClientConfig(httpx_client=http, streaming=False))
    request = SendMessageRequest(message=Message(role=Role.ROLE_USER, parts=[Part(text="hi")], message_id="m1"))
    events = [e async for e in client.send_message(request)]
    assert [e.message.parts[0].text for e in events] == ["echo: hi"]
    whoami = await http.get(f"{env.router.url}/v1/whoami")
    assert whoami.json() == {"principal": "remote/caller", "kind": "agent", "mode": "signed-request"}


BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"id": "t"}}).encode()


def post(env: Env, token: str, body: bytes = BODY, **headers: str) -> httpx.Response:
    return httpx.post(
        env.base,
        content=body,
        headers={"Authorization": f"Bearer {token}", "content-type": "application/json", **headers},
        timeout=WAIT_S,
    )


def test_request_forgeries_are_401_with_the_reason_logged(env: Env, reasons: Callable[[], list[str]]) -> None:
    ed, aud = env.keys.ed, env.base
    good = sign(ed, "EdDSA", "ed-1", body=BODY, aud=aud)
    head, payload, signature = good.split(".")
    altered = json.loads(jws_mod.b64u_decode(payload))
    altered["jti"] = "another"
    now = int(time.time())
    forgeries = {
        "tampered payload": (f"{head}.{b64u(json.dumps(altered).encode())}.{signature}", BODY, "bad_signature"),
        "wrong kid": (sign(ed, "EdDSA", "ed-9", body=BODY, aud=aud), BODY, "unknown_kid"),
        "alg none": (tokens.unsigned({"kid": "ed-1"}, claims(body=BODY, aud=aud)), BODY, "alg_not_allowed"),
        "HS256": (tokens.hs256({"kid": "ed-1"}, claims(body=BODY, aud=aud), env.keys.ed_raw), BODY, "alg_not_allowed"),
        "expired": (sign(ed, "EdDSA", "ed-1", body=BODY, aud=aud, iat=now - 200, exp=now - 100), BODY, "expired"),
        "body swapped": (sign(ed, "EdDSA", "ed-1", body=BODY, aud=aud), BODY.replace(b'"t"', b'"u"'), "body_mismatch"),
        "other route": (sign(ed, "EdDSA", "ed-1", body=BODY, aud=aud + "x"), BODY, "wrong_audience"),
        "too long lived": (sign(ed, "EdDSA", "ed-1", body=BODY, aud=aud, exp=now + 301), BODY, "lifetime_too_long"),
        "exp before iat": (
            sign(ed, "EdDSA", "ed-1", body=BODY, aud=aud, iat=now + 20, exp=now + 10),
            BODY,
            "exp_before_iat",
        ),
        "from the future": (sign(ed, "EdDSA", "ed-1", body=BODY, aud=aud, iat=now + 120), BODY, "not_yet_valid"),
        "no jti": (sign(ed, "EdDSA", "ed-1", body=BODY, aud=aud, jti=None), BODY, "invalid_claims"),
        "jku elsewhere": (
            sign(ed, "EdDSA", "ed-1", body=BODY, aud=aud, header={"jku": "https://evil.example/k"}),
            BODY,
            "jku_not_allowed",
        ),
    }
    for name, (token, body, reason) in forgeries.items():
        resp = post(env, token, body)
        assert resp.status_code == 401, (name, resp.text)
        assert resp.json()["error"]["code"] == "invalid_credentials", name
        assert any(reason in line for line in reasons()), (name, reason, reasons())
    # The untouched token still works once (nothing above consumed it) ...
    assert post(env, good).status_code == 200
    # ... and never twice.
    replay = post(env, good)
    assert replay.status_code == 401 and any("replayed" in line for line in reasons())


def test_a_signed_request_is_accepted_once_across_replicas(
    router_server: Callable[..., Any], policy_dir: Path, keys: Keys, redis_url: str, reasons: Callable[[], list[str]]
) -> None:
    """Two replicas sharing Redis (as the chart runs them): a jti used on one is refused on the other."""
    with echo_agent(policy_dir, keys):
        shared = {**ROUTER_SETTINGS, "budgets": {"store": "redis", "redisUrl": redis_url}}
        first, second = router_server(**shared), router_server(**shared)
        host = first.url.removeprefix("http://")  # behind one Service, both are called by one URL
        token = sign(keys.ed, "EdDSA", "ed-1", body=BODY, aud=f"{first.url}/a2a/echo")
        headers = {"Authorization": f"Bearer {token}", "content-type": "application/json", "host": host}
        assert httpx.post(f"{first.url}/a2a/echo", content=BODY, headers=headers, timeout=WAIT_S).status_code == 200
        again = httpx.post(f"{second.url}/a2a/echo", content=BODY, headers=headers, timeout=WAIT_S)
        assert (again.status_code, again.json()["error"]["code"]) == (401, "invalid_credentials")
        assert any("replayed" in line and "another replica" in line for line in reasons())
        fresh = sign(keys.ed, "EdDSA", "ed-1", body=BODY, aud=f"{first.url}/a2a/echo")
        headers["Authorization"] = f"Bearer {fresh}"
        assert httpx.post(f"{second.url}/a2a/echo", content=BODY, headers=headers, timeout=WAIT_S).status_code == 200


def test_a_signed_request_fails_closed_when_the_shared_replay_store_is_down(
    router_server: Callable[..., Any], policy_dir: Path, keys: Keys, dead_port: int
) -> None:
    with echo_agent(policy_dir, keys):
        router = router_server(
            **ROUTER_SETTINGS, budgets={"store": "redis", "redisUrl": f"redis://127.0.0.1:{dead_port}/0"}
        )
        token = sign(keys.ed, "EdDSA", "ed-1", body=BODY, aud=f"{router.url}/a2a/echo")
        headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
        resp = httpx.post(f"{router.url}/a2a/echo", content=BODY, headers=headers, timeout=WAIT_S)
        assert (resp.status_code, resp.json()["error"]["code"]) == (503, "identity_unavailable")


async def test_aud_is_one_of_the_public_urls_when_they_are_set(
    router_server: Callable[..., Any], policy_dir: Path, keys: Keys, reasons: Callable[[], list[str]]
) -> None:
    """Behind a gateway that terminates TLS: ``aud`` is the public https URL, and Host plays no part.

    (Without ``a2a.publicUrls`` the request's own scheme and Host are the audience: every other test here.)
    """
    public = "https://agents.example.com/kars"
    with echo_agent(policy_dir, keys):
        router = router_server(**{**ROUTER_SETTINGS, "a2a": {**ROUTER_SETTINGS["a2a"], "publicUrls": [public + "/"]}})
        url = f"{router.url}/a2a/echo"

        def call(aud: str, **headers: str) -> httpx.Response:
            token = sign(keys.ed, "EdDSA", "ed-1", body=BODY, aud=aud)
            headers = {"Authorization": f"Bearer {token}", "content-type": "application/json", **headers}
            return httpx.post(url, content=BODY, headers=headers, timeout=WAIT_S)

        forwarded = {"host": "agents.example.com", "x-forwarded-proto": "https"}
        assert call(f"{public}/a2a/echo", **forwarded).status_code == 200
        assert call(f"{public}/a2a/echo").status_code == 200  # whatever the Host
        for aud, headers in (
            (url, {}),  # the URL as this request's Host names it
            ("http://other-router.example/a2a/echo", {"host": "other-router.example"}),  # a Host set to match
            ("https://agents.example.com/a2a/echo", forwarded),  # the host, without the public prefix
        ):
            resp = call(aud, **headers)
            assert (resp.status_code, resp.json()["error"]["code"]) == (401, "invalid_credentials"), aud
            assert "wrong_audience" in reasons()[-1], aud
        ws = router.url.replace("http://", "ws://") + "/mesh/remote/echo"
        for aud in (f"{public}/mesh/remote/echo", "wss://agents.example.com/kars/mesh/remote/echo"):
            token = sign(keys.ed, "EdDSA", "ed-1", body=b"", aud=aud)
            conn = await websockets.connect(ws, additional_headers={"Authorization": f"Bearer {token}"})
            await conn.close()


def test_agent_requiring_signed_requests_is_refused_via_a_trusted_proxy(env: Env) -> None:
    resp = httpx.post(env.base, content=BODY, headers={"X-A2A-Agent-Subject": "remote/caller"}, timeout=WAIT_S)
    assert resp.status_code == 401 and "signed requests" in resp.json()["error"]["message"]


def test_signed_request_still_needs_a_trust_edge(env: Env, policy_dir: Path) -> None:
    trustgraphs.Graph().edge("remote/sandbox", "remote/echo").write(policy_dir)
    store = env.router.app.state.kars.policy
    env.router.call(store.reload())
    resp = post(env, sign(env.keys.ed, "EdDSA", "ed-1", body=BODY, aud=env.base))
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "trust_edge_missing"


def test_replay_cache_is_bounded_and_forgets_expired_entries() -> None:
    cache = jws_mod.ReplayCache(max_entries=2)
    cache.add(("a", "1"), forget_at=10, now=0)
    cache.add(("a", "2"), forget_at=20, now=0)
    with pytest.raises(jws_mod.JwsError) as info:
        cache.add(("a", "3"), forget_at=30, now=5)
    assert info.value.reason == "replay_cache_full"
    cache.add(("a", "3"), forget_at=30, now=11)  # ("a", "1") has expired: room again
    assert len(cache) == 2
    with pytest.raises(jws_mod.JwsError):
        cache.add(("a", "2"), forget_at=40, now=12)


# -- the hand-over from the identity layer ----------------------------------------------------


def test_a_token_naming_an_agent_is_never_checked_against_another_key(
    env: Env, reasons: Callable[[], list[str]]
) -> None:
    """Signed with the router's own key and a matching kid: still not the agent's key, so 401."""
    dev_key = env.router.app.state.kars.dev_key
    kid = devtokens.key_id(dev_key.public_key())
    token = jwt.encode(
        {**claims(body=BODY, aud=env.base), "sub": "remote/caller"}, dev_key, algorithm="EdDSA", headers={"kid": kid}
    )
    resp = post(env, token)
    assert resp.status_code == 401
    assert any("unknown_kid" in line for line in reasons())


async def test_signed_request_opens_a_mesh_connection(env: Env) -> None:
    url = env.router.url.replace("http://", "ws://") + "/mesh/remote/echo"
    for aud in (url, url.replace("ws://", "http://")):
        token = sign(env.keys.es, "ES256", "es-1", body=b"", aud=aud)
        conn = await websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"})
        await conn.close()
    forged = sign(env.keys.ed, "EdDSA", "es-1", body=b"", aud=url)  # es-1 is an ES256 key
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(url, additional_headers={"Authorization": f"Bearer {forged}"})
    assert info.value.response.status_code == 401
    wrong_route = sign(env.keys.es, "ES256", "es-1", body=b"", aud=url + "x")
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(url, additional_headers={"Authorization": f"Bearer {wrong_route}"})
    assert info.value.response.status_code == 401


# -- cards served by a2a-sdk's stock route (v0.3 fields added outside the signature) -----------


def with_security_and_extension(card: AgentCard) -> AgentCard:
    """a2a-sdk's route adds v0.3 fields inside these (``securitySchemes.apikey.type``, ``required``, ...)."""
    scheme = APIKeySecurityScheme(location="header", name="X-Api-Key")
    card.security_schemes["apikey"].CopyFrom(SecurityScheme(api_key_security_scheme=scheme))
    card.security_requirements.append(SecurityRequirement(schemes={"apikey": StringList(list=[])}))
    card.capabilities.extensions.append(AgentExtension(uri="urn:example:ext", description="an extension"))
    card.skills[0].security_requirements.append(SecurityRequirement(schemes={"apikey": StringList(list=["s"])}))
    return card


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "security-scheme-and-extension"])
def test_card_from_the_stock_a2a_sdk_route_is_accepted(env: Env, policy_dir: Path, nested: bool) -> None:
    card = a2a_agent.make_card("http://placeholder")  # a 1.0 and a 0.3 interface
    if nested:
        card = with_security_and_extension(card)
    agent = a2a_agent.build(card, stock_card_route=True)
    with servers.serve(agent.app) as srv:
        (policy_dir / "stock.yaml").write_text(
            a2a_agent_yaml("stock", srv.url + "/", "remote", env.keys.signing_keys_yaml())
        )
        graph = trustgraphs.Graph().edge("remote/caller", "remote/echo").edge("remote/sandbox", "remote/echo")
        graph.edge("remote/sandbox", "remote/stock").write(policy_dir)
        env.router.call(env.router.app.state.kars.policy.reload())
        for interface in card.supported_interfaces:  # the route serves this object: edit it in place
            interface.url = f"{env.router.url}/a2a/stock"
        signer = create_agent_card_signer(
            signing_key=env.keys.ed,  # type: ignore[arg-type]
            protected_header={"alg": "EdDSA", "kid": "ed-1", "typ": "JOSE"},  # type: ignore[typeddict-item]
        )
        signer(card)
        upstream = httpx.get(srv.url + "/.well-known/agent-card.json", timeout=WAIT_S)
        assert upstream.json()["url"] == f"{env.router.url}/a2a/stock"  # the v0.3 field, not signed
        if nested:  # ... and the ones inside signed objects
            assert upstream.json()["securitySchemes"]["apikey"]["type"] == "apiKey"
            assert upstream.json()["capabilities"]["extensions"][0]["required"] is False
        resp = httpx.get(f"{env.router.url}/a2a/stock/.well-known/agent-card.json", headers=env.sandbox_auth())
        assert resp.status_code == 200, resp.text
        assert resp.content == upstream.content


def test_a_compat_field_that_the_signed_card_does_not_imply_is_refused(
    env: Env, reasons: Callable[[], list[str]]
) -> None:
    card = a2a_agent.make_card(env.base)
    signer = create_agent_card_signer(
        signing_key=env.keys.ed,  # type: ignore[arg-type]
        protected_header={"alg": "EdDSA", "kid": "ed-1", "typ": "JOSE"},  # type: ignore[typeddict-item]
    )
    served = agent_card_to_dict(signer(card))
    assert served["url"] == env.base
    serve_card(env, served)
    assert httpx.get(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S).status_code == 200
    forgeries = (("url", "https://evil.example/a2a"), ("preferredTransport", "GRPC"), ("protocolVersion", "0.9"))
    for key, forged in forgeries:
        serve_card(env, {**served, key: forged})
        resp = httpx.get(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S)
        assert resp.status_code == 502, key
        assert any("bad_signature" in line for line in reasons())


def test_a_nested_compat_field_that_the_signed_card_does_not_imply_is_refused(env: Env) -> None:
    card = with_security_and_extension(a2a_agent.make_card(env.base))
    signer = create_agent_card_signer(
        signing_key=env.keys.ed,  # type: ignore[arg-type]
        protected_header={"alg": "EdDSA", "kid": "ed-1", "typ": "JOSE"},  # type: ignore[typeddict-item]
    )
    served = json.loads(json.dumps(agent_card_to_dict(signer(card))))
    serve_card(env, served)
    assert httpx.get(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S).status_code == 200
    forgeries: list[Callable[[dict[str, Any]], None]] = [
        lambda c: c["securitySchemes"]["apikey"].update({"name": "X-Other"}),
        lambda c: c["securitySchemes"]["apikey"].update({"type": "http", "scheme": "basic"}),
        lambda c: c["capabilities"]["extensions"][0].update({"required": True}),
        lambda c: c.update({"security": []}),
        lambda c: c["skills"][0].update({"security": [{"apikey": []}]}),
    ]
    for i, forge in enumerate(forgeries):
        forged = json.loads(json.dumps(served))
        forge(forged)
        serve_card(env, forged)
        resp = httpx.get(env.card_url(), headers=env.sandbox_auth(), timeout=WAIT_S)
        assert resp.status_code == 502, i


# -- extended agent cards over JSON-RPC (held back and verified like the public card) ---------


def rpc(env: Env, agent: str, method: str, version: str = "", base: str | None = None) -> httpx.Response:
    headers = {**env.sandbox_auth(), **({"A2A-Version": version} if version else {})}
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {}}
    return httpx.post(base or f"{env.router.url}/a2a/{agent}", json=body, headers=headers, timeout=WAIT_S)


@contextlib.contextmanager
def registered(env: Env, policy_dir: Path, name: str, app: Any) -> Iterator[str]:
    """``app`` served on loopback as the A2AAgent ``remote/{name}`` with the test's signing keys."""
    with servers.serve(app) as srv:
        (policy_dir / f"{name}.yaml").write_text(
            a2a_agent_yaml(name, srv.url + "/", "remote", env.keys.signing_keys_yaml())
        )
        graph = trustgraphs.Graph().edge("remote/caller", "remote/echo").edge("remote/sandbox", "remote/echo")
        graph.edge("remote/sandbox", f"remote/{name}").write(policy_dir)
        env.router.call(env.router.app.state.kars.policy.reload())
        yield srv.url


def test_an_extended_card_is_served_only_if_it_verifies(
    env: Env, policy_dir: Path, reasons: Callable[[], list[str]]
) -> None:
    public = a2a_agent.make_card("http://placeholder")
    public.capabilities.extended_agent_card = True
    extended = a2a_agent.make_card(f"{env.router.url}/a2a/ext", name="echo (extended)")
    signer = create_agent_card_signer(
        signing_key=env.keys.ed,  # type: ignore[arg-type]
        protected_header={"alg": "EdDSA", "kid": "ed-1", "typ": "JOSE"},  # type: ignore[typeddict-item]
    )
    signer(extended)
    agent = a2a_agent.build(public, extended_card=extended)
    with registered(env, policy_dir, "ext", agent.app) as agent_url:
        resp = rpc(env, "ext", "GetExtendedAgentCard", "1.0")
        assert resp.status_code == 200, resp.text
        assert resp.content == rpc(env, "ext", "GetExtendedAgentCard", "1.0", base=agent_url).content
        assert resp.json()["result"]["name"] == "echo (extended)"

        extended.supported_interfaces[0].url = "https://attacker.example/a2a"  # changed after signing
        for version, method in (("1.0", "GetExtendedAgentCard"), ("", "agent/getAuthenticatedExtendedCard")):
            resp = rpc(env, "ext", method, version)
            assert resp.status_code == 502, (method, resp.text)
            assert resp.json()["error"]["code"] == "upstream_error", method
            assert "bad_signature" in resp.json()["error"]["message"], method
            assert b"attacker.example" not in resp.content
            assert any(line.startswith("extended agent card of remote/ext refused") for line in reasons())


def test_extended_card_replies_without_a_verified_card(env: Env, policy_dir: Path) -> None:
    """A v0.3 reply whose card verifies passes byte for byte; a JSON-RPC error passes; anything else is 502."""
    replies: list[bytes] = []

    async def answer(request: Request) -> Response:
        return Response(replies[0], media_type="application/json")

    signed = a2a_agent.sign_card_dict(env.card_dict(), env.keys.ed, alg="EdDSA", kid="ed-1")
    card_reply = json.dumps({"jsonrpc": "2.0", "id": 7, "result": signed}, indent=1).encode()
    error_reply = b'{"jsonrpc": "2.0", "id": 7, "error": {"code": -32007, "message": "not configured"}}'
    app = Starlette(routes=[Route("/", answer, methods=["POST"])])
    with registered(env, policy_dir, "fake", app):
        for body, status in ((card_reply, 200), (error_reply, 200), (b"data: {}\n\n", 502)):
            replies[:] = [body]
            resp = rpc(env, "fake", "agent/getAuthenticatedExtendedCard")
            assert resp.status_code == status, (body, resp.text)
            if status == 200:
                assert resp.content == body
