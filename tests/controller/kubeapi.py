"""A Kubernetes API server emulated over real HTTP for controller tests: kmock, plus the bits it lacks.

kmock's ``KubernetesEmulator`` serves discovery, list, watch, create, merge-patch (main and
``/status``), delete with finalizers, and keeps every object and request for assertions.
It does not do what the real API server does on write, so this subclass adds, faithfully
to the API server's behaviour (tests only):

- ``metadata.generateName`` -> a generated ``name`` (kopf posts Events that way);
- ``uid``, ``creationTimestamp``, ``resourceVersion`` on create; ``generation`` = 1 on
  create and + 1 whenever a patch to the main resource changes ``spec``.

- owner-reference garbage collection: once a write or delete leaves an object whose owners are
  all gone, it is deleted too (the API server's background propagation), with its DELETED event.

Not emulated (the controller does not rely on them): admission/CEL validation, label selectors.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import enums, rendering

from controller import crds

_RV = itertools.count(1)

CORE = {
    "pods": "Pod",
    "services": "Service",
    "serviceaccounts": "ServiceAccount",
    "configmaps": "ConfigMap",
    "events": "Event",
}
ALL_VERBS = {"create", "get", "list", "watch", "patch", "update", "delete"}


class KubeAPI(kmock.KubernetesEmulator):  # type: ignore[misc]
    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(_RV))
            elif request.action == enums.action.UPDATE and request.name is not None:
                meta["resourceVersion"] = str(next(_RV))
                if request.subresource is None and "spec" in request.data:
                    key = (request.resource, request.namespace, request.name)
                    if key in self.objects and not self.objects[key].deleted:
                        current = self.objects[key]
                        old_spec = current.get("spec")
                        merged = _merge(old_spec, request.data["spec"])
                        if merged != old_spec:
                            meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        response = await super()._handle(request)
        if request.resource is not None and request.action in (enums.action.DELETE, enums.action.UPDATE):
            await self._collect_garbage()
        return response  # type: ignore[no-any-return]

    async def _collect_garbage(self) -> None:
        """Delete every object whose owner references all name objects that no longer exist."""
        async with self._lock:
            while True:
                live = {obj.get("metadata", {}).get("uid") for obj in self._objects.values() if not obj.deleted}
                orphans = [
                    (key, obj)
                    for key, obj in self._objects.items()
                    if not obj.deleted
                    and (owners := obj.get("metadata", {}).get("ownerReferences") or [])
                    and not any(owner.get("uid") in live for owner in owners)
                ]
                if not orphans:
                    return
                for key, obj in orphans:  # their own dependents go in the next round
                    raw = obj.raw
                    obj.delete()
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 merge patch, to tell whether a patch changes ``spec``."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def declare_resources(api: kmock.KubernetesEmulator) -> None:
    """Discovery for what the controller watches and writes (as the CRDs and core/v1 declare)."""
    for kind in crds.KINDS:
        api.resources[f"kars.azure.com/v1alpha1/{kind.plural}"] = kmock.ResourceInfo(
            kind=kind.kind,
            namespaced=not kind.cluster_scoped,
            verbs=ALL_VERBS,
            subresources={"status"},
            singular=kind.kind.lower(),
        )
    for plural, kind_name in CORE.items():
        api.resources[f"v1/{plural}"] = kmock.ResourceInfo(kind=kind_name, namespaced=True, verbs=ALL_VERBS)
    api.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=ALL_VERBS)
    api.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=ALL_VERBS
    )
