"""The MCP bench's upstream: a real ``mcp`` SDK server (MCPServer) with one ``echo`` tool.

``uvicorn --factory bench._mcp_upstream:streamable`` (Streamable HTTP at ``/mcp``) or
``...:sse`` (legacy HTTP+SSE at ``/sse``). Loopback only; benchmark code, not a test double.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer


def _server() -> MCPServer:
    server = MCPServer("bench-echo")

    @server.tool()
    def echo(text: str) -> str:
        return text

    return server


def streamable() -> Any:
    return _server().streamable_http_app()


def sse() -> Any:
    return _server().sse_app()
