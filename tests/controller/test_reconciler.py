"""``controller.reconciler`` driven one call at a time against the emulated API server (no kopf):
for what must *not* happen, where waiting on a running controller could only prove it by sleeping."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller import builders, config, kube, reconciler
from tests.controller.conftest import NS, Cluster
from tests.controller.test_sandbox import SANDBOXES, sandbox


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


RUNNING_AND_READY = {
    "phase": "Running",
    "conditions": [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()},
        {"type": "Ready", "status": "True", "lastTransitionTime": _now()},
    ],
}


@pytest.fixture
async def ctl(cluster: Cluster) -> AsyncIterator[reconciler.Controller]:
    settings = config.ControllerSettings(api_server=str(cluster.api.url))
    async with kube.api_client(settings) as api:
        yield reconciler.Controller(settings, kube.Kube(api), None)


async def _sandbox_with_its_pod(cluster: Cluster, ctl: reconciler.Controller) -> dict[str, Any]:
    body = await cluster.create(SANDBOXES, sandbox())
    ctl.observe("ADDED", body)
    status = await ctl.reconcile_sandbox(body)
    assert status is not None and status["phase"] == "Pending"
    await cluster.patch(SANDBOXES, NS, "agent-1", {"status": status}, sub="status")
    ctl.index[("KarsSandbox", NS, "agent-1")]["status"] = status
    return body


def _status_patches(cluster: Cluster) -> int:
    return len(cluster.requests("PATCH", "/karssandboxes/agent-1/status"))


async def test_a_pod_the_sandbox_does_not_own_never_feeds_its_status(
    cluster: Cluster, ctl: reconciler.Controller
) -> None:
    """Any pod carrying the sandbox's label reaches the handler; only the sandbox's own counts."""
    await _sandbox_with_its_pod(cluster, ctl)
    before = _status_patches(cluster)
    impostor = {
        "metadata": {"name": "impostor", "namespace": NS, "labels": {builders.SANDBOX_LABEL: "agent-1"}},
        "spec": {"containers": [{"name": "x", "image": "evil"}]},
    }
    await cluster.create("pods", impostor)
    await cluster.patch("pods", NS, "impostor", {"status": RUNNING_AND_READY}, sub="status")
    seen = cluster.get("pods", NS, "impostor")
    # Even one that names the sandbox as an owner, but not by its uid.
    forged = {
        **seen,
        "metadata": {
            **seen["metadata"],
            "ownerReferences": [{"kind": "KarsSandbox", "name": "agent-1", "uid": "forged"}],
        },
    }  # type: ignore[index]
    for pod in (seen, forged):
        await ctl.on_pod_event("MODIFIED", pod)  # type: ignore[arg-type]
    await ctl.on_pod_event("DELETED", seen)  # type: ignore[arg-type]
    assert _status_patches(cluster) == before
    status = cluster.get(SANDBOXES, NS, "agent-1")["status"]  # type: ignore[index]
    assert (status["phase"], status["podName"]) == ("Pending", "agent-1")

    # The sandbox's own pod, in the same state, does.
    await cluster.patch("pods", NS, "agent-1", {"status": RUNNING_AND_READY}, sub="status")
    await ctl.on_pod_event("MODIFIED", cluster.get("pods", NS, "agent-1"))  # type: ignore[arg-type]
    status = cluster.get(SANDBOXES, NS, "agent-1")["status"]  # type: ignore[index]
    assert (status["phase"], status["podName"]) == ("Running", "agent-1")
