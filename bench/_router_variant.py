"""The kars router with some middleware layers left out, to price each layer (bench only).

``BENCH_DROP=Name,Name python -m bench._router_variant PORT``: ``build_app(settings.load())``
as ``kars router`` would build it, minus the named middleware classes (``ALL`` drops every
layer: the Starlette app and the transport alone), served as ``kars router`` serves it.
"""

from __future__ import annotations

import os
import sys

from router import cli, settings
from router.app import build_app


def main(port: int) -> None:
    config = settings.load(overrides={("server", "port"): port})
    app = build_app(config)
    drop = [n for n in os.environ.get("BENCH_DROP", "").split(",") if n]
    if drop == ["ALL"]:
        drop = [m.cls.__name__ for m in app.user_middleware]
    app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ not in drop]
    cli.serve(app, config)  # as `kars router` serves it (uvloop, httptools, the collector tuned)


if __name__ == "__main__":
    main(int(sys.argv[1]))
