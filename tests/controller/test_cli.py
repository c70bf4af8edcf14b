"""``kars controller`` flags -> ControllerSettings."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import cli
from router import cli as router_cli


def test_flags_become_settings() -> None:
    args = router_cli.parser().parse_args(
        [
            "controller",
            "--namespace",
            "team-a",
            "--namespace",
            "team-b",
            "--router-url",
            "http://router:8443",
            "--admin-token-file",
            "/etc/kars/admin/token",
            "--seccomp-profile",
            "profiles/kars.json",
            "--router-poll-s",
            "2.5",
        ]
    )
    settings = cli.settings_from_args(args)
    assert settings.namespaces == ("team-a", "team-b") and not settings.clusterwide
    assert settings.router_url == "http://router:8443"
    assert settings.admin_token_file == Path("/etc/kars/admin/token")
    assert settings.sandbox.seccomp_profile == "profiles/kars.json"
    assert settings.router_poll_s == 2.5


def test_all_namespaces_is_the_default_and_excludes_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.settings_from_args(router_cli.parser().parse_args(["controller"])).clusterwide
    with pytest.raises(SystemExit):
        router_cli.parser().parse_args(["controller", "--namespace", "a", "--all-namespaces"])
    assert "not allowed with" in capsys.readouterr().err


def test_bad_values_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    args = router_cli.parser().parse_args(["controller", "--router-poll-s", "0"])
    assert cli.main(args) == cli.EXIT_USAGE
    assert "router_poll_s" in capsys.readouterr().err
