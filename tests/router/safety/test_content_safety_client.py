"""The Content Safety client on its own: azure-identity bearer auth, bad replies, no leaked connections."""

from __future__ import annotations

import time
from typing import Any

import pytest
from azure.core.credentials import AccessTokenInfo

from router.safety import content_safety, texts, verdict
from router.upstream import azure_token
from tests.fakes.content_safety import FakeContentSafety
from tests.support import servers


class StaticCredential:
    """An azure-identity async TokenCredential stand-in (the broker only calls these two)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.scopes: list[str] = []

    async def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        self.scopes.extend(scopes)
        return AccessTokenInfo(self.token, int(time.time()) + 3600)

    async def close(self) -> None:
        return None


async def test_bearer_from_azure_identity_and_findings() -> None:
    fake = FakeContentSafety(bearer="aad-token")
    credential = StaticCredential("aad-token")
    with servers.serve(fake) as srv:
        broker = azure_token.TokenBroker(credential, content_safety.SCOPE)
        provider = content_safety.ContentSafetyProvider(srv.url, auth=broker, timeout_s=5)
        await provider.start()
        try:
            prompt = texts.Prompt(user=["hi cs:Hate:4 cs:attack"], documents=["doc cs:attack"])
            found = await provider.check_prompt(prompt, shields=True)
            assert verdict.Finding("hate", "content_safety", 2) in found
            assert verdict.Finding(verdict.JAILBREAK, "content_safety") in found
            assert verdict.Finding(verdict.INDIRECT, "content_safety") in found
            assert credential.scopes == ["https://cognitiveservices.azure.com/.default"]
            assert await provider.check_output("") == []
        finally:
            await provider.aclose()


async def test_wrong_key_and_erroring_service_are_unavailable(tmp_path: Any) -> None:
    fake = FakeContentSafety(key="right")
    key_file = tmp_path / "key"
    key_file.write_text("wrong")
    with servers.serve(fake) as srv:
        provider = content_safety.ContentSafetyProvider(srv.url, auth=content_safety.KeyFileAuth(key_file), timeout_s=5)
        await provider.start()
        try:
            with pytest.raises(verdict.Unavailable, match="answered 401"):
                await provider.check_output("text")
            key_file.write_text("right")
            await provider._auth.start()
            assert await provider.check_output("text") == [
                verdict.Finding(c, "content_safety", 0) for c in ("hate", "self_harm", "sexual", "violence")
            ]
            fake.fail_status = 503
            with pytest.raises(verdict.Unavailable, match="answered 503"):
                await provider.check_output("text")
            assert provider._client.open == 0  # every reply closed
        finally:
            await provider.aclose()


async def test_missing_key_file_is_unavailable_not_a_crash(tmp_path: Any) -> None:
    provider = content_safety.ContentSafetyProvider(
        "http://127.0.0.1:9", auth=content_safety.KeyFileAuth(tmp_path / "absent"), timeout_s=1
    )
    await provider.start()
    try:
        with pytest.raises(verdict.Unavailable, match="no Content Safety key"):
            await provider.check_output("text")
    finally:
        await provider.aclose()
