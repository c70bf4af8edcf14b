"""Router settings: one YAML file, each key overridable by a ``KARS_*`` environment variable.

The key ``foundry.apiKeyFile`` is overridden by ``KARS_FOUNDRY_API_KEY_FILE`` (SPEC.md §0):
``KARS_`` + the key path in upper snake case. Environment values are read as YAML scalars,
so ``KARS_IDENTITY_TRUSTED_PROXIES='[10.0.0.0/8]'`` and ``KARS_LIMITS_MAX_BODY_BYTES=1024``
work. This is the only module that reads ``os.environ``, once, at start. Everything is
validated before the router starts; every problem is reported as ``key.path: message``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic
import re2
import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from router import _validation
from router.policy import model

ENV_PREFIX = "KARS_"
DEFAULT_PORT = 8443
MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_SCOPE = "https://cognitiveservices.azure.com/.default"


class SettingsError(Exception):
    """Settings that cannot be used; ``lines`` holds one ``key.path: message`` per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True, strict=False
    )


def check_sandbox(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value):
        raise ValueError(f"{value!r} is not NAMESPACE/NAME")
    return value


SandboxId = Annotated[str, pydantic.AfterValidator(check_sandbox)]


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a CIDR") from exc
    return value


Cidr = Annotated[str, pydantic.AfterValidator(_check_cidr)]


def _check_base_url(value: str) -> str:
    """An absolute http(s) URL with no query or fragment, kept without its trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{value!r} is not an http(s) base URL (scheme://host[:port][/prefix])")
    return value.rstrip("/")


BaseUrl = Annotated[str, pydantic.AfterValidator(_check_base_url)]


def _url_of(*schemes: str) -> pydantic.AfterValidator:
    """An absolute URL with one of ``schemes`` and a host: refused at start, not at the first call."""

    def check(value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"{value!r} is not a {'/'.join(schemes)} URL (scheme://host[:port]/...)")
        return value

    return pydantic.AfterValidator(check)


HttpUrl = Annotated[str, _url_of("http", "https")]
WsUrl = Annotated[str, _url_of("ws", "wss")]
RedisUrl = Annotated[str, _url_of("redis", "rediss", "unix")]


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    sandbox: SandboxId | None = None  # sidecar mode: every local caller is this sandbox
    gc_threshold: int = Field(default=10_000, ge=0)  # router.gc_tuning; 0 keeps Python's 700
    gc_freeze: bool = True  # router.gc_tuning: the start-up heap out of the collector's walks


class PolicySettings(_Section):
    dir: Path | None = None
    watch: bool = True


class FoundrySettings(_Section):
    endpoint: HttpUrl | None = None
    api_key_file: Path | None = None
    credential: Literal["workload", "managed", "default", "none"] | None = None
    scope: str = DEFAULT_SCOPE
    connect_timeout_s: float = Field(default=5.0, gt=0)  # to open a connection to the endpoint
    read_timeout_s: float = Field(default=300.0, gt=0)  # for the response headers, then between chunks

    @property
    def effective_credential(self) -> str:
        if self.credential is not None:
            return self.credential
        return "none" if self.api_key_file is not None else "default"


class BudgetSettings(_Section):
    store: Literal["memory", "sqlite", "redis"] = "sqlite"
    sqlite_path: Path = Path("./kars-budgets.db")
    redis_url: RedisUrl | None = None

    @pydantic.model_validator(mode="after")
    def _redis_needs_url(self) -> BudgetSettings:
        if self.store == "redis" and not self.redis_url:
            raise ValueError("budgets.redisUrl is required when budgets.store is redis")
        return self


class Blocklist(_Section):
    name: str
    terms: list[str] = Field(default_factory=list)
    regexes: list[str] = Field(default_factory=list)

    @pydantic.field_validator("regexes")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        # RE2 syntax: matching must stay linear in the prompt's length (router/safety/local.py).
        options = re2.Options()
        options.log_errors = False
        for pattern in value:
            try:
                re2.compile(pattern, options=options)
            except re2.error as exc:
                reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
                raise ValueError(
                    f"regex {pattern!r} is not RE2 syntax (no backreferences or lookaround): {reason}"
                ) from None
        return value


class LocalFloor(_Section):
    prompt_injection: bool = True
    blocklists: list[Blocklist] = Field(default_factory=list)


class SafetySettings(_Section):
    floor: model.SafetyFloor = Field(default_factory=model.SafetyFloor)
    content_safety_endpoint: HttpUrl | None = None
    content_safety_key_file: Path | None = None
    # azure-identity credential for Content Safety when there is no key file
    content_safety_credential: Literal["workload", "managed", "default"] = "default"
    content_safety_timeout_s: float = Field(default=5, gt=0)  # connect, then the reply
    local_floor: LocalFloor = Field(default_factory=LocalFloor)


class IdentitySettings(_Section):
    jwks_url: HttpUrl | None = None
    jwks_ca_file: Path | None = None  # CA bundle for the JWKS endpoint (the cluster CA in-cluster)
    jwks_token_file: Path | None = None  # bearer for the JWKS endpoint (the router's own SA token)
    issuer: str | None = None
    audience: str = "kars-router"
    dev_key_file: Path = Path("./kars-dev-key.pem")
    dev_sandbox: SandboxId | None = "default/dev"  # the sandbox `kars router` prints a dev token for
    trusted_proxies: list[Cidr] = Field(default_factory=list)


class AdminSettings(_Section):
    token_file: Path | None = None


class MeshSettings(_Section):
    relay_url: WsUrl | None = None
    pair_timeout_s: float = Field(default=30, gt=0)


class A2ASettings(_Section):
    """A2A proxy (SPEC.md §5). A signed card's ``jku`` is accepted only as https on one of these hosts.

    ``publicUrls``: the router's base URLs as callers reach it (``https://agents.example.com``, behind a
    gateway that terminates TLS). When set, a signed request's ``aud`` must be one of them + the route
    path, and the ``Host`` header plays no part; when empty (development, loopback), ``aud`` is checked
    against the request's own scheme and ``Host``.
    """

    jku_allowed_hosts: list[str] = Field(default_factory=list)
    public_urls: list[BaseUrl] = Field(default_factory=list)
    upstream_connect_timeout_s: float = Field(default=5, gt=0)
    upstream_read_timeout_s: float = Field(default=300, gt=0)  # for headers, then between two chunks
    max_card_bytes: int = Field(default=1024 * 1024, ge=1024)  # a bigger agent card is refused (502)


class LimitSettings(_Section):
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, ge=1)


class McpSettings(_Section):
    """MCP gateway (SPEC.md §4). ``auth.bearerFromSecret: NAME`` of an McpServer reads the file
    ``secretsDir/NAME`` (a mounted Secret): its content is sent upstream as ``Bearer``."""

    secrets_dir: Path | None = None
    session_idle_timeout_s: float = Field(default=900, gt=0)  # a session with no traffic and no stream ends
    max_sessions_per_principal: int = Field(default=64, ge=1)
    keep_alive_s: float = Field(default=15, gt=0)  # SSE comment interval on idle streams
    replay_events: int = Field(default=256, ge=1)  # events kept per stream for Last-Event-ID
    allowed_origins: list[str] = Field(default_factory=list)  # besides loopback; "http://host:*" allowed
    audit_arguments: bool = False  # log tools/call argument values (names only when false)
    upstream_connect_timeout_s: float = Field(default=5, gt=0)
    upstream_read_timeout_s: float = Field(default=300, gt=0)


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = True


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    foundry: FoundrySettings = Field(default_factory=FoundrySettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    mesh: MeshSettings = Field(default_factory=MeshSettings)
    mcp: McpSettings = Field(default_factory=McpSettings)
    a2a: A2ASettings = Field(default_factory=A2ASettings, alias="a2a")  # to_camel would say "a2A": KARS_A2_A_...
    limits: LimitSettings = Field(default_factory=LimitSettings)
    log: LogSettings = Field(default_factory=LogSettings)


# -- loading --------------------------------------------------------------------------------


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _leaf_paths(cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every settable key path, as camelCase aliases (``("foundry", "apiKeyFile")``)."""
    for name, field in cls.model_fields.items():
        alias = field.alias or name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_paths(annotation, (*prefix, alias))
        else:
            yield (*prefix, alias)


def env_names() -> dict[str, tuple[str, ...]]:
    """``KARS_FOUNDRY_API_KEY_FILE`` -> ``("foundry", "apiKeyFile")``, for every key."""
    return {ENV_PREFIX + "_".join(_upper_snake(p) for p in path): path for path in _leaf_paths(Settings)}


def _text_paths() -> set[tuple[str, ...]]:
    """Key paths whose value is a plain string or path: their env values are taken verbatim."""
    out = set()
    for path in _leaf_paths(Settings):
        cls: type[BaseModel] = Settings
        for part in path[:-1]:
            cls = next(f.annotation for f in cls.model_fields.values() if (f.alias or "") == part)  # type: ignore[assignment]
        field = next(f for f in cls.model_fields.values() if f.alias == path[-1])
        if field.annotation is not None and _is_text(field.annotation):
            out.add(path)
    return out


def _is_text(annotation: Any) -> bool:
    """``str``, ``Path``, optional or constrained (``Annotated``) ones; not a list of them."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_text(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return all(a is type(None) or _is_text(a) for a in typing.get_args(annotation))
    return annotation in (str, Path)


def _env_value(raw: str, *, text: bool) -> Any:
    if raw == "":
        return None
    if text:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[path[-1]] = value


def load(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> Settings:
    """File, then ``KARS_*`` environment, then explicit overrides (CLI flags), validated."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    tree: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError([f"{config_file}: cannot read: {exc.strerror or exc}"]) from exc
        except yaml.YAMLError as exc:
            raise SettingsError([f"{config_file}: not valid YAML: {' '.join(str(exc).split())}"]) from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SettingsError([f"{config_file}: expected a mapping at the top level"])
        tree = data

    known = env_names()
    text_paths = _text_paths()
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        path = known.get(var)
        if path is None:
            close = difflib.get_close_matches(var, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{var}: unknown setting{hint}")
            continue
        _set_path(tree, path, _env_value(raw, text=path in text_paths))

    for path, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, path, value)

    try:
        settings = Settings.model_validate(tree)
    except pydantic.ValidationError as exc:
        problems.extend(_validation.messages(exc))
        raise SettingsError(problems) from None
    if problems:
        raise SettingsError(problems)
    if settings.policy.dir is not None and not settings.policy.dir.is_dir():
        raise SettingsError([f"policy.dir: {settings.policy.dir} is not a directory"])
    return settings
