"""The kars router with some middleware layers left out, to price each layer (bench only).

``BENCH_DROP=Name,Name python -m bench._router_variant PORT``: ``build_app(settings.load())``
as ``kars router`` would build it, minus the named middleware classes (``ALL`` drops every
layer: the Starlette app and the transport alone), served by uvicorn with uvloop and httptools.
"""

from __future__ import annotations

import os
import sys

import uvicorn

from router import settings
from router.app import build_app


def main(port: int) -> None:
    app = build_app(settings.load())
    drop = [n for n in os.environ.get("BENCH_DROP", "").split(",") if n]
    if drop == ["ALL"]:
        drop = [m.cls.__name__ for m in app.user_middleware]
    app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ not in drop]
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # as kars router serves it
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
