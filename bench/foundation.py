"""Fixed cost of the router stack: requests/s of /healthz and of an authenticated no-op route.

``python -m bench foundation [--seconds N]``. The router runs as ``kars router`` (uvloop +
httptools, one worker) pinned to core 0 with the example policy; wrk runs on core 1 with 32
connections. A bare Starlette app answering the same JSON is measured in the same run, so the
ratio, not the absolute number, is what to compare across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def kars_router(work: Path, *, access_log: bool) -> Iterator[str]:
    """A pinned ``kars router`` on the example policy; yields its base URL."""
    port = _load.free_port()
    argv = [sys.executable, "-m", "router", "router", "--policy-dir", str(_load.ROOT / "examples"), "--port", str(port)]
    env = {"KARS_LOG_ACCESS": str(access_log).lower(), "KARS_BUDGETS_STORE": "memory"}
    url = f"http://127.0.0.1:{port}"
    # The access log (stdout) goes to /dev/null: with it on, this measures formatting and writing it.
    with _load.process(_load.pinned(_load.SERVER_CORE, argv), ready_url=f"{url}/readyz", env=env, cwd=work):
        yield url


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench foundation")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args(argv)
    rows: list[tuple[str, _load.WrkResult]] = []

    def measure(name: str, url: str, headers: tuple[str, ...] = ()) -> None:
        rows.append((name, _load.wrk(url, seconds=args.seconds, headers=headers)))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "bare_app.py").write_text(BARE_APP)
        port = _load.free_port()
        bare = [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port), "--loop", "uvloop"]
        bare += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
        with _load.process(
            _load.pinned(_load.SERVER_CORE, bare), ready_url=f"http://127.0.0.1:{port}/healthz", cwd=work
        ):
            measure("bare Starlette, /healthz", f"http://127.0.0.1:{port}/healthz")

        token = subprocess.run(
            [sys.executable, "-m", "router", "token", "issue", "--sandbox", "default/dev"],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        auth = (f"Authorization: Bearer {token}",)
        with kars_router(work, access_log=False) as url:
            measure("kars router, /healthz", f"{url}/healthz")
            measure("kars router, /v1/whoami (router token)", f"{url}/v1/whoami", auth)
        with kars_router(work, access_log=True) as url:
            measure("kars router, /v1/whoami, access log on", f"{url}/v1/whoami", auth)

    base = rows[0][1].requests_per_s
    print("| what | requests/s | vs bare | p50 ms | p99 ms | non-2xx |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r.requests_per_s:,.0f} | {r.requests_per_s / base:.2f}x | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.non_2xx + r.errors} |"
        )
    return 0
