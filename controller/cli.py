"""``kars controller [--namespace NS | --all-namespaces] ...`` (SPEC.md §0): flags and entry point.

Kept apart from ``router.cli`` so the router's command line only adds one sub-parser;
kopf and the Kubernetes client are imported when the command runs, not before.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pydantic

from controller import config

EXIT_USAGE = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", action="append", default=[], metavar="NS", help="watch this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace (the default)")
    p.add_argument("--policy-namespace", default="kars-system", help="namespace of the projection ConfigMap")
    p.add_argument("--policy-configmap", default="kars-policy", help="name of the projection ConfigMap")
    p.add_argument("--router-url", help="router admin base URL, polled for /internal/policy-status")
    p.add_argument(
        "--router-replicas-url",
        help="a headless Service's URL for the router: every replica it resolves to is polled (overrides --router-url)",
    )
    p.add_argument("--admin-token-file", type=Path, help="file holding the router's admin bearer token")
    p.add_argument("--router-url-for-sandboxes", help="router URL given to sandboxes as KARS_ROUTER_URL")
    p.add_argument("--router-poll-s", type=float, default=config.ROUTER_POLL_S, help="router status poll interval")
    p.add_argument("--lifecycle-check-s", type=float, default=config.LIFECYCLE_CHECK_S)
    p.add_argument("--seccomp-profile", help="Localhost seccomp profile for sandboxes (default RuntimeDefault)")
    p.add_argument("--sandbox-port", type=int, default=config.SANDBOX_PORT)
    audience_help = "audience of the sandboxes' projected tokens (the router's identity.audience)"
    p.add_argument("--token-audience", default=config.TOKEN_AUDIENCE, help=audience_help)
    p.add_argument("--api-server", help="Kubernetes API URL (default: in-cluster, then kubeconfig)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace) -> config.ControllerSettings:
    return config.ControllerSettings(
        namespaces=tuple(args.namespace),
        policy_namespace=args.policy_namespace,
        policy_configmap=args.policy_configmap,
        router_url=args.router_url,
        router_replicas_url=args.router_replicas_url,
        router_url_for_sandboxes=args.router_url_for_sandboxes,
        admin_token_file=args.admin_token_file,
        router_poll_s=args.router_poll_s,
        lifecycle_check_s=args.lifecycle_check_s,
        api_server=args.api_server,
        sandbox=config.SandboxDefaults(
            seccomp_profile=args.seccomp_profile, port=args.sandbox_port, token_audience=args.token_audience
        ),
    )


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except pydantic.ValidationError as exc:
        print(f"kars controller: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    import asyncio

    from controller import operator

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(operator.run(settings))
    return 0
