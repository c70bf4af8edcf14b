"""MCP transport: Streamable HTTP and legacy HTTP+SSE in front of either upstream kind, with tool policy.

``Gateway`` (gateway.py) owns sessions, upstream clients and policy; ``routes(gw)`` gives the
Starlette routes of SPEC.md §4. Modules: ``streamable`` and ``sse`` (client side),
``upstream`` (upstream side), ``sessions`` (binding, expiry, replay), ``policy`` (ToolPolicy).
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from router.transports.mcp import gateway, sse, streamable
from router.transports.mcp.gateway import Gateway

__all__ = ["Gateway", "routes"]


def routes(gw: gateway.Gateway) -> list[BaseRoute]:
    return [
        Route("/mcp/{server}", streamable.StreamableEndpoint(gw)),
        Route("/mcp/{server}/sse", sse.SseEndpoint(gw), methods=["GET"]),
        Route("/mcp/{server}/messages", sse.MessagesEndpoint(gw), methods=["POST"]),
    ]
