"""Shared set-up for the Foundry transport tests: the fake upstream and a router in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from router.app import build_app
from router.identity import devtokens
from router.upstream import http as http_mod
from tests.fakes.foundry import FakeFoundry
from tests.support import servers, waiting

UPSTREAM_KEY = "upstream-secret-key"
SANDBOX = "team-a/agent-1"


class StateRecorder:
    """Outermost ASGI wrapper: keeps each request's ``scope["state"]`` after the router returned."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.states: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http":
            self.states.append(scope.get("state", {}))

    def log_fields(self) -> dict[str, Any]:
        """The access-log fields of the last request, once the router has returned from it."""
        waiting.until(lambda: self.states, timeout_s=5, what="a finished request")
        return self.states[-1].get("kars.log", {})  # type: ignore[no-any-return]


@dataclasses.dataclass
class Stack:
    fake: FakeFoundry
    upstream: servers.ServerThread
    router: servers.ServerThread
    app: Any
    recorder: StateRecorder
    token: str

    @property
    def client(self) -> http_mod.Client:
        transport = self.app.state.kars.foundry
        assert transport._client is not None
        return transport._client  # type: ignore[no-any-return]

    def tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1  # not this probe itself

        return int(self.router.call(count()))

    def assert_idle(self, baseline_tasks: int) -> None:
        """No reply left open, no pooled connection checked out, no task left behind."""
        waiting.until(lambda: self.client.open == 0, timeout_s=5, what="upstream replies closed")
        waiting.until(lambda: self.client.connections_in_use == 0, timeout_s=5, what="connections released")
        waiting.until(lambda: self.tasks() <= baseline_tasks, timeout_s=5, what="tasks finished")

    def metric(self, name: str, labels: dict[str, str]) -> float:
        value = self.app.state.kars.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)


@contextlib.contextmanager
def foundry_stack(
    make_settings: Callable[..., Any], tmp_path: Path, *, endpoint: str | None = None, **tree: Any
) -> Iterator[Stack]:
    fake = FakeFoundry(api_key=UPSTREAM_KEY)
    key_file = tmp_path / "foundry-key"
    key_file.write_text(UPSTREAM_KEY + "\n")
    with servers.serve(fake) as upstream:
        foundry = {"endpoint": endpoint or upstream.url, "apiKeyFile": str(key_file), **tree.pop("foundry", {})}
        app = build_app(make_settings(foundry=foundry, **tree))
        recorder = StateRecorder(app)
        with servers.serve(recorder) as router:
            token = devtokens.issue(app.state.kars.dev_key, SANDBOX, audience="kars-router")
            yield Stack(fake, upstream, router, app, recorder, token)
