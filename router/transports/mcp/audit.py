"""The audit record and metrics of each MCP ``tools/call`` (SPEC.md §4).

One JSON line per call, logger ``kars.audit`` (on stderr with the router's other log lines,
buffered: ``router.observability.logs.JsonLines``): principal, server, tool, decision, deciding
policy, latency and outcome. Argument names are logged, their values only when
``mcp.auditArguments`` is on (they may hold personal or secret data).
"""

from __future__ import annotations

import time
from typing import Any

from router.observability import logs
from router.observability import metrics as metrics_mod

LOGGER = "kars.audit"
OTHER_TOOL = "other"  # the metrics' tool label for a name neither the upstream listed nor policy names


class Auditor:
    def __init__(self, metrics: metrics_mod.Metrics, lines: logs.JsonLines, *, with_arguments: bool) -> None:
        self._metrics = metrics
        self._lines = lines
        self._with_arguments = with_arguments

    def tool_call(
        self,
        *,
        principal: str,
        server: str,
        tool: str,
        tool_label: str,
        decision: str,
        policy: str,
        started: float,
        outcome: str,
        params: Any,
    ) -> None:
        """``decision``: allow | deny | rate_limited; ``started``: ``time.perf_counter()`` at arrival.

        ``tool`` is the name as the client sent it (the record keeps it); ``tool_label`` is what the
        metrics carry: that name if it is known, else ``OTHER_TOOL`` (bounded label values).
        """
        latency_s = time.perf_counter() - started
        self._metrics.mcp_tool_calls.labels(server, tool_label, decision, outcome).inc()
        if decision == "allow":
            self._metrics.mcp_tool_call_latency.labels(server, tool_label).observe(latency_s)
        arguments = params.get("arguments") if isinstance(params, dict) else None
        record: dict[str, Any] = {
            "event": "mcp.tools_call",
            "principal": principal,
            "server": server,
            "tool": tool,
            "decision": decision,
            "policy": policy,
            "latency_ms": round(latency_s * 1000, 3),
            "outcome": outcome,
            "argument_names": sorted(arguments) if isinstance(arguments, dict) else [],
        }
        if self._with_arguments:
            record["arguments"] = arguments
        self._lines.emit(record)
