"""The kars router with some middleware layers left out, to price each layer (bench only).

``BENCH_DROP=Name,Name python -m bench._router_variant PORT``: ``build_app(settings.load())``
as ``kars router`` would build it, minus the named middleware classes (``ALL`` drops every
layer: the Starlette app and the transport alone), served as ``kars router`` serves it.
"""

from __future__ import annotations

import os
import sys

from starlette.applications import Starlette

from router import cli, settings
from router.app import build_app


def without_layers(app: Starlette, names: str) -> Starlette:
    """``app`` minus the middleware classes named in ``names`` (comma-separated; ``ALL``: every one).

    Call before the app serves its first request (Starlette builds its stack then).
    """
    drop = [n for n in names.split(",") if n]
    if drop == ["ALL"]:
        drop = [m.cls.__name__ for m in app.user_middleware]
    unknown = set(drop) - {m.cls.__name__ for m in app.user_middleware}
    if unknown:
        raise SystemExit(f"no such middleware: {', '.join(sorted(unknown))}")
    app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ not in drop]
    return app


def main(port: int) -> None:
    config = settings.load(overrides={("server", "port"): port})
    app = without_layers(build_app(config), os.environ.get("BENCH_DROP", ""))
    cli.serve(app, config)  # as `kars router` serves it (uvloop, httptools, the collector tuned)


if __name__ == "__main__":
    main(int(sys.argv[1]))
