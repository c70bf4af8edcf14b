"""Run ASGI apps under a real uvicorn on a free loopback port, in a thread of their own.

The server runs on its own event loop in a background thread, so tests may drive it with
sync clients (the ``openai`` SDK) or async ones. ``serve`` waits until the server accepts
connections and always shuts it down, lifespan included.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

STARTUP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs.

    The socket stays bound but never listens, so a connect gets ECONNREFUSED and no server
    started meanwhile can take the port. (A port from ``free_port()`` is free only until the
    next server in the test picks it.)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port where a connection is never accepted: a connect waits until its own timeout.

    The socket listens with a backlog of 0 and one connection already fills it, so the kernel
    drops further handshakes (an overloaded or firewalled host, as a client sees it).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = int(server.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            yield port


class ServerThread(threading.Thread):
    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int | None = None, **config: Any) -> None:
        super().__init__(daemon=True, name="uvicorn-test")
        self.host = host
        self.port = port or free_port()
        cfg = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            loop="asyncio",
            http="httptools",
            lifespan="on",
            proxy_headers=False,  # as kars router serves it (router/cli.py)
            access_log=False,
            log_level="warning",
            **config,
        )
        self.server = uvicorn.Server(cfg)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        except BaseException as exc:  # surfaced by start()
            self.error = exc
        finally:
            _end_leftover_tasks(self.loop)
            self.loop.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start_and_wait(self) -> None:
        self.start()
        waited = 0.0
        while not self.server.started:
            if self.error is not None or not self.is_alive():
                raise RuntimeError(f"server failed to start: {self.error!r}")
            threading.Event().wait(0.01)
            waited += 0.01
            if waited > STARTUP_TIMEOUT_S:
                raise TimeoutError("server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(timeout=STARTUP_TIMEOUT_S)

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the server's loop (to inspect app state) and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _end_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await what the app left running (sse_starlette's shutdown watcher), as ``asyncio.run`` does.

    Otherwise the closed loop's pending tasks are reported as destroyed when the process exits.
    """
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


@contextlib.contextmanager
def serve(app: Any, **kwargs: Any) -> Iterator[ServerThread]:
    thread = ServerThread(app, **kwargs)
    thread.start_and_wait()
    try:
        yield thread
    finally:
        thread.stop()
