"""Building signed TrustGraph policy files for tests: real Ed25519 keys, the exact SPEC.md §3 bytes."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from router.policy import model, trustgraph


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def iso(ts: dt.datetime) -> str:
    return ts.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass
class Graph:
    """A graph under construction: ``edge(a, b)`` signs with ``a``'s key (created on first use)."""

    name: str = "mesh"
    min_score: int = 500
    keys: dict[str, ed25519.Ed25519PrivateKey] = dataclasses.field(default_factory=dict)
    edges: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def key(self, vertex: str) -> ed25519.Ed25519PrivateKey:
        if vertex not in self.keys:
            self.keys[vertex] = ed25519.Ed25519PrivateKey.generate()
        return self.keys[vertex]

    def edge(
        self,
        source: str,
        target: str,
        *,
        score: int = 800,
        not_after: dt.datetime | None = None,
        signer: str | None = None,
        both: bool = False,
    ) -> Graph:
        self.key(source)
        self.key(target)
        spec: dict[str, Any] = {
            "from": source,
            "to": target,
            "score": score,
            "issuedAt": iso(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)),
        }
        if not_after is not None:
            spec["notAfter"] = iso(not_after)
        parsed = model.Edge.model_validate({**spec, "signature": "x"})
        spec["signature"] = b64u(self.key(signer or source).sign(trustgraph.signing_input(parsed)))
        self.edges.append(spec)
        if both:
            self.edge(target, source, score=score, not_after=not_after)
        return self

    def without(self, source: str, target: str) -> Graph:
        self.edges = [e for e in self.edges if (e["from"], e["to"]) != (source, target)]
        return self

    def document(self) -> dict[str, Any]:
        vertices = [
            {
                "id": v,
                "alg": "EdDSA",
                "publicKeyB64u": b64u(
                    k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                ),
            }
            for v, k in self.keys.items()
        ]
        return {
            "apiVersion": model.API_VERSION,
            "kind": "TrustGraph",
            "metadata": {"name": self.name},
            "spec": {"vertices": vertices, "edges": self.edges, "minScore": self.min_score},
        }

    def write(self, policy_dir: Path) -> Path:
        path = policy_dir / f"trustgraph-{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.document()))
        tmp.replace(path)  # atomic: the watcher never reads half a file
        return path
