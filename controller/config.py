"""Controller settings: what the ``kars controller`` command line and the chart configure.

Values come from command-line flags (the chart sets them as container args), so nothing
here reads the environment. Keyword-only, validated, with named defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TOKEN_AUDIENCE = "kars-router"
TOKEN_EXPIRATION_S = 3600
ROUTER_POLL_S = 5.0
ROUTER_POLL_MAX_S = 60.0
LIFECYCLE_CHECK_S = 10.0
PROJECTION_DEBOUNCE_S = 0.05
SANDBOX_PORT = 8080
SANDBOX_UID = 1000


class SandboxDefaults(BaseModel):
    """What a KarsSandbox gets when its spec leaves it out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_limit: str = "1"
    memory_limit: str = "1Gi"
    cpu_request: str = "100m"
    memory_request: str = "256Mi"
    ephemeral_storage_limit: str = "1Gi"
    tmp_size_limit: str = "256Mi"
    port: int = Field(default=SANDBOX_PORT, ge=1, le=65535)
    # Seccomp: RuntimeDefault, or a Localhost profile path relative to the kubelet's seccomp root.
    seccomp_profile: str | None = None
    token_expiration_s: int = Field(default=TOKEN_EXPIRATION_S, ge=600)
    token_audience: str = Field(default=TOKEN_AUDIENCE, min_length=1)  # the router's identity.audience
    restart_policy: Literal["OnFailure", "Never"] = "OnFailure"


class ControllerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    namespaces: tuple[str, ...] = ()  # empty: every namespace (--all-namespaces)
    policy_namespace: str = "kars-system"  # where the projection ConfigMap lives
    policy_configmap: str = "kars-policy"
    router_url: str | None = None  # the router's admin base URL, polled for /internal/policy-status
    router_replicas_url: str | None = None  # a headless Service's URL instead: every replica is polled
    router_url_for_sandboxes: str | None = None  # injected into sandboxes as KARS_ROUTER_URL
    admin_token_file: Path | None = None
    router_poll_s: float = Field(default=ROUTER_POLL_S, gt=0)
    router_poll_max_s: float = Field(default=ROUTER_POLL_MAX_S, gt=0)
    lifecycle_check_s: float = Field(default=LIFECYCLE_CHECK_S, gt=0)
    projection_debounce_s: float = Field(default=PROJECTION_DEBOUNCE_S, ge=0)
    api_server: str | None = None  # explicit API server URL (kubectl proxy, tests); else in-cluster/kubeconfig
    sandbox: SandboxDefaults = Field(default_factory=SandboxDefaults)

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces
