"""Fixed cost of the router stack: requests/s of /healthz and of an authenticated no-op route.

``python -m bench foundation [--seconds N]``. The router runs as ``kars router`` (uvloop +
httptools, one worker) pinned to core 0 with the example policy; wrk runs on core 1 with 32
connections. A bare Starlette app answering the same JSON is measured in the same run, so the
ratio, not the absolute number, is what to compare across machines.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import _load

BARE_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def healthz(request):
    return JSONResponse({"status": "ok"})

app = Starlette(routes=[Route("/healthz", healthz)])
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench foundation")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args(argv)
    py = sys.executable
    rows: list[tuple[str, _load.WrkResult]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "bare_app.py").write_text(BARE_APP)
        port = _load.free_port()
        bare = _load.pinned(
            _load.SERVER_CORE,
            [
                py,
                "-m",
                "uvicorn",
                "bare_app:app",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
        )
        with _load.process(bare, ready_url=f"http://127.0.0.1:{port}/healthz", cwd=work):
            rows.append(
                ("bare Starlette, /healthz", _load.wrk(f"http://127.0.0.1:{port}/healthz", seconds=args.seconds))
            )

        port = _load.free_port()
        env = {"KARS_LOG_ACCESS": "false", "KARS_BUDGETS_STORE": "memory"}
        router = _load.pinned(
            _load.SERVER_CORE,
            [
                py,
                "-m",
                "router",
                "router",
                "--policy-dir",
                str(_load.ROOT / "examples"),
                "--port",
                str(port),
            ],
        )
        token = subprocess.run(
            [py, "-m", "router", "token", "issue", "--sandbox", "default/dev"],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with _load.process(router, ready_url=f"http://127.0.0.1:{port}/readyz", env=env, cwd=work):
            url = f"http://127.0.0.1:{port}"
            rows.append(("kars router, /healthz", _load.wrk(f"{url}/healthz", seconds=args.seconds)))
            rows.append(
                (
                    "kars router, /v1/whoami (router token)",
                    _load.wrk(f"{url}/v1/whoami", seconds=args.seconds, headers=[f"Authorization: Bearer {token}"]),
                )
            )
        env["KARS_LOG_ACCESS"] = "true"
        port = _load.free_port()
        router = _load.pinned(
            _load.SERVER_CORE,
            [
                py,
                "-m",
                "router",
                "router",
                "--policy-dir",
                str(_load.ROOT / "examples"),
                "--port",
                str(port),
            ],
        )
        with _load.process(router, ready_url=f"http://127.0.0.1:{port}/readyz", env=env, cwd=work):
            # The access log (stdout) goes to /dev/null: this measures formatting and writing it.
            rows.append(
                (
                    "kars router, /v1/whoami, access log on",
                    _load.wrk(
                        f"http://127.0.0.1:{port}/v1/whoami",
                        seconds=args.seconds,
                        headers=[f"Authorization: Bearer {token}"],
                    ),
                )
            )

    base = rows[0][1].requests_per_s
    print("| what | requests/s | vs bare | p50 ms | p99 ms | non-2xx |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r.requests_per_s:,.0f} | {r.requests_per_s / base:.2f}x | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.non_2xx + r.errors} |"
        )
    return 0
