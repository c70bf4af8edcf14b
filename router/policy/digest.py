"""Content digests of policy resources, shared by the router and the controller.

The digest covers what the router acts on: kind, namespace, name, labels and the spec after
validation (defaults filled in), serialised with RFC 8785 (JCS). The controller computes the
same digest for what it projects and marks a CR Ready only when the router reports it, so
both sides must use this function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import rfc8785

from router.policy import model


def canonical(resource: model.Resource) -> dict[str, object]:
    """The normalised JSON form of a resource, as the controller projects it."""
    metadata: dict[str, object] = {"name": resource.metadata.name}
    if not resource.cluster_scoped:
        metadata["namespace"] = resource.namespace
    if resource.metadata.labels:
        metadata["labels"] = dict(resource.metadata.labels)
    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": metadata,
        "spec": resource.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def of_resource(resource: model.Resource) -> str:
    payload: bytes = rfc8785.dumps(canonical(resource))  # type: ignore[arg-type]
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def of_digests(digests: Iterable[str]) -> str:
    """Digest of a set of resource digests (order-independent): the per-kind digest."""
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d.encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()
