"""Helpers for token-budget tests: policy files, a router with the fake transport, tokens, requests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from router import budgets
from router import settings as settings_mod
from router.app import build_app
from router.identity import devtokens
from tests.support import fake_transport, servers

SANDBOX = "team-a/agent-1"
PROMPT = [{"role": "user", "content": "Say hello."}]


def write_policy(policy_dir: Path, name: str = "budget", namespace: str = "team-a", **budget: Any) -> None:
    doc = {
        "apiVersion": "kars.azure.com/v1alpha1",
        "kind": "InferencePolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"tokenBudget": budget},
    }
    (policy_dir / f"{namespace}-{name}.yaml").write_text(yaml.safe_dump(doc))


def chat_body(tokens: int, model: str = "exact", **extra: Any) -> dict[str, Any]:
    """A chat request whose worst case (prompt estimate + max_tokens) is exactly ``tokens``."""
    body: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": 1, **extra}
    body["max_tokens"] = tokens - budgets.estimate_prompt_tokens(body)
    assert body["max_tokens"] > 0 and fake_transport.worst_case(body) == tokens
    return body


@contextlib.contextmanager
def budget_router(settings: settings_mod.Settings) -> Iterator[Any]:
    """The real router app on loopback with the fake transport mounted; ``srv.transport`` is the fake."""
    app = build_app(settings)
    transport = fake_transport.FakeTransport()
    fake_transport.mount(app, transport)
    with servers.serve(app) as srv:
        srv.app = app  # type: ignore[attr-defined]
        srv.transport = transport  # type: ignore[attr-defined]
        yield srv


def token(srv: Any, sandbox: str = SANDBOX) -> str:
    return devtokens.issue(srv.app.state.kars.dev_key, sandbox, audience="kars-router")


def auth(srv: Any, sandbox: str = SANDBOX) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(srv, sandbox)}"}


def chat(srv: Any, body: dict[str, Any], sandbox: str = SANDBOX) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=auth(srv, sandbox), timeout=10)


def budgets_of(srv: Any, sandbox: str = SANDBOX) -> dict[str, Any]:
    resp = httpx.get(f"{srv.url}/v1/budgets", headers=auth(srv, sandbox), timeout=10)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def window(report: dict[str, Any], window: str, policy: str = "team-a/budget") -> dict[str, Any]:
    found = [b for b in report["budgets"] if b["window"] == window and b["policy"] == policy]
    assert len(found) == 1, report
    return found[0]


StartRouter = Callable[..., Any]
