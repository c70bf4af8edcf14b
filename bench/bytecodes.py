"""Python bytecodes per request on the inference hot path, by module: the count the wall clock follows.

``python -m bench bytecodes [--requests N] [--top N] [--functions] [--drop Name,...|ALL]``. The
router's CPU per request tracks the Python bytecodes it runs more closely than its instruction count
(bench/README.md, "inference", fourth session): C work such as orjson, RE2 and llhttp is many
instructions but little time. This bench counts bytecodes exactly, with ``sys.settrace`` and
``f_trace_opcodes``. It calls two ASGI apps in this process: the router (``build_app`` with the
``inference`` bench's policy, the memory budget store, no access line) and the bare pass-through
(``bench._passthrough``). Each gets the ``inference`` bench's ~1 KB chat completions, 8 in flight,
and forwards them to the fake upstream in its own process. There is no server and no network on the
caller's side, so uvicorn is not counted (it is the same for both). The tracer makes a request ~50x
slower: these are counts, not times. The driver's own bytecodes are left out. ``--drop`` leaves
middleware classes out of the router (as ``bench._router_variant`` does), so the difference prices
them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop

from bench import _load, _passthrough, _router_variant, inference

IN_FLIGHT = 8
WARMUP_REQUESTS = 64
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class _Counter:
    """Bytecodes by code object while on; code of this module (the driver) is not counted."""

    def __init__(self, *, by_function: bool) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self._by_function = by_function

    def _trace(self, frame: FrameType, event: str, _arg: Any) -> Any:
        code = frame.f_code
        if code.co_filename == __file__:
            return None
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            self.ops[f"{code.co_filename}:{code.co_qualname}" if self._by_function else code.co_filename] += 1
        return self._trace

    def __enter__(self) -> _Counter:
        sys.settrace(self._trace)
        return self

    def __exit__(self, *_exc: object) -> None:
        sys.settrace(None)


async def _lifespan(app: App, kind: str, inbox: asyncio.Queue[dict[str, Any]], outbox: asyncio.Queue[Any]) -> None:
    await inbox.put({"type": f"lifespan.{kind}"})
    done = await outbox.get()
    if done["type"] != f"lifespan.{kind}.complete":
        raise RuntimeError(f"lifespan {kind}: {done}")


async def _request(app: App, path: str, query: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": list(headers),
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    sent = False
    finished = asyncio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body"):
            finished.set()

    await app(scope, receive, send)
    finished.set()
    return status


async def _count(
    app: App, token: str, requests: int, *, by_function: bool = False
) -> tuple[float, collections.Counter[str]]:
    """Bytecodes per request of ``app`` in total, and by source file (or function)."""
    body = inference.request_body(stream=False)
    path, _, query = inference.AZURE_PATH.partition("?")
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"authorization", b"Bearer " + token.encode()),
    ]
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    lifespan_scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = asyncio.create_task(app(lifespan_scope, inbox.get, outbox.put))
    await _lifespan(app, "startup", inbox, outbox)
    try:

        async def run(n: int) -> list[int]:
            statuses: list[int] = []
            for _ in range(n):
                statuses.append(await _request(app, path, query, headers, body))
            return statuses

        await asyncio.gather(*(run(WARMUP_REQUESTS // IN_FLIGHT) for _ in range(IN_FLIGHT)))
        with _Counter(by_function=by_function) as counter:
            done = await asyncio.gather(*(run(requests // IN_FLIGHT) for _ in range(IN_FLIGHT)))
        failed = [s for batch in done for s in batch if s != 200]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed: {failed[:5]}")
    finally:
        await _lifespan(app, "shutdown", inbox, outbox)
        await lifespan
    counted = IN_FLIGHT * (requests // IN_FLIGHT)
    return sum(counter.ops.values()) / counted, collections.Counter({f: n / counted for f, n in counter.ops.items()})


def _short(filename: str) -> str:
    for marker in ("site-packages/", str(_load.ROOT) + "/", "/lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench bytecodes")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--top", type=int, default=25, help="source files (or functions) listed for the router")
    parser.add_argument("--functions", action="store_true", help="list the router's functions, not its files")
    parser.add_argument("--drop", default="", help="middleware classes to leave out (Name,Name or ALL), to price them")
    args = parser.parse_args(argv)

    from router import settings as settings_mod
    from router.app import build_app
    from router.identity import devtokens

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inference.write_router_files(work)
        port = _load.free_port()
        upstream = f"http://127.0.0.1:{port}"
        argv_up = _load.pinned(_load.LOAD_CORE, inference._uvicorn("bench._upstream:app", port))
        with _load.process(argv_up, ready_url=upstream + "/", cwd=_load.ROOT):
            environ = {
                "KARS_FOUNDRY_ENDPOINT": upstream,
                "KARS_FOUNDRY_API_KEY_FILE": str(work / "foundry-key"),
                "KARS_POLICY_DIR": str(work / "policy"),
                "KARS_POLICY_WATCH": "false",
                "KARS_BUDGETS_STORE": "memory",
                "KARS_LOG_ACCESS": "false",
                "KARS_IDENTITY_DEV_KEY_FILE": str(work / "dev-key.pem"),
            }
            config = settings_mod.load(environ=environ)
            router = _router_variant.without_layers(build_app(config), args.drop)
            token = devtokens.issue(router.state.kars.dev_key, inference.SANDBOX, audience=config.identity.audience)
            _passthrough.UPSTREAM = upstream
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the servers' loop
                bare_total, _ = runner.run(_count(_passthrough.app, token, args.requests))
                router_total, by_file = runner.run(_count(router, token, args.requests, by_function=args.functions))

    print("| app (in process, no server) | bytecodes / request | vs bare |\n|---|---:|---:|")
    print(f"| bare aiohttp pass-through (b) | {bare_total:,.0f} | 1.00x |")
    label = "kars router (c), memory store, no access line" + (f", without {args.drop}" if args.drop else "")
    print(f"| {label} | {router_total:,.0f} | {router_total / bare_total:.2f}x |")
    print(f"\n| router, by {'function' if args.functions else 'source file'} | bytecodes / request |\n|---|---:|")
    for filename, ops in by_file.most_common(args.top):
        print(f"| `{_short(filename)}` | {ops:,.0f} |")
    return 0
