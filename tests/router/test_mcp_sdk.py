"""The real ``mcp`` SDK client through the router to real ``mcp`` SDK servers, every transport pair.

Streamable HTTP and legacy SSE on the client side, times Streamable HTTP and legacy SSE
upstream (``McpServer.transport``): initialize, tools, resources, prompts, progress, an
elicitation (server-to-client request), ping, policy (a denied tool, the upstream bearer
from the McpServer's secret), and session end.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp.types as types
import pytest
from mcp.shared.exceptions import MCPError

from tests.router import mcp_support as ms
from tests.support import servers, waiting

CLIENTS = ["streamable", "sse"]
UPSTREAMS = ["streamable-http", "sse"]
UPSTREAM_BEARER = "upstream-secret-value"


@pytest.fixture(params=UPSTREAMS)
def upstream(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    with ms.upstream_server(request.param) as (_srv, url):
        yield request.param, url


@pytest.fixture
def router(
    upstream: tuple[str, str], router_server: Callable[..., Any], policy_dir: Path, tmp_path: Path
) -> servers.ServerThread:
    kind, url = upstream
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "tools-token").write_text(UPSTREAM_BEARER + "\n")
    ms.write_policy(
        policy_dir,
        ms.mcp_server_doc("tools", url, kind, "auth: {bearerFromSecret: tools-token}\n"),
        ms.tool_policy_doc("no-secrets", "appliesTo: {mcpServer: tools, tool: secret}\ndecision: deny\n"),
    )
    srv: servers.ServerThread = router_server(mcp={"secretsDir": str(secrets)})
    return srv


def endpoint(router: servers.ServerThread, client: str) -> str:
    return f"{router.url}/mcp/tools" + ("/sse" if client == "sse" else "")


async def wait_sessions(router: Any, count: int) -> None:
    """Bounded wait for the router's session table to reach ``count`` (ends are asynchronous)."""
    waiting = asyncio.run_coroutine_threadsafe(router.app.state.kars.mcp.table.wait_size(count), router.loop)
    with anyio.fail_after(5):
        await asyncio.wrap_future(waiting)


@pytest.mark.parametrize("client", CLIENTS)
async def test_full_session(router: Any, client: str) -> None:
    audit = io.StringIO()
    router.app.state.kars.audit_log.stream = audit  # the audit lines are written here from now on
    progress: list[tuple[float, float | None, str | None]] = []
    asked: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def on_elicit(_ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "kars"})

    changed = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    token = ms.token(router)
    callbacks: dict[str, Any] = {"elicitation_callback": on_elicit, "message_handler": on_message}
    async with ms.sdk_session(endpoint(router, client), token, client, **callbacks) as (s, init):
        assert init.protocol_version == "2025-11-25"
        assert init.server_info.name == "upstream"

        names = [t.name for t in (await s.list_tools()).tools]
        assert "echo" in names and "secret" not in names  # denied tools are not listed

        echoed = await s.call_tool("echo", {"text": "hi there"})
        assert echoed.content[0].text == "hi there"  # type: ignore[union-attr]

        with pytest.raises(MCPError) as denied:
            await s.call_tool("secret", {})
        assert denied.value.code == -32001
        assert "ToolPolicy team-a/no-secrets" in denied.value.message
        again = await s.call_tool("echo", {"text": "still open"})  # the session survived the denial
        assert again.content[0].text == "still open"  # type: ignore[union-attr]

        counted = await s.call_tool("count", {"n": 3}, progress_callback=on_progress)
        assert counted.content[0].text == "counted 3"  # type: ignore[union-attr]
        assert [p[0] for p in progress] == [1, 2, 3]

        answered = await s.call_tool("ask", {})
        assert answered.content[0].text == "hello kars"  # type: ignore[union-attr]
        assert asked == ["What is your name?"]

        bearer = await s.call_tool("bearer", {})
        assert bearer.content[0].text == f"Bearer {UPSTREAM_BEARER}"  # type: ignore[union-attr]

        resources = await s.list_resources()
        assert [str(r.uri) for r in resources.resources] == ["info://motd"]
        motd = await s.read_resource("info://motd")
        assert motd.contents[0].text == "message of the day"  # type: ignore[union-attr]

        prompts = await s.list_prompts()
        assert [p.name for p in prompts.prompts] == ["greet"]
        prompt = await s.get_prompt("greet", {"name": "Ada"})
        assert "Ada" in prompt.messages[0].content.text  # type: ignore[union-attr]

        touched = await s.call_tool("touch_tools", {})
        assert touched.content[0].text == "touched"  # type: ignore[union-attr]
        with anyio.fail_after(5):
            await changed.wait()  # list_changed came down the session's standalone stream

        await s.send_ping()
        assert len(router.app.state.kars.mcp.table) == 1
    await wait_sessions(router, 0)  # DELETE (streamable) or the SSE stream closing ends it

    # Buffered, written at most 250 ms later: wait for the three calls' records.
    await waiting.until_async(lambda: audit.getvalue().count("\n") >= 3, what="the audit records")
    records = [json.loads(line) for line in audit.getvalue().splitlines()]
    assert all(r["logger"] == "kars.audit" and r["msg"] == "tools/call" for r in records)
    assert {(r["tool"], r["decision"], r["outcome"]) for r in records} >= {
        ("echo", "allow", "ok"),
        ("secret", "deny", "denied"),
        ("count", "allow", "ok"),
    }
    assert all(r["principal"] == ms.SANDBOX and r["server"] == "team-a/tools" for r in records)
    assert all("arguments" not in r for r in records)  # values are not logged by default
    assert next(r for r in records if r["tool"] == "echo")["argument_names"] == ["text"]
    metrics = router.app.state.kars.metrics
    assert metrics.mcp_tool_calls.labels("team-a/tools", "secret", "deny", "denied").value == 1
