"""Compile policy CRs into the router's projection, and judge readiness from the router's report.

The projection is one JSON file per kind (a Kubernetes ``List``, which the router's loader
reads as its items), holding each resource in ``digest.canonical`` form, so the digest the
controller expects is exactly the one the router reports (SPEC.md §3).

A CR that fails validation is projected *as written* rather than dropped: the router then
keeps the last good version of it and reports its ``lastError``; dropping it would delete
the policy in force (a deny rule vanishing is a fail-open). Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from router.policy import digest, load, model

Key = tuple[str, str, str]  # (kind, namespace or "", name), as the router keys resources
Body = Mapping[str, Any]

PLURALS: dict[str, str] = {
    "InferencePolicy": "inferencepolicies",
    "ToolPolicy": "toolpolicies",
    "McpServer": "mcpservers",
    "A2AAgent": "a2aagents",
    "TrustGraph": "trustgraphs",
    "KarsSandbox": "karssandboxes",
}
DIGEST_ANNOTATION = "kars.azure.com/digest"


def key_of(body: Body) -> Key:
    meta = body.get("metadata", {})
    kind = str(body.get("kind", ""))
    cls = model.KINDS.get(kind)
    namespace = "" if cls is not None and cls.cluster_scoped else str(meta.get("namespace") or "default")
    return (kind, namespace, str(meta.get("name", "")))


def file_name(kind: str) -> str:
    return f"{PLURALS[kind]}.json"


@dataclasses.dataclass(frozen=True, slots=True)
class Compiled:
    files: dict[str, str]  # ConfigMap data: file name -> JSON text
    digests: dict[Key, str]  # valid resources -> the digest the router must report
    errors: dict[Key, str]  # invalid resources -> why
    digest: str  # of the whole projection (a ConfigMap annotation)


def as_written(body: Body) -> dict[str, Any]:
    """The fields the router reads, without the server-owned metadata (uid, managedFields...)."""
    meta = body.get("metadata", {})
    kept: dict[str, Any] = {"name": meta.get("name")}
    if meta.get("namespace"):
        kept["namespace"] = meta["namespace"]
    if meta.get("labels"):
        kept["labels"] = dict(meta["labels"])
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": kept, "spec": body.get("spec")}


def for_router(written: dict[str, Any]) -> dict[str, Any]:
    """What the router gets of a CR. Of a KarsSandbox it needs the labels (for
    ``sandboxMatchLabels``), not its env, image or identity: those stay in the tenant's
    namespace instead of being copied into the platform's ConfigMap."""
    if written.get("kind") != "KarsSandbox":
        return written
    spec = written.get("spec")
    slim = {k: spec[k] for k in ("image", "replicas") if k in spec} if isinstance(spec, dict) else spec
    return {**written, "spec": slim}


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    item: dict[str, Any]  # what goes into the kind's file
    digest: str | None  # None: invalid
    error: str | None


Cache = dict[Key, tuple[str, _Entry]]  # key -> (the CR as written, JSON, its compiled entry)


def _compile_one(key: Key, written: dict[str, Any]) -> _Entry:
    parsed = load.parse_document(written, load.Source("/".join(k for k in key if k), 1))
    if isinstance(parsed, load.DocError):
        return _Entry(written, None, parsed.summary())
    return _Entry(digest.canonical(parsed.resource), digest.of_resource(parsed.resource), None)


def compile_resources(bodies: Iterable[Body], cache: Cache | None = None) -> Compiled:
    """The projection of ``bodies``. With a ``cache`` (kept by the caller between calls), a CR
    whose written form did not change is not validated and digested again."""
    items: dict[str, list[tuple[Key, dict[str, Any]]]] = {kind: [] for kind in PLURALS}
    digests: dict[Key, str] = {}
    errors: dict[Key, str] = {}
    seen: set[Key] = set()
    for body in bodies:
        key = key_of(body)
        if key[0] not in PLURALS:
            continue
        written = for_router(as_written(body))
        fingerprint = json.dumps(written, sort_keys=True)
        cached = cache.get(key) if cache is not None else None
        if cached is not None and cached[0] == fingerprint:
            entry = cached[1]
        else:
            entry = _compile_one(key, written)
            if cache is not None:
                cache[key] = (fingerprint, entry)
        seen.add(key)
        items[key[0]].append((key, entry.item))
        if entry.digest is not None:
            digests[key] = entry.digest
        else:
            errors[key] = entry.error or "invalid"
    if cache is not None:
        for gone in set(cache) - seen:
            del cache[gone]
    files: dict[str, str] = {}
    for kind, entries in items.items():
        entries.sort(key=lambda e: e[0])
        kind_digest = digest.of_digests(digests[k] for k, _ in entries if k in digests)
        doc = {
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"annotations": {DIGEST_ANNOTATION: kind_digest}},
            "items": [item for _, item in entries],
        }
        files[file_name(kind)] = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    total = digest.of_digests([*digests.values(), *(f"invalid:{'/'.join(k)}" for k in errors)])
    return Compiled(files=files, digests=digests, errors=errors, digest=total)


def projected_items(compiled: Compiled, kind: str) -> list[dict[str, Any]]:
    """The resources of one kind as projected (for tests and ``kars`` tooling)."""
    items: list[dict[str, Any]] = json.loads(compiled.files[file_name(kind)])["items"]
    return items


def policy_digest(refs: Iterable[model.PolicyRef], namespace: str, compiled: Compiled) -> str | None:
    """Digest of the policies a sandbox references (by ``policyRefs``), ``None`` when it has none."""
    found = []
    for ref in refs:
        key = (ref.kind, namespace, ref.name)
        found.append(compiled.digests.get(key, f"missing:{'/'.join(key)}"))
    return digest.of_digests(found) if found else None


MAX_WARNINGS_SHOWN = 5  # in a condition's message; the router's /internal/policy-status has them all


@dataclasses.dataclass(frozen=True, slots=True)
class Readiness:
    status: str  # "True" | "False"
    reason: str
    message: str
    digest: str | None


def status_key(entry: Mapping[str, Any]) -> Key:
    """The key of one entry of the router's ``/internal/policy-status``."""
    return (str(entry.get("kind")), str(entry.get("namespace") or ""), str(entry.get("name")))


def readiness(compiled: Compiled, router_status: Mapping[str, Any], keys: Iterable[Key]) -> dict[Key, Readiness]:
    """``Ready`` of each policy CR: True only when the router reports the digest we projected."""
    entries: dict[Key, Mapping[str, Any]] = {}
    for entry in router_status.get("entries", []) or []:
        k = status_key(entry)
        entries[k] = entry
    out: dict[Key, Readiness] = {}
    for key in keys:
        if key in compiled.errors:
            out[key] = Readiness("False", "Invalid", compiled.errors[key], None)
            continue
        want = compiled.digests.get(key)
        if want is None:
            continue
        entry = entries.get(key)
        if entry is not None and entry.get("lastError"):
            out[key] = Readiness("False", "RouterRejected", str(entry["lastError"]), want)
        elif entry is not None and entry.get("digest") == want:
            warnings = [str(w) for w in entry.get("warnings") or ()]
            if warnings:  # loaded, but part of it does not count (a TrustGraph edge that fails to verify)
                shown = "; ".join(warnings[:MAX_WARNINGS_SHOWN])
                more = f" (and {len(warnings) - MAX_WARNINGS_SHOWN} more)" if len(warnings) > MAX_WARNINGS_SHOWN else ""
                out[key] = Readiness("True", "LoadedWithWarnings", f"the router loaded {want}; {shown}{more}", want)
            else:
                out[key] = Readiness("True", "Loaded", f"the router loaded {want}", want)
        else:
            out[key] = Readiness("False", "Pending", f"waiting for the router to load {want}", want)
    return out
