"""TrustGraph edges: the exact signed bytes of SPEC.md §3 and their verification at load.

An edge counts only if the ``from`` vertex's Ed25519 key signed
``"trustgraph.v1\\n" + from + "\\n" + to + "\\n" + score + "\\n" + issuedAt + "\\n" + notAfter + "\\n"``
(``notAfter`` empty when absent), its score reaches the graph's ``minScore`` and it has not
expired. Signatures and scores are checked once, when a graph is loaded; expiry is checked at
each decision because time moves on between reloads.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from router.policy import model

SIGNING_CONTEXT = "trustgraph.v1"


@dataclasses.dataclass(frozen=True, slots=True)
class TrustEdge:
    source: str
    target: str
    score: int
    not_after: dt.datetime | None
    graph: str

    def live(self, now: dt.datetime) -> bool:
        return self.not_after is None or now < self.not_after


@dataclasses.dataclass(frozen=True, slots=True)
class DroppedEdge:
    graph: str
    source: str
    target: str
    reason: str

    def __str__(self) -> str:
        return f"edge {self.source} -> {self.target} dropped: {self.reason}"


def signing_input(edge: model.Edge) -> bytes:
    return (
        f"{SIGNING_CONTEXT}\n{edge.from_}\n{edge.to}\n{edge.score}\n{edge.issued_at}\n{edge.not_after or ''}\n"
    ).encode()


def _b64u(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def verify(graph: model.TrustGraph, now: dt.datetime) -> tuple[list[TrustEdge], list[DroppedEdge]]:
    """The edges of ``graph`` that count, and the ones dropped with the reason why."""
    keys = {v.id: ed25519.Ed25519PublicKey.from_public_bytes(_b64u(v.public_key_b64u)) for v in graph.spec.vertices}
    kept: list[TrustEdge] = []
    dropped: list[DroppedEdge] = []
    name = graph.metadata.name
    for edge in graph.spec.edges:

        def drop(reason: str, edge: model.Edge = edge) -> None:
            dropped.append(DroppedEdge(name, edge.from_, edge.to, reason))

        key = keys.get(edge.from_)
        if key is None:
            drop(f"no vertex {edge.from_!r} to verify it")
            continue
        try:
            key.verify(_b64u(edge.signature), signing_input(edge))
        except (InvalidSignature, ValueError):
            drop("signature does not verify")
            continue
        if edge.score < graph.spec.min_score:
            drop(f"score {edge.score} below minScore {graph.spec.min_score}")
            continue
        not_after = model.parse_timestamp(edge.not_after) if edge.not_after else None
        if not_after is not None and not_after <= now:
            drop(f"expired at {edge.not_after}")
            continue
        kept.append(TrustEdge(edge.from_, edge.to, edge.score, not_after, name))
    return kept, dropped
