"""A real ``redis-server`` (Debian's package) on a free loopback port, for the test session.

No persistence (``--save '' --appendonly no``); the process is stopped when the session ends.
Without the binary the tests that need it are skipped, except under CI (``CI=true``), where a
missing ``redis-server`` is a failure: ``bin/dev test`` installs it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.support import servers

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class RedisServer:
    def __init__(self, port: int, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.process = process

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def _binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("redis-server is not installed (bin/dev test installs it: apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return found


@contextlib.contextmanager
def running() -> Iterator[RedisServer]:
    port = servers.free_port()
    args = [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = RedisServer(port, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {process.stderr.read().decode() if process.stderr else ''}")
            try:
                server.client().ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise TimeoutError("redis-server did not start") from None
                time.sleep(0.02)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
