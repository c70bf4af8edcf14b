"""Shared fixtures: clean environment, settings in a temp dir, the router served on loopback."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router import settings as settings_mod
from router.app import build_app
from tests.support import redis_server as redis_support
from tests.support import servers


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No KARS_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(settings_mod.ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    d.mkdir()
    return d


@pytest.fixture
def make_settings(tmp_path: Path, policy_dir: Path) -> Callable[..., settings_mod.Settings]:
    """Settings with files under tmp_path; keyword overrides as ``{"identity": {...}}`` trees."""

    def make(**tree: Any) -> settings_mod.Settings:
        base: dict[str, Any] = {
            "policy": {"dir": str(policy_dir)},
            "identity": {"devKeyFile": str(tmp_path / "dev-key.pem")},
            "budgets": {"store": "memory"},
        }
        for section, values in tree.items():
            base.setdefault(section, {}).update(values)
        return settings_mod.Settings.model_validate(base)

    return make


@pytest.fixture
def router_server(make_settings: Callable[..., settings_mod.Settings]) -> Iterator[Callable[..., Any]]:
    """``with router_server(**settings_tree) as srv:`` runs build_app(settings) on loopback."""
    stack: list[Any] = []

    def start(**tree: Any) -> servers.ServerThread:
        app = build_app(make_settings(**tree))
        cm = servers.serve(app)
        srv = cm.__enter__()
        stack.append(cm)
        srv.app = app  # type: ignore[attr-defined]
        return srv

    yield start
    while stack:
        stack.pop().__exit__(None, None, None)


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port where nothing listens and nothing can start listening during the test."""
    with servers.refusing_port() as port:
        yield port


@pytest.fixture(scope="session")
def redis_server() -> Iterator[redis_support.RedisServer]:
    """A real redis-server on loopback for the whole session (skipped without the binary, unless CI)."""
    with redis_support.running() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: redis_support.RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    redis_server.client().flushall()
    return redis_server.url
