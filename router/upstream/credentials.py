"""The upstream credential broker: which headers authenticate the router to Foundry (SPEC.md §2).

One strategy per module, chosen by one switch here (``foundry.credential``): an API key from a
mounted secret file (``api_key``), or an azure-identity async ``TokenCredential`` (``azure_token``:
Workload Identity, Managed Identity / IMDS, ``DefaultAzureCredential``). Each broker answers
``headers()`` from its cache without blocking the loop, and ``check()`` for ``/readyz``.
"""

from __future__ import annotations

from typing import Protocol

from router.settings import FoundrySettings
from router.upstream import api_key, azure_token

Headers = tuple[tuple[str, str], ...]


class Broker(Protocol):
    async def start(self) -> None: ...

    async def headers(self) -> Headers:
        """The credential headers to add to one upstream request (raises ``KarsError``)."""
        ...

    async def check(self) -> str | None:
        """None when a credential can be obtained now, else a short reason (readiness)."""
        ...

    async def aclose(self) -> None: ...


class NoCredential:
    """``foundry.credential: none`` without a key file: the upstream needs no credential."""

    async def start(self) -> None:
        return None

    async def headers(self) -> Headers:
        return ()

    async def check(self) -> str | None:
        return None

    async def aclose(self) -> None:
        return None


def build(settings: FoundrySettings) -> Broker:
    """The broker ``settings`` ask for; an API key file wins over ``credential``."""
    if settings.api_key_file is not None:
        return api_key.ApiKeyBroker(settings.api_key_file)
    kind = settings.effective_credential
    if kind == "none":
        return NoCredential()
    return azure_token.TokenBroker(azure_token.credential_for(kind), settings.scope)
