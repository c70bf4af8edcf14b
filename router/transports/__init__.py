"""Transports: the ASGI sub-apps that forward a request to its upstream (Foundry, MCP, A2A, mesh)."""
