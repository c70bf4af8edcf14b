"""MCP gateway overhead: tools/call per second and added latency, through the router vs direct.

``python -m bench mcp [--seconds N] [--sessions N]``. For each client transport (Streamable
HTTP, legacy HTTP+SSE), a real ``mcp`` SDK server with an ``echo`` tool is measured directly and
then through ``kars router`` (same transport upstream, ToolPolicy and audit on). The router is
pinned to core 0; the upstream and the lean load generator (bench/_mcp_client.py) share core 1,
in both runs, so the ratio is what to read. Loopback only, every run bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import _load, _mcp_client

POLICY = """\
apiVersion: kars.azure.com/v1alpha1
kind: McpServer
metadata: {{name: echo, namespace: default}}
spec: {{url: "{url}", transport: {transport}}}
---
apiVersion: kars.azure.com/v1alpha1
kind: ToolPolicy
metadata: {{name: echo-allowed, namespace: default}}
spec:
  appliesTo: {{mcpServer: echo, tool: echo}}
  decision: allow
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Children run in a temp dir: this tree goes first on their path (never an installed copy)."""
    return {**os.environ, "PYTHONPATH": str(_load.ROOT), **(extra or {})}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process(
    argv: list[str], *, ready_url: str, log: Path, env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """A server run from the work dir with this tree on its path; stderr (the audit log) to ``log``."""
    return _load.process(argv, ready_url=ready_url, env=_env(env), cwd=log.parent, log=log)


def _upstream(kind: str, work: Path) -> tuple[list[str], str, str]:
    port = _load.free_port()
    factory = "streamable" if kind == "streamable" else "sse"
    argv = [sys.executable, "-m", "uvicorn", "--factory", f"bench._mcp_upstream:{factory}", "--port", str(port)]
    argv += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    return _load.pinned(_load.LOAD_CORE, argv), base, f"{base}/mcp" if kind == "streamable" else f"{base}/sse"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench mcp")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="alternating direct/router runs; the best is shown")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(_load.LOAD_CORE)})  # the load generator shares core 1 with the upstream
    rows: list[tuple[str, str, dict[str, float]]] = []

    def load(url: str, kind: str, headers: dict[str, str], sessions: int) -> dict[str, float]:
        return asyncio.run(_mcp_client.run(url, kind, sessions=sessions, seconds=args.seconds, headers=headers))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        token = subprocess.run(
            [sys.executable, "-m", "router", "token", "issue", "--sandbox", "default/dev"],
            cwd=work,
            env=_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for kind in ("streamable", "sse"):
            up_argv, up_base, up_url = _upstream(kind, work)
            policy = work / f"policy-{kind}"
            policy.mkdir()
            transport = "streamable-http" if kind == "streamable" else "sse"
            (policy / "mcp.yaml").write_text(POLICY.format(url=up_url, transport=transport))
            port = _load.free_port()
            router = [sys.executable, "-m", "router", "router", "--policy-dir", str(policy), "--port", str(port)]
            base = f"http://127.0.0.1:{port}"
            url = f"{base}/mcp/echo" + ("/sse" if kind == "sse" else "")
            with (
                _process(up_argv, ready_url=f"{up_base}/ready-probe", log=work / f"upstream-{kind}.log"),
                _process(
                    _load.pinned(_load.SERVER_CORE, router),
                    ready_url=f"{base}/readyz",
                    log=work / f"router-{kind}.log",
                    env={"KARS_LOG_ACCESS": "false", "KARS_BUDGETS_STORE": "memory"},
                ) as proc,
            ):
                # Direct and routed runs alternate, so a burst of load from elsewhere hits both alike.
                # One session too: no queueing, so its added latency is the router's own.
                for sessions in (args.sessions, 1):
                    direct, routed = [], []
                    for _ in range(args.repeat):
                        direct.append(load(up_url, kind, {}, sessions))
                        cpu0 = _cpu_s(proc.pid)
                        result = load(url, kind, {"authorization": f"Bearer {token}"}, sessions)
                        calls = result["calls_per_s"] * args.seconds
                        result["router_cpu_us"] = (_cpu_s(proc.pid) - cpu0) / max(calls, 1) * 1e6
                        routed.append(result)
                    label = f"{kind}, {sessions} session{'s' if sessions > 1 else ''}"
                    rows.append((label, "direct", max(direct, key=lambda r: r["calls_per_s"])))
                    rows.append((label, "kars router", max(routed, key=lambda r: r["calls_per_s"])))
            audited = (work / f"router-{kind}.log").read_text().count('"mcp.tools_call"')
            print(f"{kind}: {audited} audit records written by the router", file=sys.stderr)

    print(f"echo tool, best of {args.repeat} alternating {args.seconds:g} s runs\n")
    print(
        "| client | path | calls/s | vs direct | p50 ms | p99 ms | added p50 ms | failures | load-gen CPU "
        "| router CPU/call |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    direct: dict[str, dict[str, float]] = {}
    for kind, path, r in rows:
        if path == "direct":
            direct[kind] = r
        d = direct[kind]
        cpu = f"{r['router_cpu_us']:.0f} us" if "router_cpu_us" in r else "-"
        print(
            f"| {kind} | {path} | {r['calls_per_s']:,.0f} | {r['calls_per_s'] / d['calls_per_s']:.2f}x "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p50_ms'] - d['p50_ms']:+.2f} "
            f"| {r['failures']:.0f} | {r['client_cpu'] * 100:.0f}% "
            f"| {cpu} |"
        )
    return 0
