"""The ``kars`` command line, run for real: router start-up with its dev token, token issue, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from router import cli
from router.identity import devtokens, verifier
from tests.support import servers, waiting

ROOT = Path(__file__).resolve().parents[2]


def wait_ready(url: str) -> None:
    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    waiting.until(ready, timeout_s=20, what="the router to be ready")


def test_router_starts_on_embedded_defaults_and_prints_a_working_token(tmp_path: Path) -> None:
    port = servers.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "router", "--policy-dir", str(ROOT / "examples"), "--port", str(port)],
        cwd=tmp_path,  # the dev key and counters land here
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        header = proc.stderr.readline()
        assert "dev token for sandbox default/dev" in header
        token = proc.stderr.readline().strip()
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        resp = httpx.get(f"{url}/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert resp.json()["principal"] == "default/dev"
        assert (tmp_path / "kars-dev-key.pem").stat().st_mode & 0o077 == 0
        status = httpx.get(f"{url}/internal/policy-status").json()
        assert len(status["entries"]) == 6 and not any(e["lastError"] for e in status["entries"])
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=20)
    # uvicorn shuts down gracefully (lifespan included), then re-raises SIGTERM for its exit status.
    assert proc.returncode in (0, -15)
    assert "Application shutdown complete" in rest


def test_router_freezes_its_heap_at_start_and_after_each_policy_change(tmp_path: Path) -> None:
    """``router.gc_tuning``: the start-up heap leaves the collector's walks once the policy is
    loaded, and again after a reload swaps in a changed policy (so the old one is collected)."""
    policy_dir = tmp_path / "policy"
    shutil.copytree(ROOT / "examples", policy_dir)
    port = servers.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "router", "--policy-dir", str(policy_dir), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def entries() -> int:
        try:
            return len(httpx.get(f"{url}/internal/policy-status", timeout=1).json()["entries"])
        except httpx.TransportError:
            return -1

    try:
        waiting.until(lambda: entries() == 6, timeout_s=20, what="the router to load the examples")
        (policy_dir / "tools.yaml").unlink()
        waiting.until(lambda: 0 <= entries() < 6, timeout_s=20, what="the router to reload without tools.yaml")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    frozen = [line for line in err.splitlines() if "objects frozen in" in line]
    assert len(frozen) == 2, err


def refused_router(cwd: Path, policy_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``kars router`` that stops at start, run to its exit (no KARS_* from the outside but ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "router", "router", "--policy-dir", str(policy_dir)],
        env={k: v for k, v in os.environ.items() if not k.startswith("KARS_")} | env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_router_refuses_bad_settings_with_a_clear_message(tmp_path: Path) -> None:
    proc = refused_router(tmp_path, tmp_path / "missing", KARS_LIMITS_MAX_BODY_BYTES="-1")
    assert proc.returncode == 2
    assert "limits.maxBodyBytes: Input should be greater than or equal to 1" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_token_issue_prints_a_token_the_router_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KARS_IDENTITY_DEV_KEY_FILE", str(tmp_path / "key.pem"))
    assert cli.main(["token", "issue", "--sandbox", "team-a/agent-1", "--ttl", "15m"]) == 0
    token = capsys.readouterr().out.strip()
    key = devtokens.load_or_create_key(tmp_path / "key.pem")
    v = verifier.TokenVerifier(audience="kars-router", dev_key=key, jwks_cache=None, issuer=None)
    principal = await v.verify(token)
    assert principal.id == "team-a/agent-1"


def test_token_issue_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KARS_IDENTITY_DEV_KEY_FILE", str(tmp_path / "key.pem"))
    refused = {
        ("--sandbox", "no-slash"): "kars: 'no-slash' is not NAMESPACE/NAME\n",
        ("--sandbox", "a/b", "--ttl", "forever"): "kars: 'forever' is not a duration like 90s, 15m, 1h or 7d\n",
        (
            "--sandbox",
            "a/b",
            "--ttl",
            "99999999999d",
        ): "kars: '99999999999d': a token lives more than 0s and at most 366d\n",
        ("--sandbox", "a/b", "--ttl", "0s"): "kars: '0s': a token lives more than 0s and at most 366d\n",
    }
    for args, message in refused.items():
        assert cli.main(["token", "issue", *args]) == 2
        assert capsys.readouterr().err == message  # one line, no traceback


@pytest.mark.parametrize("problem", ["garbage", "directory", "unwritable"])
def test_a_dev_key_that_cannot_be_used_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    key = tmp_path / "key.pem"
    if problem == "garbage":
        key.write_text("garbage")
    elif problem == "directory":
        key.mkdir()
    else:
        key = Path("/proc/nope/key.pem")  # its directory cannot be created
    monkeypatch.setenv("KARS_IDENTITY_DEV_KEY_FILE", str(key))
    assert cli.main(["token", "issue", "--sandbox", "a/b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kars: {key}: ") and err.count("\n") == 1


def test_router_refuses_a_dev_key_it_cannot_use_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("garbage")
    proc = refused_router(tmp_path, ROOT / "examples", KARS_IDENTITY_DEV_KEY_FILE=str(tmp_path / "key.pem"))
    assert (proc.returncode, proc.stderr) == (
        2,
        f"kars: identity.devKeyFile: {tmp_path / 'key.pem'}: not a PEM private key\n",
    )


def test_key_file_that_is_not_ed25519(tmp_path: Path) -> None:
    bad = tmp_path / "key.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(devtokens.KeyFileError):
        devtokens.load_or_create_key(bad)


def test_the_served_router_ignores_x_forwarded_for(tmp_path: Path) -> None:
    """The identity layer alone decides who the peer is (``identity.trustedProxies``): uvicorn's own
    proxy-header handling would let any loopback process claim a trusted proxy's address with
    ``X-Forwarded-For`` and then name any principal in ``X-A2A-Agent-Subject``."""
    port = servers.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARS_")}
    env["KARS_IDENTITY_TRUSTED_PROXIES"] = "[10.0.0.0/8]"
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "router", "--policy-dir", str(ROOT / "examples"), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        forged = {"X-Forwarded-For": "10.1.2.3", "X-A2A-Agent-Subject": "team-b/boss"}
        resp = httpx.get(f"{url}/v1/whoami", headers=forged)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "missing_credentials"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
