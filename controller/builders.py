"""The Kubernetes objects a KarsSandbox owns, and its status, as pure functions (SPEC.md §8).

Given a validated ``model.KarsSandbox`` and the controller settings, build the
ServiceAccount, Pod and Service; given the Pod as the API server reports it, compute the
sandbox's ``status``; given the clock, decide what ``lifecycle`` asks for. No I/O here:
the handlers in ``controller.operator`` send what these return.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from fractions import Fraction
from typing import Any

from controller import conditions, config
from router.policy import model

SANDBOX_LABEL = "kars.azure.com/sandbox"
SPEC_HASH_ANNOTATION = "kars.azure.com/pod-spec-hash"
MANAGED_BY = "kars-controller"
CONTAINER = "sandbox"
TOKEN_VOLUME = "kars-router-token"
TOKEN_DIR = "/var/run/secrets/kars"
TOKEN_PATH = "token"
WORKLOAD_IDENTITY_CLIENT_ID = "azure.workload.identity/client-id"
WORKLOAD_IDENTITY_USE = "azure.workload.identity/use"

Body = dict[str, Any]


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kars-sandbox",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        SANDBOX_LABEL: name,
    }


def owned_by(obj: Body | None, owner: Body) -> bool:
    """Whether ``obj`` lists ``owner`` (a sandbox's owner reference, by uid) among its owners."""
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner["uid"] for ref in refs)


def owner_reference(sandbox: Body) -> Body:
    """Makes the sandbox the controlling owner, so the garbage collector removes children."""
    meta = sandbox.get("metadata", {})
    return {
        "apiVersion": model.API_VERSION,
        "kind": "KarsSandbox",
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(sandbox: model.KarsSandbox, owner: Body, **extra: Any) -> Body:
    return {
        "name": sandbox.name,
        "namespace": sandbox.namespace,
        "labels": labels(sandbox.name),
        "ownerReferences": [owner],
        **extra,
    }


def service_account(sandbox: model.KarsSandbox, owner: Body) -> Body:
    """The sandbox's own identity: the router maps its token to ``namespace/name`` (SPEC.md §1)."""
    annotations = {}
    if sandbox.spec.identity is not None:
        annotations[WORKLOAD_IDENTITY_CLIENT_ID] = sandbox.spec.identity.client_id
    meta = _meta(sandbox, owner)
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta,
        # The API token is never mounted; the pod gets the audience-bound projected token only.
        "automountServiceAccountToken": False,
    }


def _seccomp(defaults: config.SandboxDefaults) -> Body:
    if defaults.seccomp_profile:
        return {"type": "Localhost", "localhostProfile": defaults.seccomp_profile}
    return {"type": "RuntimeDefault"}


# A Kubernetes quantity (k8s.io/apimachinery resource.Quantity): a number with a binary-SI,
# decimal-SI or decimal-exponent suffix.
_QUANTITY_RE = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
_SUFFIX = {
    **{s: Fraction(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Fraction(10) ** e for s, e in (("n", -9), ("u", -6), ("m", -3), ("k", 3), ("M", 6), ("G", 9))},
    **{s: Fraction(10) ** e for s, e in (("T", 12), ("P", 15), ("E", 18))},
}


def quantity(text: str) -> Fraction | None:
    """The value of a Kubernetes quantity (``"250m"`` -> 1/4, ``"1Gi"`` -> 2**30); ``None`` if it is none."""
    found = _QUANTITY_RE.match(text.strip())
    if found is None:
        return None
    number, suffix = Fraction(found[1]), found[2] or ""
    if suffix[:1] in ("e", "E"):
        return number * Fraction(10) ** int(suffix[1:])
    return number * _SUFFIX.get(suffix, Fraction(1))


def _request_and_limit(
    request: str | None, limit: str | None, default_request: str, default_limit: str
) -> tuple[str, str]:
    """Kubernetes' own convention: a request not given is the limit given; a default never puts
    the limit below the request, or the request above the limit (the API server refuses a Pod
    whose request exceeds its limit: 422)."""
    if limit is not None:
        return (request if request is not None else limit), limit
    if request is not None:
        low, high = quantity(request), quantity(default_limit)
        return request, (request if low is not None and high is not None and low > high else default_limit)
    low, high = quantity(default_request), quantity(default_limit)
    return (default_limit if low is not None and high is not None and low > high else default_request), default_limit


def _resources(spec: model.KarsSandboxSpec, defaults: config.SandboxDefaults) -> Body:
    res = spec.resources
    cpu = _request_and_limit(res.requests.cpu, res.limits.cpu, defaults.cpu_request, defaults.cpu_limit)
    memory = _request_and_limit(res.requests.memory, res.limits.memory, defaults.memory_request, defaults.memory_limit)
    return {
        "limits": {"cpu": cpu[1], "memory": memory[1], "ephemeral-storage": defaults.ephemeral_storage_limit},
        "requests": {"cpu": cpu[0], "memory": memory[0]},
    }


def _env(sandbox: model.KarsSandbox, settings: config.ControllerSettings) -> list[Body]:
    env = [{"name": e.name, "value": e.value} for e in sandbox.spec.env]
    ours = {
        "KARS_SANDBOX": f"{sandbox.namespace}/{sandbox.name}",
        "KARS_TOKEN_FILE": f"{TOKEN_DIR}/{TOKEN_PATH}",
    }
    if settings.router_url_for_sandboxes:
        ours["KARS_ROUTER_URL"] = settings.router_url_for_sandboxes
    taken = {e["name"] for e in env}
    env.extend({"name": k, "value": v} for k, v in ours.items() if k not in taken)
    return env


def pod(sandbox: model.KarsSandbox, owner: Body, settings: config.ControllerSettings) -> Body:
    """The hardened Pod: non-root 1000, read-only root FS, no capabilities, seccomp, limits,
    no API token, and a projected token for the router's audience only."""
    d = settings.sandbox
    seccomp = _seccomp(d)
    pod_labels = labels(sandbox.name)
    if sandbox.spec.identity is not None:
        pod_labels[WORKLOAD_IDENTITY_USE] = "true"
    container: Body = {
        "name": CONTAINER,
        "image": sandbox.spec.image,
        "env": _env(sandbox, settings),
        "ports": [{"name": "http", "containerPort": d.port, "protocol": "TCP"}],
        "resources": _resources(sandbox.spec, d),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.SANDBOX_UID,
            "runAsGroup": config.SANDBOX_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": seccomp,
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    spec: Body = {
        "serviceAccountName": sandbox.name,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": d.restart_policy,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.SANDBOX_UID,
            "runAsGroup": config.SANDBOX_UID,
            "fsGroup": config.SANDBOX_UID,
            "seccompProfile": seccomp,
        },
        "containers": [container],
        "volumes": [
            {
                "name": TOKEN_VOLUME,
                "projected": {
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": d.token_audience,
                                "expirationSeconds": d.token_expiration_s,
                                "path": TOKEN_PATH,
                            }
                        }
                    ]
                },
            },
            {"name": "tmp", "emptyDir": {"sizeLimit": d.tmp_size_limit}},
        ],
    }
    if sandbox.spec.runtime:
        spec["runtimeClassName"] = sandbox.spec.runtime
    digest = hashlib.sha256(json.dumps([pod_labels, spec], sort_keys=True).encode()).hexdigest()[:16]
    meta = _meta(sandbox, owner, annotations={SPEC_HASH_ANNOTATION: digest})
    meta["labels"] = pod_labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def service(sandbox: model.KarsSandbox, owner: Body, settings: config.ControllerSettings) -> Body:
    port = settings.sandbox.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(sandbox, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": {SANDBOX_LABEL: sandbox.name},
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pod_is_current(existing: Body, desired: Body) -> bool:
    """Pods are mostly immutable: a changed spec means delete and create again."""
    have = existing.get("metadata", {}).get("annotations", {}).get(SPEC_HASH_ANNOTATION)
    return bool(have) and have == desired["metadata"]["annotations"][SPEC_HASH_ANNOTATION]


# -- lifecycle ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LifecycleDecision:
    expired: bool = False  # shutdownTime passed: no pod, phase Expired
    delete_sandbox: bool = False  # ttlSecondsAfterFinished passed after the pod finished
    recheck_in_s: float | None = None  # when the next decision may differ


def _finished_at(pod_body: Body) -> dt.datetime | None:
    times = []
    for cs in pod_body.get("status", {}).get("containerStatuses", []) or []:
        finished = (cs.get("state", {}).get("terminated") or {}).get("finishedAt")
        if finished:
            times.append(model.parse_timestamp(finished))
    return max(times) if times else None


def lifecycle(spec: model.KarsSandboxSpec, pod_body: Body | None, now: dt.datetime) -> LifecycleDecision:
    waits: list[float] = []
    shutdown = spec.lifecycle.shutdown_time
    if shutdown is not None:
        remaining = (model.parse_timestamp(shutdown) - now).total_seconds()
        if remaining <= 0:
            return LifecycleDecision(expired=True)
        waits.append(remaining)
    ttl = spec.lifecycle.ttl_seconds_after_finished
    phase = (pod_body or {}).get("status", {}).get("phase")
    if ttl is not None and phase in ("Succeeded", "Failed"):
        finished = _finished_at(pod_body or {}) or now
        remaining = finished.timestamp() + ttl - now.timestamp()
        if remaining <= 0:
            return LifecycleDecision(delete_sandbox=True)
        waits.append(remaining)
    return LifecycleDecision(recheck_in_s=min(waits) if waits else None)


# -- status ---------------------------------------------------------------------------------


def _pod_condition(pod_body: Body, type_: str) -> Body | None:
    return next((c for c in pod_body.get("status", {}).get("conditions", []) or [] if c.get("type") == type_), None)


def sandbox_status(
    spec: model.KarsSandboxSpec,
    pod_body: Body | None,
    previous: Body | None,
    *,
    now: dt.datetime,
    generation: int | None,
    expired: bool = False,
    policy_digest: str | None = None,
) -> Body:
    """``status`` of a KarsSandbox from its Pod: phase, podName, conditions Ready/Suspended/PodScheduled."""
    conds = list((previous or {}).get("conditions", []) or [])

    def put(type_: str, status: conditions.ConditionStatus, reason: str, message: str = "") -> None:
        nonlocal conds
        conds = conditions.set_condition(conds, type_, status, reason, message, now=now, generation=generation)

    suspended = spec.replicas == 0
    put("Suspended", "True" if suspended else "False", "ReplicasZero" if suspended else "ReplicasOne")
    if expired:
        phase = "Expired"
        put("Ready", "False", "ShutdownTimeReached", f"spec.lifecycle.shutdownTime {spec.lifecycle.shutdown_time}")
        put("PodScheduled", "False", "ShutdownTimeReached")
    elif suspended:
        phase = "Suspended"
        put("Ready", "False", "Suspended", "spec.replicas is 0")
        put("PodScheduled", "False", "Suspended")
    elif pod_body is None:
        phase = "Pending"
        put("Ready", "False", "PodMissing", "the pod is being created")
        put("PodScheduled", "False", "PodMissing")
    else:
        pod_phase = pod_body.get("status", {}).get("phase") or "Pending"
        phase = pod_phase if pod_phase in ("Pending", "Running", "Succeeded", "Failed") else "Pending"
        scheduled = _pod_condition(pod_body, "PodScheduled")
        if scheduled is not None:
            put(
                "PodScheduled",
                scheduled.get("status", "Unknown"),
                scheduled.get("reason") or "PodScheduled",
                scheduled.get("message", ""),
            )
        else:
            put("PodScheduled", "Unknown", "NotYetObserved")
        ready = _pod_condition(pod_body, "Ready")
        if ready is not None and ready.get("status") == "True" and phase == "Running":
            put("Ready", "True", "PodReady")
        else:
            reason = (ready or {}).get("reason") or f"Pod{phase}"
            put("Ready", "False", reason, (ready or {}).get("message", ""))
    status: Body = {"phase": phase, "conditions": conds}
    status["podName"] = None if (suspended or expired or pod_body is None) else pod_body["metadata"]["name"]
    if policy_digest is not None:
        status["policyDigest"] = policy_digest
    if generation is not None:
        status["observedGeneration"] = generation
    return status
