"""The upstream credential broker, through azure-identity itself against a fake token endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from azure.core.credentials import AccessTokenInfo
from azure.identity import aio as identity_aio

from router import errors
from router.app import build_app
from router.identity import devtokens
from router.settings import FoundrySettings
from router.upstream import api_key, azure_token, credentials
from tests.fakes import identity as identity_fake
from tests.fakes.foundry import FakeFoundry
from tests.support import servers

SCOPE = "https://cognitiveservices.azure.com/.default"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def imds(monkeypatch: pytest.MonkeyPatch) -> Iterator[identity_fake.FakeIdentityEndpoint]:
    """A fake IMDS; azure-identity finds it through its own environment variable."""
    fake = identity_fake.FakeIdentityEndpoint()
    with servers.serve(fake) as srv:
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", srv.url)
        for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET", "AZURE_CLIENT_ID"):
            monkeypatch.delenv(name, raising=False)
        yield fake


def test_router_sends_the_managed_identity_token_upstream(
    imds: identity_fake.FakeIdentityEndpoint, make_settings: Callable[..., Any]
) -> None:
    upstream_fake = FakeFoundry(bearer="tok-1")
    with servers.serve(upstream_fake) as upstream:
        app = build_app(make_settings(foundry={"endpoint": upstream.url, "credential": "managed"}))
        with servers.serve(app) as router:
            assert httpx.get(router.url + "/readyz").status_code == 200  # credential obtainable
            token = devtokens.issue(app.state.kars.dev_key, "team-a/agent-1", audience="kars-router")
            sdk = openai.OpenAI(base_url=router.url + "/v1", api_key=token, max_retries=0)
            for _ in range(3):
                sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert [r.headers["authorization"] for r in upstream_fake.requests] == ["Bearer tok-1"] * 3
    assert imds.issued == 1  # cached: one token request for four uses
    assert imds.requests[0]["query"]["resource"] == "https://cognitiveservices.azure.com"  # "/.default" stripped


def test_credential_failure_is_502_and_not_ready(
    imds: identity_fake.FakeIdentityEndpoint, make_settings: Callable[..., Any]
) -> None:
    imds.fail = True
    upstream_fake = FakeFoundry()
    with servers.serve(upstream_fake) as upstream:
        app = build_app(make_settings(foundry={"endpoint": upstream.url, "credential": "managed"}))
        with servers.serve(app) as router:
            ready = httpx.get(router.url + "/readyz")
            assert ready.status_code == 503
            assert "upstream credential obtainable" in ready.json()["error"]["checks"]
            token = devtokens.issue(app.state.kars.dev_key, "team-a/agent-1", audience="kars-router")
            r = httpx.post(
                router.url + "/v1/embeddings",
                json={"model": "e", "input": "x"},
                headers={"authorization": f"Bearer {token}"},
            )
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    assert upstream_fake.requests == []  # nothing goes upstream without the router's credential


async def test_token_is_refreshed_before_it_expires(imds: identity_fake.FakeIdentityEndpoint) -> None:
    # refresh_in: the endpoint asks for a refresh now, although the token is good for an hour.
    imds.refresh_in_s = 0
    broker = azure_token.TokenBroker(identity_aio.ManagedIdentityCredential(), SCOPE)
    try:
        assert await broker.headers() == (("authorization", "Bearer tok-1"),)
        # Due for refresh but still valid: answered at once with the current token, refreshed behind.
        assert await broker.headers() == (("authorization", "Bearer tok-1"),)
        assert broker._fetch is not None
        async with asyncio.timeout(5):
            await asyncio.shield(broker._fetch)
        assert await broker.headers() == (("authorization", "Bearer tok-2"),)
        assert imds.issued == 2
    finally:
        await broker.aclose()


async def test_near_expiry_token_is_refreshed_through_app_service_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = identity_fake.FakeIdentityEndpoint(expires_in_s=3600)
    with servers.serve(fake) as srv:
        monkeypatch.delenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", raising=False)
        monkeypatch.setenv("IDENTITY_ENDPOINT", srv.url + identity_fake.APP_SERVICE_PATH)
        monkeypatch.setenv("IDENTITY_HEADER", identity_fake.APP_SERVICE_SECRET)
        now = [0.0]
        broker = azure_token.TokenBroker(identity_aio.DefaultAzureCredential(), SCOPE, clock=lambda: now[0])
        try:
            assert await broker.headers() == (("authorization", "Bearer tok-1"),)
            token = broker._token
            assert token is not None
            # Within REFRESH_BEFORE_S of expiry (by the broker's clock): a background refresh starts.
            now[0] = token.expires_on - azure_token.REFRESH_BEFORE_S + 1
            await broker.headers()
            assert broker._fetch is not None
            async with asyncio.timeout(10):
                await asyncio.shield(broker._fetch)
            # azure-identity kept its still-fresh cached token: the broker backs off instead of asking again.
            await broker.headers()
            assert broker._fetch is None and broker.fetches == 2
            # Past expiry by the broker's clock: the request itself waits for a fetch.
            now[0] = token.expires_on + 1
            async with asyncio.timeout(10):
                await broker.headers()
            assert broker.fetches == 3 and broker._fetch is None
        finally:
            await broker.aclose()
    assert fake.requests[0]["headers"]["x-identity-header"] == identity_fake.APP_SERVICE_SECRET


class CountingCredential:
    """A real (tiny) async TokenCredential, as workload identity would be injected in a test."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        self.calls += 1
        await self.release.wait()
        return AccessTokenInfo(f"wl-{self.calls}", 4_102_444_800)  # 2100-01-01

    async def close(self) -> None:
        return None


async def test_concurrent_requests_share_one_token_fetch() -> None:
    cred = CountingCredential()
    broker = azure_token.TokenBroker(cred, SCOPE)
    waiters = [asyncio.create_task(broker.headers()) for _ in range(20)]
    await asyncio.sleep(0)
    cred.release.set()
    async with asyncio.timeout(5):
        results = await asyncio.gather(*waiters)
    assert {r for r in results} == {(("authorization", "Bearer wl-1"),)}
    assert cred.calls == 1
    await broker.aclose()


def test_credential_kind_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert isinstance(credentials.build(FoundrySettings(credential="none")), credentials.NoCredential)
    assert isinstance(credentials.build(FoundrySettings(api_key_file=tmp_path / "k")), api_key.ApiKeyBroker)
    federated = tmp_path / "sa-token"
    federated.write_text("eyJ.fake.token")
    monkeypatch.setenv("AZURE_CLIENT_ID", "00000000-0000-0000-0000-0000000000aa")
    monkeypatch.setenv("AZURE_TENANT_ID", "00000000-0000-0000-0000-0000000000bb")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(federated))
    broker = credentials.build(FoundrySettings(credential="workload"))
    assert isinstance(broker, azure_token.TokenBroker)
    assert isinstance(broker._credential, identity_aio.WorkloadIdentityCredential)
    default = credentials.build(FoundrySettings())
    assert isinstance(default, azure_token.TokenBroker)
    assert isinstance(default._credential, identity_aio.DefaultAzureCredential)


async def test_api_key_file_is_reloaded_in_the_background(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("key-one\n")
    now = [0.0]
    broker = api_key.ApiKeyBroker(key_file, clock=lambda: now[0])
    await broker.start()
    assert await broker.headers() == (("api-key", "key-one"),)
    key_file.write_text("key-two")  # Kubernetes rotated the Secret
    assert await broker.headers() == (("api-key", "key-one"),)  # not re-read on every request
    now[0] = api_key.RELOAD_S + 1
    assert await broker.headers() == (("api-key", "key-one"),)  # answered at once; reload behind
    assert broker._reload is not None
    async with asyncio.timeout(5):
        await asyncio.shield(broker._reload)
    assert await broker.headers() == (("api-key", "key-two"),)
    await broker.aclose()


async def test_api_key_file_missing_or_empty(tmp_path: Path) -> None:
    broker = api_key.ApiKeyBroker(tmp_path / "absent")
    await broker.start()
    reason = await broker.check()
    assert reason is not None and "cannot read" in reason
    with pytest.raises(errors.UpstreamError) as caught:
        await broker.headers()
    assert caught.value.code == "upstream_unavailable"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "empty" in (await api_key.ApiKeyBroker(empty).check() or "")
