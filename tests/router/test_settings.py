"""Settings: YAML file, KARS_* overrides, validation with key-path messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from router import settings


def test_defaults_match_the_spec() -> None:
    s = settings.load(environ={})
    assert s.server.port == 8443 and s.server.host == "127.0.0.1"
    assert s.foundry.endpoint is None and s.foundry.effective_credential == "default"
    assert s.foundry.scope == "https://cognitiveservices.azure.com/.default"
    assert s.budgets.store == "sqlite" and s.budgets.sqlite_path == Path("./kars-budgets.db")
    assert (s.safety.floor.hate, s.safety.floor.allow_fail_open) == ("Medium", False)
    assert s.identity.audience == "kars-router" and s.identity.trusted_proxies == []
    assert s.limits.max_body_bytes == 4 * 1024 * 1024
    assert s.mesh.pair_timeout_s == 30
    assert s.a2a.public_urls == []  # signed requests' aud: the request's own scheme and Host


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "kars.yaml"
    cfg.write_text(
        "foundry:\n  endpoint: https://file.openai.azure.com\n  apiKeyFile: /secrets/key\n"
        "limits: {maxBodyBytes: 1000}\nserver: {port: 9000}\n"
    )
    env = {
        "KARS_FOUNDRY_ENDPOINT": "https://env.openai.azure.com",
        "KARS_IDENTITY_TRUSTED_PROXIES": "[10.0.0.0/8, 'fd00::/8']",
        "KARS_SAFETY_FLOOR_ALLOW_FAIL_OPEN": "true",
        "KARS_IDENTITY_AUDIENCE": "12345",  # a string setting stays a string
        "HOME": "/root",  # not ours: ignored
    }
    s = settings.load(cfg, environ=env, overrides={("server", "port"): 9100})
    assert s.foundry.endpoint == "https://env.openai.azure.com"
    assert s.foundry.api_key_file == Path("/secrets/key") and s.foundry.effective_credential == "none"
    assert s.limits.max_body_bytes == 1000
    assert s.identity.trusted_proxies == ["10.0.0.0/8", "fd00::/8"]
    assert s.safety.floor.allow_fail_open is True
    assert s.identity.audience == "12345"
    assert s.server.port == 9100


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    cfg = tmp_path / "kars.yaml"
    cfg.write_text("foundry: {credential: magic}\nsafety: {floor: {hate: Extreme}}\nbogus: 1\n")
    env = {"KARS_LIMITS_MAX_BODY_BYTE": "5", "KARS_IDENTITY_TRUSTED_PROXIES": "[not-a-cidr]"}
    with pytest.raises(settings.SettingsError) as info:
        settings.load(cfg, environ=env)
    text = "\n".join(info.value.lines)
    assert "KARS_LIMITS_MAX_BODY_BYTE: unknown setting (did you mean KARS_LIMITS_MAX_BODY_BYTES?)" in text
    assert "foundry.credential: Input should be 'workload', 'managed', 'default' or 'none'" in text
    assert "safety.floor.hate: Input should be 'Safe', 'Low', 'Medium' or 'High'" in text
    assert "bogus: unknown field" in text
    assert "identity.trustedProxies[0]: 'not-a-cidr' is not a CIDR" in text


def test_public_urls_are_http_base_urls() -> None:
    env = {"KARS_A2A_PUBLIC_URLS": "[https://agents.example.com/, 'http://10.0.0.1:8443/kars']"}
    assert settings.load(environ=env).a2a.public_urls == ["https://agents.example.com", "http://10.0.0.1:8443/kars"]
    for bad in ("agents.example.com", "ftp://agents.example.com", "https://agents.example.com/?x=1"):
        with pytest.raises(settings.SettingsError, match=r"a2a\.publicUrls\[0\]: .* is not an http\(s\) base URL"):
            settings.load(environ={"KARS_A2A_PUBLIC_URLS": f"['{bad}']"})


def test_list_settings_are_set_from_the_environment() -> None:
    env = {"KARS_MCP_ALLOWED_ORIGINS": "[http://a.example]", "KARS_A2A_JKU_ALLOWED_HOSTS": "[keys.example.com]"}
    s = settings.load(environ=env)
    assert (s.mcp.allowed_origins, s.a2a.jku_allowed_hosts) == (["http://a.example"], ["keys.example.com"])


@pytest.mark.parametrize(
    ("var", "key", "bad", "kind"),
    [
        ("KARS_FOUNDRY_ENDPOINT", "foundry.endpoint", "not-a-url", "http/https"),
        ("KARS_FOUNDRY_ENDPOINT", "foundry.endpoint", "ftp://x.example", "http/https"),
        ("KARS_IDENTITY_JWKS_URL", "identity.jwksUrl", "notaurl", "http/https"),
        ("KARS_SAFETY_CONTENT_SAFETY_ENDPOINT", "safety.contentSafetyEndpoint", "notaurl", "http/https"),
        ("KARS_MESH_RELAY_URL", "mesh.relayUrl", "https://relay.example", "ws/wss"),
        ("KARS_BUDGETS_REDIS_URL", "budgets.redisUrl", "notaurl", "redis/rediss/unix"),
    ],
)
def test_a_malformed_url_is_refused_at_start(var: str, key: str, bad: str, kind: str) -> None:
    """Not at the first call (a router that said it was ready and answered every call 502)."""
    env = {"KARS_BUDGETS_STORE": "redis", "KARS_BUDGETS_REDIS_URL": "redis://r:6379/0"}  # a store to check
    env[var] = bad
    with pytest.raises(settings.SettingsError) as info:
        settings.load(environ=env)
    assert f"{key}: '{bad}' is not a {kind} URL" in "\n".join(info.value.lines)


def test_bad_files_and_cross_checks(tmp_path: Path) -> None:
    with pytest.raises(settings.SettingsError, match="cannot read"):
        settings.load(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("foundry: [unclosed\n")
    with pytest.raises(settings.SettingsError, match="not valid YAML"):
        settings.load(bad, environ={})
    with pytest.raises(settings.SettingsError, match=r"budgets\.redisUrl is required"):
        settings.load(environ={"KARS_BUDGETS_STORE": "redis"})
    with pytest.raises(settings.SettingsError, match="is not a directory"):
        settings.load(environ={"KARS_POLICY_DIR": str(tmp_path / "nope")})
    with pytest.raises(settings.SettingsError, match="is not NAMESPACE/NAME"):
        settings.load(environ={"KARS_SERVER_SANDBOX": "just-a-name"})


def test_env_names_cover_the_spec_table() -> None:
    names = settings.env_names()
    for var in (
        "KARS_FOUNDRY_ENDPOINT",
        "KARS_FOUNDRY_API_KEY_FILE",
        "KARS_FOUNDRY_CREDENTIAL",
        "KARS_FOUNDRY_SCOPE",
        "KARS_BUDGETS_STORE",
        "KARS_BUDGETS_SQLITE_PATH",
        "KARS_BUDGETS_REDIS_URL",
        "KARS_SAFETY_CONTENT_SAFETY_ENDPOINT",
        "KARS_SAFETY_CONTENT_SAFETY_KEY_FILE",
        "KARS_IDENTITY_JWKS_URL",
        "KARS_IDENTITY_ISSUER",
        "KARS_IDENTITY_AUDIENCE",
        "KARS_IDENTITY_DEV_KEY_FILE",
        "KARS_IDENTITY_TRUSTED_PROXIES",
        "KARS_ADMIN_TOKEN_FILE",
        "KARS_MESH_RELAY_URL",
        "KARS_MESH_PAIR_TIMEOUT_S",
        "KARS_LIMITS_MAX_BODY_BYTES",
        "KARS_A2A_JKU_ALLOWED_HOSTS",
        "KARS_A2A_MAX_CARD_BYTES",
        "KARS_A2A_PUBLIC_URLS",
    ):
        assert var in names, var
    assert settings.load(environ={"KARS_A2A_MAX_CARD_BYTES": "2048"}).a2a.max_card_bytes == 2048
