"""Shared benchmark plumbing: pinned server processes, wrk runs and their parsed results.

Servers are started as real processes pinned to one core with ``taskset``; the load generator
(wrk) runs pinned to the other core. Every run is bounded in time and targets loopback only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVER_CORE = "0"
LOAD_CORE = "1"
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: str, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") else list(argv)


@contextlib.contextmanager
def process(
    argv: Sequence[str],
    *,
    ready_url: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log: Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv``, wait until ``ready_url`` answers, stop it afterwards.

    stderr goes to a file (``log``, or an anonymous temporary one), never to a pipe nobody drains:
    a chatty server would fill the pipe and stall in the middle of a measurement.
    """
    with log.open("w+b") if log is not None else tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(argv), env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    err.seek(0)
                    raise RuntimeError(f"{argv[0]} exited: {err.read().decode(errors='replace')[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(ready_url, timeout=1).status_code < 500:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ready_url} not ready")
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclasses.dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def wrk(
    url: str, *, seconds: int = 10, connections: int = 32, headers: Sequence[str] = (), script: Path | None = None
) -> WrkResult:
    """Run wrk pinned to the load core; parse requests/s, latency percentiles and failures."""
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk; `bin/dev bench` does it for you)")
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run(pinned(LOAD_CORE, [*argv, url]), capture_output=True, text=True, timeout=seconds + 60)
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", text).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", text).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return WrkResult(
        rps,
        p50,
        p99,
        int(non2xx.group(1)) if non2xx else 0,
        sum(int(g) for g in errors.groups()) if errors else 0,
    )
