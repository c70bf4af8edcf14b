"""The principal a request is attributed to."""

from __future__ import annotations

import dataclasses
from typing import Literal

PrincipalKind = Literal["sandbox", "agent", "admin"]
Mode = Literal["sidecar", "service-account", "router-token", "trusted-proxy", "signed-request", "admin"]


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    id: str  # "namespace/name" for sandboxes and agents
    mode: Mode

    @property
    def namespace(self) -> str:
        return self.id.partition("/")[0] if "/" in self.id else ""

    @property
    def name(self) -> str:
        return self.id.partition("/")[2] if "/" in self.id else self.id


ADMIN = Principal("admin", "admin", "admin")
