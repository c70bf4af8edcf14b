"""Instructions per request on the inference hot path: a measure this noisy machine cannot blur.

``python -m bench instructions [--requests N] [--variants ...]`` (needs ``valgrind``). CPU time per
request swings by 30% between runs here (a shared VM); the number of instructions a server executes
per request does not (repeat runs agree within 0.5%). Each server runs under ``valgrind
--tool=callgrind`` with collection off, pinned to core 0; a driver on core 1 sends ~1 KB chat
completions (the ``inference`` bench's body, 8 in flight), warms up, switches collection on with
``callgrind_control`` for ``--requests`` requests, and off again. The count includes everything the
server process does for those requests: uvicorn, the middleware, the upstream client, the event
loop. It does not price cache misses or system calls, so compare it with the ``inference`` bench's
CPU column, not instead of it.

Servers: ``bare`` (the aiohttp pass-through, ``bench._passthrough``), ``router`` (``kars router`` as
shipped, the ``inference`` bench's policy: token budget on SQLite, local safety floor, access log),
and ``drop:Name,Name`` (the router without those middleware classes, ``bench._router_variant``;
``drop:ALL`` leaves the Starlette app and the transport alone). ``mcp``: ``kars router`` in front of
the ``mcp`` bench's upstream (a real ``mcp`` SDK server, Streamable HTTP, an ``echo`` tool), one
session sending ``tools/call`` after ``tools/call`` (the count is per call).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from bench import _load, _mcp_client, inference
from bench import mcp as mcp_bench

IN_FLIGHT = 8
MCP_SANDBOX = "default/dev"  # the caller the mcp bench's policy admits
WARMUP_REQUESTS = 160
VALGRIND_READY_S = 180.0  # a Python server starts ~20x slower under valgrind


def _server_argv(variant: str, port: int, policy_dir: Path) -> tuple[list[str], str, dict[str, str]]:
    py = sys.executable
    if variant == "mcp":
        argv = [
            py,
            "-m",
            "router",
            "router",
            "--port",
            str(port),
            "--policy-dir",
            str(policy_dir.parent / "mcp-policy"),
        ]
        return argv, "/healthz", {"KARS_BUDGETS_STORE": "memory", "KARS_LOG_ACCESS": "false"}
    if variant == "bare":
        argv = [py, "-m", "uvicorn", "bench._passthrough:app", "--port", str(port), "--loop", "uvloop"]
        argv += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
        return argv, "/", {"BENCH_CLIENT": "aiohttp"}
    if variant.startswith("drop:"):
        return [py, "-m", "bench._router_variant", str(port)], "/healthz", {"BENCH_DROP": variant[5:]}
    if variant == "router":
        return [py, "-m", "router", "router", "--port", str(port), "--policy-dir", str(policy_dir)], "/healthz", {}
    raise SystemExit(f"unknown variant {variant!r}: bare, router or drop:Name,...")


async def _drive(url: str, token: str, body: bytes, pid: int, requests: int) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def worker(n: int) -> None:
            for _ in range(n):
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: {resp.status}")

        await asyncio.gather(*(worker(WARMUP_REQUESTS // IN_FLIGHT) for _ in range(IN_FLIGHT)))
        await _callgrind(pid, "--instr=on")
        await asyncio.gather(*(worker(requests // IN_FLIGHT) for _ in range(IN_FLIGHT)))
        await _callgrind(pid, "--instr=off")


async def _drive_mcp(url: str, token: str, pid: int, calls: int) -> None:
    async with aiohttp.ClientSession() as http:
        client = _mcp_client._Streamable(http, url, {"authorization": f"Bearer {token}"})
        await client.open()
        for rid in range(1, WARMUP_REQUESTS):
            await client.call(rid)
        await _callgrind(pid, "--instr=on")
        for rid in range(WARMUP_REQUESTS, WARMUP_REQUESTS + calls):
            if not await client.call(rid):
                raise RuntimeError(f"tools/call {rid} failed")
        await _callgrind(pid, "--instr=off")
        await client.close()


async def _callgrind(pid: int, switch: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", switch, str(pid), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control {switch} {pid} failed")


def measure(variant: str, work: Path, env: dict[str, str], token: str, requests: int, keep: Path | None) -> int:
    """Instructions per request of ``variant``'s server process."""
    port = _load.free_port()
    argv, ready, extra = _server_argv(variant, port, work / "policy")
    out = (keep or work) / f"callgrind.{variant.replace(':', '-').replace(',', '+')}.out"
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *argv]
    url = f"http://127.0.0.1:{port}"
    server = _load.pinned(_load.SERVER_CORE, vg)
    with _load.process(
        server, ready_url=url + ready, env={**env, **extra}, cwd=work, ready_timeout_s=VALGRIND_READY_S
    ) as proc:
        if variant == "mcp":
            asyncio.run(_drive_mcp(url + "/mcp/echo", token, proc.pid, requests))
        else:
            body = inference.request_body(stream=False)
            asyncio.run(_drive(url + inference.AZURE_PATH, token, body, proc.pid, requests))
    # callgrind writes its totals when the process exits (the context manager stopped it).
    totals = re.search(r"^totals:\s+(\d+)", out.read_text(), re.MULTILINE)
    if totals is None:
        raise RuntimeError(f"no totals in {out}")
    return int(totals.group(1)) // requests


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench instructions")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--keep", type=Path, help="keep callgrind's output files here (for callgrind_annotate)")
    parser.add_argument("variants", nargs="*", default=["bare", "router"])
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install -y valgrind; `bin/dev bench` does it for you)")
    os.sched_setaffinity(0, {int(_load.LOAD_CORE)})  # the driver, with the fake upstream
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inference.write_router_files(work)
        up_port = _load.free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        env = {
            "PYTHONPATH": str(_load.ROOT),
            "BENCH_UPSTREAM": upstream,
            "KARS_FOUNDRY_ENDPOINT": upstream,
            "KARS_FOUNDRY_API_KEY_FILE": str(work / "foundry-key"),
            "KARS_POLICY_DIR": str(work / "policy"),
            "KARS_BUDGETS_SQLITE_PATH": str(work / "budgets.db"),
        }
        tokens = {
            sandbox: subprocess.run(
                [sys.executable, "-m", "router", "token", "issue", "--sandbox", sandbox, "--ttl", "1h"],
                cwd=work,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            for sandbox in (inference.SANDBOX, MCP_SANDBOX)
        }
        up_argv = [sys.executable, "-m", "uvicorn", "bench._upstream:app", "--port", str(up_port), "--loop", "uvloop"]
        up_argv += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
        results: list[tuple[str, int]] = []
        mcp_argv, mcp_base, mcp_url = mcp_bench._upstream("streamable", work)
        (work / "mcp-policy").mkdir()
        (work / "mcp-policy" / "mcp.yaml").write_text(mcp_bench.POLICY.format(url=mcp_url, transport="streamable-http"))
        with (
            _load.process(_load.pinned(_load.LOAD_CORE, up_argv), ready_url=upstream + "/", env=env, cwd=_load.ROOT),
            _load.process(mcp_argv, ready_url=f"{mcp_base}/ready-probe", env=env, cwd=work),
        ):
            for variant in args.variants:
                token = tokens[MCP_SANDBOX if variant == "mcp" else inference.SANDBOX]
                results.append((variant, measure(variant, work, env, token, args.requests, args.keep)))
                print(f"{variant}: {results[-1][1]:,} instructions/request", file=sys.stderr, flush=True)
    base = dict(results).get("bare")
    print("| server | instructions / request | vs bare |\n|---|---:|---:|")
    for variant, count in results:
        ratio = f"{count / base:.2f}x" if base else "-"
        print(f"| {variant} | {count:,} | {ratio} |")
    return 0
