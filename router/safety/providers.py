"""The content-safety providers of one router, chosen by one switch (``build``) from its settings.

Every active provider has the same small interface (``Provider``); Foundry's inline annotations are
not one of them (they are read from replies as they pass, always, see ``foundry``). The local
floor is on unless ``safety.localFloor`` turns everything off; Azure AI Content Safety is on when
``safety.contentSafetyEndpoint`` is set.
"""

from __future__ import annotations

from typing import Protocol

from router.policy import model
from router.safety import content_safety, local, texts, verdict
from router.settings import SafetySettings


class Provider(Protocol):
    name: str
    stream_batch_chars: int  # streamed output collected before one check (0: every event)
    overlap_chars: int  # text of one output check repeated at the start of the next
    checks_output: bool  # False: check_output can find nothing (output text is then never gathered)

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def check_prompt(self, prompt: texts.Prompt, *, shields: bool) -> list[verdict.Finding]:
        """What the provider finds in ``prompt`` (raises ``verdict.Unavailable``)."""
        ...

    async def check_output(self, text: str) -> list[verdict.Finding]:
        """What the provider finds in generated ``text`` (raises ``verdict.Unavailable``)."""
        ...


class Safety:
    """The floor and the providers of one app; ``start``/``aclose`` in its lifespan."""

    def __init__(self, floor: model.SafetyFloor, providers: list[Provider]) -> None:
        self.floor = floor
        self.providers = tuple(providers)
        self.output_providers = tuple(p for p in providers if p.checks_output)

    async def start(self) -> None:
        for p in self.providers:
            await p.start()

    async def aclose(self) -> None:
        for p in self.providers:
            await p.aclose()


def build(settings: SafetySettings) -> Safety:
    providers: list[Provider] = []
    floor = local.LocalProvider(settings.local_floor)
    if floor.active:
        providers.append(floor)
    if settings.content_safety_endpoint:
        auth = content_safety.auth_for(settings.content_safety_key_file, settings.content_safety_credential)
        providers.append(
            content_safety.ContentSafetyProvider(
                settings.content_safety_endpoint, auth=auth, timeout_s=settings.content_safety_timeout_s
            )
        )
    return Safety(settings.floor, providers)
