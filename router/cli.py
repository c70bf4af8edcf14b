"""The ``kars`` command line (SPEC.md §0)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router import settings as settings_mod

if TYPE_CHECKING:
    from starlette.applications import Starlette

EXIT_INVALID = 1
EXIT_USAGE = 2


def _settings(args: argparse.Namespace, overrides: dict[tuple[str, ...], Any]) -> settings_mod.Settings:
    try:
        return settings_mod.load(args.config, overrides=overrides)
    except settings_mod.SettingsError as exc:
        print("kars: invalid settings:", file=sys.stderr)
        for line in exc.lines:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def serve(application: Starlette, settings: settings_mod.Settings) -> None:
    """Serve the app in this process as ``kars router`` does (the benches' router variants too)."""
    import uvicorn

    from router import gc_tuning

    gc_tuning.set_threshold(settings.server.gc_threshold)
    if settings.server.gc_freeze:
        # Called on the loop once start-up loaded the policy, then after each reload that changed it.
        application.state.kars.policy.subscribe(lambda _snapshot: gc_tuning.freeze())
    uvicorn.run(
        application,
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=settings.log.level,
        server_header=False,
        # The identity layer decides who the peer is (identity.trustedProxies). uvicorn's
        # X-Forwarded-For rewriting would let a loopback caller pose as a trusted proxy.
        proxy_headers=False,
    )


def cmd_router(args: argparse.Namespace) -> int:
    from router import app as app_mod
    from router.identity import devtokens
    from router.observability import logs

    settings = _settings(
        args,
        {
            ("policy", "dir"): args.policy_dir,
            ("server", "host"): args.host,
            ("server", "port"): args.port,
            ("server", "sandbox"): args.sandbox,
        },
    )
    logs.configure(settings.log.level)
    try:
        application = app_mod.build_app(settings)
    except devtokens.KeyFileError as exc:
        print(f"kars: identity.devKeyFile: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ident = settings.identity
    if ident.jwks_url is None and settings.server.sandbox is None and ident.dev_sandbox:
        token = devtokens.issue(
            application.state.kars.dev_key, ident.dev_sandbox, audience=ident.audience, ttl=devtokens.DEV_TTL
        )
        hours = devtokens.DEV_TTL.total_seconds() / 3600
        print(
            f"kars: dev token for sandbox {ident.dev_sandbox} (valid {hours:.0f}h):\n{token}\n"
            f"kars: try  curl -H 'Authorization: Bearer <token>' "
            f"http://{settings.server.host}:{settings.server.port}/v1/whoami",
            file=sys.stderr,
            flush=True,
        )
    serve(application, settings)
    return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    from router.identity import devtokens

    settings = _settings(args, {})
    try:
        ttl = devtokens.parse_ttl(args.ttl)
        sandbox = settings_mod.check_sandbox(args.sandbox)
        key = devtokens.load_or_create_key(settings.identity.dev_key_file)
    except (ValueError, devtokens.KeyFileError) as exc:
        print(f"kars: {exc}", file=sys.stderr)
        return EXIT_USAGE
    assert sandbox is not None
    print(devtokens.issue(key, sandbox, audience=settings.identity.audience, ttl=ttl))
    return 0


def cmd_policy_validate(args: argparse.Namespace) -> int:
    import datetime as dt

    from router.policy import load, model, snapshot, trustgraph

    settings = _settings(args, {})
    result = load.load_dir(args.dir)
    lines = result.lines()
    warnings: list[str] = []
    seen: dict[tuple[str, str, str], load.Source] = {}
    now = dt.datetime.now(dt.UTC)
    for loaded in result.resources:
        for problem in snapshot.semantic_errors(loaded.resource, settings.safety.floor):
            lines.append(f"{loaded.source}: {problem}")
        if loaded.resource.key in seen:
            lines.append(f"{loaded.source}: (document): duplicate of {seen[loaded.resource.key]}")
        seen.setdefault(loaded.resource.key, loaded.source)
        if isinstance(loaded.resource, model.TrustGraph):
            # Valid, but an edge that does not count loads as a warning, as the router reports it.
            warnings.extend(f"{loaded.source}: warning: {gone}" for gone in trustgraph.verify(loaded.resource, now)[1])
    for line in [*lines, *warnings]:
        print(line)
    if lines:
        return EXIT_INVALID
    noted = f", {len(warnings)} warnings" if warnings else ""
    print(f"ok: {len(result.resources)} resources in {args.dir}{noted}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kars", description="kars: an agent gateway for Kubernetes")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("router", help="run the router")
    r.add_argument("--config", type=Path, help="settings YAML (KARS_* variables override it)")
    r.add_argument("--policy-dir", type=Path, help="directory of policy YAML/JSON, watched for changes")
    r.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    r.add_argument("--port", type=int, help="port to listen on (default 8443)")
    r.add_argument("--sandbox", help="sidecar mode: every local caller is this NAMESPACE/NAME")
    r.set_defaults(func=cmd_router)

    t = sub.add_parser("token", help="router-issued tokens")
    tsub = t.add_subparsers(dest="token_command", required=True)
    ti = tsub.add_parser("issue", help="print a bearer token for a sandbox")
    ti.add_argument("--sandbox", required=True, help="NAMESPACE/NAME")
    ti.add_argument("--config", type=Path)
    ti.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d (default 1h)")
    ti.set_defaults(func=cmd_token_issue)

    pol = sub.add_parser("policy", help="policy files")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    pv = psub.add_parser("validate", help="check a policy directory; exit 1 with file:document:field messages")
    pv.add_argument("dir", type=Path)
    pv.add_argument("--config", type=Path, help="settings YAML (for the cluster safety floor)")
    pv.set_defaults(func=cmd_policy_validate)

    from controller import cli as controller_cli

    c = sub.add_parser("controller", help="run the controller: KarsSandbox pods, policy projection")
    controller_cli.add_arguments(c)
    c.set_defaults(func=controller_cli.main)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
