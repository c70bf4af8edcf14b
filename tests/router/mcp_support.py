"""Real ``mcp`` SDK servers (MCPServer, the SDK's FastMCP) and clients for the MCP gateway tests.

``upstream_server(kind)`` runs one MCPServer under uvicorn on loopback, over Streamable HTTP
(``/mcp``) or legacy HTTP+SSE (``/sse``); ``policy`` writes McpServer/ToolPolicy files;
``sdk_session`` opens an SDK ``ClientSession`` through the router with a router-issued token.
"""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import mcp.types as types
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel

from router.identity import devtokens
from tests.support import servers

SANDBOX = "team-a/agent"
KILL_WAIT_S = 2.0


class Name(BaseModel):
    name: str


def build_upstream() -> MCPServer:
    server = MCPServer("upstream")
    never = asyncio.Event()  # never set: the `hang` tool waits on it until its server dies

    @server.tool()
    def echo(text: str) -> str:
        return text

    @server.tool()
    def secret() -> str:
        return "classified"

    @server.tool()
    def bearer(ctx: Context) -> str:
        return (ctx.headers or {}).get("authorization", "none")

    @server.tool()
    async def count(n: int, ctx: Context, step_s: float = 0.0) -> str:
        for i in range(n):
            await ctx.report_progress(i + 1, n, f"step {i + 1}")
            await asyncio.sleep(step_s)  # a slow tool, not a synchronisation
        return f"counted {n}"

    @server.tool()
    async def ask(ctx: Context) -> str:
        result = await ctx.elicit("What is your name?", Name)
        return f"hello {result.data.name}" if result.action == "accept" and result.data else result.action

    @server.tool()
    async def touch_tools(ctx: Context) -> str:
        await ctx.session.send_tool_list_changed()  # unrelated to any request: the standalone stream
        return "touched"

    @server.tool()
    async def hang() -> str:
        await never.wait()
        return "never"

    @server.resource("info://motd")
    def motd() -> str:
        return "message of the day"

    @server.prompt()
    def greet(name: str) -> str:
        return f"Please greet {name}."

    return server


@contextlib.contextmanager
def upstream_server(kind: str) -> Iterator[tuple[servers.ServerThread, str]]:
    """``(server, url)``: url is what an McpServer's ``spec.url`` names."""
    app = build_upstream()
    asgi = app.streamable_http_app() if kind == "streamable-http" else app.sse_app()
    with servers.serve(asgi) as srv:
        yield srv, f"{srv.url}/mcp" if kind == "streamable-http" else f"{srv.url}/sse"


def kill(srv: servers.ServerThread) -> None:
    """Stop a server abruptly: every open connection is reset, nothing is drained (a crash)."""

    def abort_all() -> None:
        for conn in list(srv.server.server_state.connections):
            conn.transport.abort()

    assert srv.loop is not None
    srv.server.force_exit = srv.server.should_exit = True
    srv.loop.call_soon_threadsafe(abort_all)
    srv.join(timeout=KILL_WAIT_S)  # the SDK's own shutdown may wait on the hung tool: not ours to drain


def mcp_server_doc(name: str, url: str, transport: str, extra: str = "", namespace: str = "team-a") -> str:
    return (
        "apiVersion: kars.azure.com/v1alpha1\nkind: McpServer\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  url: {url}\n  transport: {transport}\n" + textwrap.indent(textwrap.dedent(extra), "  ")
    )


def tool_policy_doc(name: str, spec: str, namespace: str = "team-a") -> str:
    return (
        "apiVersion: kars.azure.com/v1alpha1\nkind: ToolPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n" + textwrap.indent(textwrap.dedent(spec), "  ")
    )


def write_policy(policy_dir: Path, *docs: str) -> None:
    (policy_dir / "mcp.yaml").write_text("---\n".join(docs))


def token(router: Any, sandbox: str = SANDBOX) -> str:
    return devtokens.issue(router.app.state.kars.dev_key, sandbox, audience="kars-router")


@contextlib.asynccontextmanager
async def sdk_session(
    url: str, bearer: str, transport: str, **callbacks: Any
) -> AsyncIterator[tuple[ClientSession, types.InitializeResult]]:
    headers = {"Authorization": f"Bearer {bearer}"}
    if transport == "streamable":
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as client,
            streamable_http_client(url, http_client=client) as (read, write),
            ClientSession(read, write, **callbacks) as session,
        ):
            yield session, await session.initialize()
    else:
        async with (
            sse_client(url, headers=headers) as (read, write),
            ClientSession(read, write, **callbacks) as session,
        ):
            yield session, await session.initialize()
