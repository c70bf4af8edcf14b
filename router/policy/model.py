"""The policy resources of SPEC.md §3 as strict, immutable pydantic models.

These models are the single source of truth for the shape of policy: the router validates
files and projections with them, and the controller generates the CRD schemas from them.
Validation is strict: an unknown field, a wrong type or a value outside an enum is an error,
never coerced. Pure data: nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import itertools
import re
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_GROUP = "kars.azure.com"
API_VERSION = f"{API_GROUP}/v1alpha1"

Severity = Literal["Safe", "Low", "Medium", "High"]
SEVERITY_RANK: dict[str, int] = {"Safe": 0, "Low": 1, "Medium": 2, "High": 3}

Action = Literal["chat", "responses", "embeddings", "image", "*"]

# RFC 1123 subdomain, as Kubernetes requires of object names.
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

PositiveTokens = Annotated[int, Field(ge=1)]


class Strict(BaseModel):
    """Base of every spec model: camelCase on the wire, unknown fields refused, frozen."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
    )


def _b64u_decode(value: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not valid base64url") from exc


# RFC 3339 §5.6 date-time, as the API server's date-time format reads it: "T" and "Z" in either
# case, seconds required, a fraction of any length, an offset required.
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def parse_timestamp(value: str) -> dt.datetime:
    """RFC 3339 timestamp with an explicit offset (``Z`` or ``+hh:mm``)."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        if _RFC3339.fullmatch(value + "Z"):
            raise ValueError(f"timestamp needs a UTC offset: {value!r}")
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    day, time, fraction, offset = match.groups()
    fraction = (fraction or "")[:7]  # Python keeps microseconds: the rest is cut, not refused
    try:
        return dt.datetime.fromisoformat(f"{day}T{time}{fraction}{'+00:00' if offset in 'Zz' else offset}")
    except ValueError as exc:  # 2030-02-30, 25:00:00, ...
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}") from exc


def _check_timestamp(value: str | None) -> str | None:
    if value is not None:
        parse_timestamp(value)
    return value


Timestamp = Annotated[str, pydantic.AfterValidator(_check_timestamp)]


def _check_labels(value: dict[str, str] | None) -> dict[str, str] | None:
    for key, val in (value or {}).items():
        if not key or len(key) > 317:
            raise ValueError(f"invalid label key {key!r}")
        if len(val) > 63 or not _LABEL_VALUE_RE.match(val):
            raise ValueError(f"invalid label value {val!r} for {key!r}")
    return value


Labels = Annotated[dict[str, str], pydantic.AfterValidator(_check_labels)]


# -- metadata ------------------------------------------------------------------------------


class Metadata(BaseModel):
    """Kubernetes object metadata. Kubernetes owns this object, so fields we do not use
    (uid, resourceVersion, managedFields, ...) are ignored rather than refused."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, populate_by_name=True)

    name: str = Field(max_length=253)
    namespace: str | None = Field(default=None, max_length=63)
    labels: Labels = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @pydantic.field_validator("name", "namespace")
    @classmethod
    def _dns_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid Kubernetes name (lowercase RFC 1123)")
        return value


# -- InferencePolicy ------------------------------------------------------------------------


class InferenceAppliesTo(Strict):
    sandbox_name: str | None = None
    sandbox_match_labels: Labels | None = None
    action: Action = "*"


class TokenBudget(Strict):
    per_request_tokens: PositiveTokens | None = None
    hourly_tokens: PositiveTokens | None = None
    daily_tokens: PositiveTokens | None = None
    monthly_tokens: PositiveTokens | None = None
    scope: Literal["sandbox", "namespace", "cluster"] = "sandbox"
    reject_on_exceed: bool = True
    # The budget store unreachable: false (default) refuses with 503 budget_store_unavailable;
    # true forwards the request uncounted. Fails open only if every budget that applies says so.
    fail_open: bool = False

    @pydantic.model_validator(mode="after")
    def _windows_nest(self) -> TokenBudget:
        # A longer window can never hold less than a shorter one (CEL mirrors this in the CRD).
        ordered = [
            ("hourlyTokens", self.hourly_tokens),
            ("dailyTokens", self.daily_tokens),
            ("monthlyTokens", self.monthly_tokens),
        ]
        present = [(n, v) for n, v in ordered if v is not None]
        for (short_name, short), (long_name, long) in itertools.pairwise(present):
            if long < short:
                raise ValueError(f"{long_name} ({long}) must be >= {short_name} ({short})")
        if self.per_request_tokens is not None and present:
            smallest_name, smallest = present[0]
            if self.per_request_tokens > smallest:
                raise ValueError(
                    f"perRequestTokens ({self.per_request_tokens}) must be <= {smallest_name} ({smallest})"
                )
        return self


class ContentSafety(Strict):
    hate: Severity | None = None
    self_harm: Severity | None = None
    sexual: Severity | None = None
    violence: Severity | None = None
    require_prompt_shields: bool = False
    fail_open: bool = False


class DeploymentRef(Strict):
    deployment: str = Field(min_length=1, max_length=256)


class ModelPreference(Strict):
    primary: DeploymentRef
    fallback: list[DeploymentRef] = Field(default_factory=list)


class InferencePolicySpec(Strict):
    applies_to: InferenceAppliesTo = Field(default_factory=InferenceAppliesTo)
    token_budget: TokenBudget | None = None
    content_safety: ContentSafety | None = None
    model_preference: ModelPreference | None = None


# -- ToolPolicy -----------------------------------------------------------------------------


class ToolAppliesTo(Strict):
    mcp_server: str = Field(min_length=1)
    tool: str = Field(default="*", min_length=1)
    sandbox_match_labels: Labels | None = None


class RateLimit(Strict):
    rps: float = Field(gt=0)
    burst: int = Field(default=1, ge=1)


class ToolPolicySpec(Strict):
    applies_to: ToolAppliesTo
    decision: Literal["allow", "deny"]
    rate_limit: RateLimit | None = None


# -- McpServer ------------------------------------------------------------------------------


def _check_http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


HttpUrl = Annotated[str, pydantic.AfterValidator(_check_http_url)]


class LabelSelector(Strict):
    match_labels: Labels = Field(default_factory=dict)


class McpAuth(Strict):
    bearer_from_secret: str | None = None


class McpServerSpec(Strict):
    url: HttpUrl
    transport: Literal["streamable-http", "sse"] = "streamable-http"
    allowed_sandboxes: LabelSelector | None = None
    auth: McpAuth | None = None
    allowed_tools: list[str] = Field(default_factory=lambda: ["*"])


# -- A2AAgent -------------------------------------------------------------------------------


class SigningKey(Strict):
    kid: str = Field(min_length=1)
    alg: Literal["EdDSA", "ES256"]
    # Spelled as SPEC.md writes it (to_camel would give "publicKeyB64U").
    public_key_b64u: str | None = Field(default=None, alias="publicKeyB64u")
    jwk: dict[str, str] | None = None
    not_after: Timestamp | None = None

    @pydantic.model_validator(mode="after")
    def _one_key(self) -> SigningKey:
        if (self.public_key_b64u is None) == (self.jwk is None):
            raise ValueError("exactly one of publicKeyB64u and jwk is required")
        if self.public_key_b64u is not None:
            raw = _b64u_decode(self.public_key_b64u)
            want = 32 if self.alg == "EdDSA" else 65
            if len(raw) != want:
                raise ValueError(f"publicKeyB64u for {self.alg} must decode to {want} bytes, got {len(raw)}")
        if self.jwk is not None:
            kty, crv = self.jwk.get("kty"), self.jwk.get("crv")
            expected = ("OKP", "Ed25519") if self.alg == "EdDSA" else ("EC", "P-256")
            if (kty, crv) != expected:
                raise ValueError(f"jwk for {self.alg} must have kty={expected[0]} crv={expected[1]}")
            if "d" in self.jwk:
                raise ValueError("jwk holds a private key ('d'); publish the public key only")
        return self


class A2ATrust(Strict):
    require_signed_requests: bool = False
    max_clock_skew_seconds: int = Field(default=60, ge=0, le=3600)


class A2AAgentSpec(Strict):
    endpoint_url: HttpUrl
    signing_keys: list[SigningKey] = Field(default_factory=list)
    trust: A2ATrust = Field(default_factory=A2ATrust)


# -- TrustGraph -----------------------------------------------------------------------------


class Vertex(Strict):
    id: str = Field(min_length=1)
    alg: Literal["EdDSA"] = "EdDSA"
    public_key_b64u: str = Field(alias="publicKeyB64u")

    @pydantic.field_validator("public_key_b64u")
    @classmethod
    def _ed25519(cls, value: str) -> str:
        if len(_b64u_decode(value)) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        return value


class Edge(Strict):
    from_: str = Field(alias="from", min_length=1)
    to: str = Field(min_length=1)
    score: int = Field(ge=0, le=1000)
    issued_at: Timestamp
    not_after: Timestamp | None = None
    signature: str = Field(min_length=1)


class TrustGraphSpec(Strict):
    vertices: list[Vertex] = Field(default_factory=list)
    edges: list[Edge] = Field(default_factory=list)
    min_score: int = Field(default=0, ge=0, le=1000)

    @pydantic.model_validator(mode="after")
    def _one_key_a_vertex(self) -> TrustGraphSpec:
        seen: set[str] = set()
        for vertex in self.vertices:
            if vertex.id in seen:
                raise ValueError(f"vertex {vertex.id!r} is listed twice: a vertex has one key")
            seen.add(vertex.id)
        return self


# -- KarsSandbox ----------------------------------------------------------------------------


class EnvVar(Strict):
    name: str = Field(min_length=1)
    value: str = ""


def _quantity(value: Any) -> Any:
    """A Kubernetes quantity may be written as a number (``cpu: 1``): it is kept as its text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


Quantity = Annotated[str, pydantic.BeforeValidator(_quantity)]  # int-or-string in the CRD


class ResourceList(Strict):
    cpu: Quantity | None = None
    memory: Quantity | None = None


class Resources(Strict):
    limits: ResourceList = Field(default_factory=ResourceList)
    requests: ResourceList = Field(default_factory=ResourceList)


class PolicyRef(Strict):
    kind: Literal["InferencePolicy", "ToolPolicy", "McpServer", "A2AAgent"]
    name: str


class SandboxIdentity(Strict):
    client_id: str


class Lifecycle(Strict):
    shutdown_time: Timestamp | None = None
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)


class KarsSandboxSpec(Strict):
    image: str = Field(min_length=1)
    runtime: str | None = None
    resources: Resources = Field(default_factory=Resources)
    env: list[EnvVar] = Field(default_factory=list)
    policy_refs: list[PolicyRef] = Field(default_factory=list)
    identity: SandboxIdentity | None = None
    lifecycle: Lifecycle = Field(default_factory=Lifecycle)
    replicas: Literal[0, 1] = 1


# -- the resources --------------------------------------------------------------------------


class Resource(BaseModel):
    """One policy object: ``apiVersion``, ``kind``, ``metadata``, ``spec``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    cluster_scoped: ClassVar[bool] = False

    api_version: Literal["kars.azure.com/v1alpha1"] = Field(alias="apiVersion")
    kind: str
    metadata: Metadata
    spec: Any

    @pydantic.model_validator(mode="after")
    def _scope(self) -> Resource:
        if self.cluster_scoped and self.metadata.namespace is not None:
            raise ValueError(f"{self.kind} is cluster-scoped: metadata.namespace must be absent")
        return self

    @property
    def namespace(self) -> str:
        """The object's namespace; ``default`` when a namespaced file leaves it out (kubectl's rule)."""
        if self.cluster_scoped:
            return ""
        return self.metadata.namespace or "default"

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.metadata.name)


class InferencePolicy(Resource):
    kind: Literal["InferencePolicy"]
    spec: InferencePolicySpec


class ToolPolicy(Resource):
    kind: Literal["ToolPolicy"]
    spec: ToolPolicySpec


class McpServer(Resource):
    kind: Literal["McpServer"]
    spec: McpServerSpec


class A2AAgent(Resource):
    kind: Literal["A2AAgent"]
    spec: A2AAgentSpec


class TrustGraph(Resource):
    cluster_scoped: ClassVar[bool] = True
    kind: Literal["TrustGraph"]
    spec: TrustGraphSpec


# RFC 1035 label: a KarsSandbox's name is its Service's (and a label value), so it must be one.
SANDBOX_NAME_RE = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
SANDBOX_NAME_MAX = 63
# A sandbox's ServiceAccount is named after it, and every namespace already has a ServiceAccount
# "default" that the sandbox does not own: such a sandbox could never get its own and never run.
SANDBOX_NAMES_RESERVED = ("default",)


class KarsSandbox(Resource):
    kind: Literal["KarsSandbox"]
    spec: KarsSandboxSpec

    @pydantic.model_validator(mode="after")
    def _dns_label_name(self) -> KarsSandbox:
        name = self.metadata.name
        if len(name) > SANDBOX_NAME_MAX or not re.match(SANDBOX_NAME_RE, name):
            raise ValueError(
                f"metadata.name {name!r}: a KarsSandbox names its Service, so its name must be an RFC 1035 "
                f"label (lower-case letters, digits and '-', starting with a letter, at most {SANDBOX_NAME_MAX})"
            )
        if name in SANDBOX_NAMES_RESERVED:
            raise ValueError(
                f"metadata.name {name!r}: a KarsSandbox names its ServiceAccount, and every namespace "
                "already has a ServiceAccount 'default' that is not the sandbox's; choose another name"
            )
        return self


KINDS: dict[str, type[Resource]] = {
    cls.model_fields["kind"].annotation.__args__[0]: cls  # type: ignore[union-attr]
    for cls in (InferencePolicy, ToolPolicy, McpServer, A2AAgent, TrustGraph, KarsSandbox)
}


def cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR as settings and policy write it (``10.0.0.0/8``, ``::1/128``)."""
    return ipaddress.ip_network(value, strict=False)


class SafetyFloor(Strict):
    """The cluster's content-safety minimum (router config, owned by the platform operator)."""

    hate: Severity = "Medium"
    self_harm: Severity = "Medium"
    sexual: Severity = "Medium"
    violence: Severity = "Medium"
    allow_fail_open: bool = False

    def loosened_by(self, policy: ContentSafety) -> list[str]:
        """The fields of ``policy`` that would loosen this floor, each with the reason."""
        problems = []
        for field in ("hate", "self_harm", "sexual", "violence"):
            wanted = getattr(policy, field)
            floor = getattr(self, field)
            if wanted is not None and SEVERITY_RANK[wanted] > SEVERITY_RANK[floor]:
                problems.append(
                    f"spec.contentSafety.{to_camel(field)}: {wanted} is looser than the cluster floor ({floor})"
                )
        if policy.fail_open and not self.allow_fail_open:
            problems.append("spec.contentSafety.failOpen: the cluster floor does not allow failOpen")
        return problems
