"""Policy CRs -> projection ConfigMap -> the real router -> Ready, against the emulated API server.

The loop is closed as in a cluster: the controller writes the ConfigMap to the API server,
a stand-in for the kubelet copies its files into the router's ``--policy-dir`` (here the
router app from ``router.app.build_app`` served on loopback), the router hot-reloads, and
the controller reads ``/internal/policy-status`` back to set each CR's ``Ready``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from controller import projection
from router.policy import digest, load
from tests.controller.conftest import NS, POLICY_NS, Cluster, ControllerFactory, wait_until

API = "kars.azure.com/v1alpha1"
KUBELET_SYNC_S = 0.02


def _b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _pub() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return _b64u(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def cr(kind: str, name: str, spec: dict[str, Any], namespace: str | None = NS) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": API, "kind": kind, "metadata": meta, "spec": spec}


def every_kind() -> list[dict[str, Any]]:
    return [
        cr("InferencePolicy", "budget", {"tokenBudget": {"hourlyTokens": 1000, "dailyTokens": 10000}}),
        cr("ToolPolicy", "no-shell", {"appliesTo": {"mcpServer": "tools", "tool": "shell"}, "decision": "deny"}),
        cr("McpServer", "tools", {"url": "http://tools.team-a:8080/mcp"}),
        cr(
            "A2AAgent",
            "peer",
            {
                "endpointUrl": "https://peer.example",
                "signingKeys": [{"kid": "k1", "alg": "EdDSA", "publicKeyB64u": _pub()}],
            },
        ),
        cr(
            "TrustGraph",
            "mesh",
            {"vertices": [{"id": "team-a/agent-1", "publicKeyB64u": _pub()}], "minScore": 100},
            namespace=None,
        ),
    ]


def configmap(cluster: Cluster) -> dict[str, Any] | None:
    return cluster.get("configmaps", POLICY_NS, "kars-policy")


def projected(cluster: Cluster, kind: str) -> list[dict[str, Any]]:
    cm = configmap(cluster)
    if cm is None:
        return []
    items: list[dict[str, Any]] = json.loads(cm["data"][projection.file_name(kind)])["items"]
    return items


def ready(cluster: Cluster, plural: str, name: str, namespace: str | None = NS) -> dict[str, Any] | None:
    obj = cluster.get(plural, namespace, name) or {}
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Ready"), None)


async def router_status(base_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.get("/internal/policy-status")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data


@contextlib.asynccontextmanager
async def kubelet(cluster: Cluster, directory: Path) -> AsyncIterator[None]:
    """Stand-in for the kubelet's ConfigMap volume: mirror the ConfigMap's data into ``directory``."""

    async def sync() -> None:
        seen: dict[str, str] | None = None
        while True:
            cm = configmap(cluster)
            data = dict((cm or {}).get("data") or {})
            if cm is not None and data != seen:
                for name, text in data.items():
                    tmp = directory / f".{name}.tmp"
                    tmp.write_text(text, encoding="utf-8")
                    os.replace(tmp, directory / name)
                for stale in set(seen or {}) - set(data):
                    (directory / stale).unlink(missing_ok=True)
                seen = data
            await asyncio.sleep(KUBELET_SYNC_S)

    task = asyncio.create_task(sync())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_every_policy_kind_is_projected_and_updates_follow(
    cluster: Cluster, run_controller: ControllerFactory
) -> None:
    async with run_controller() as ctl:
        for body in every_kind():
            await cluster.create(projection.PLURALS[body["kind"]], body)
        await wait_until(lambda: all(projected(cluster, b["kind"]) for b in every_kind()), "every kind projected")
        cm = configmap(cluster)
        assert cm is not None
        assert set(cm["data"]) == {projection.file_name(k) for k in projection.PLURALS}
        assert cm["metadata"]["annotations"][projection.DIGEST_ANNOTATION].startswith("sha256:")

        # What is projected is exactly what the router would load, with the digests it would report.
        for body in every_kind():
            (item,) = projected(cluster, body["kind"])
            loaded = load.parse_document(item, load.Source("cm", 1))
            assert isinstance(loaded, load.Loaded)
            assert digest.canonical(loaded.resource) == item
        assert projected(cluster, "TrustGraph")[0]["metadata"] == {"name": "mesh"}
        assert projected(cluster, "InferencePolicy")[0]["spec"]["tokenBudget"]["scope"] == "sandbox"  # defaults filled

        writes = ctl.projection_writes
        await cluster.patch("inferencepolicies", NS, "budget", {"spec": {"tokenBudget": {"dailyTokens": 20000}}})
        await wait_until(
            lambda: projected(cluster, "InferencePolicy")[0]["spec"]["tokenBudget"]["dailyTokens"] == 20000,
            "the update projected",
        )
        await wait_until(lambda: ctl.projection_writes >= writes + 1, "a ConfigMap write for the change")

        await cluster.delete("toolpolicies", NS, "no-shell")
        await wait_until(lambda: projected(cluster, "ToolPolicy") == [], "the deletion projected")


async def test_invalid_policy_gets_an_event_and_is_projected_as_written(
    cluster: Cluster, run_controller: ControllerFactory
) -> None:
    async with run_controller():
        # The API server's CEL rule would refuse this; the controller does not rely on it.
        bad = cr("InferencePolicy", "bad", {"tokenBudget": {"hourlyTokens": 1000, "dailyTokens": 10}})
        await cluster.create("inferencepolicies", bad)
        cond = await wait_until(lambda: ready(cluster, "inferencepolicies", "bad"), "Ready condition")
        assert cond["status"] == "False" and cond["reason"] == "Invalid"
        assert "dailyTokens (10) must be >= hourlyTokens (1000)" in cond["message"]
        events = await wait_until(
            lambda: [e for e in cluster.events(NS) if e.get("reason") == "InvalidPolicy"], "an InvalidPolicy event"
        )
        assert events[0]["type"] == "Warning" and "dailyTokens" in events[0]["message"]
        (item,) = projected(cluster, "InferencePolicy")
        assert item["spec"] == bad["spec"]


async def test_router_confirmed_ready_rejection_and_trustgraph_reprojection(
    cluster: Cluster,
    run_controller: ControllerFactory,
    router_server: Callable[..., Any],
    policy_dir: Path,
) -> None:
    router = router_server()
    async with kubelet(cluster, policy_dir), run_controller(router_url=router.url) as ctl:
        for body in every_kind():
            await cluster.create(projection.PLURALS[body["kind"]], body)
        for body in every_kind():
            plural, ns = projection.PLURALS[body["kind"]], body["metadata"].get("namespace")
            cond = await wait_until(
                lambda p=plural, n=ns, b=body: (
                    (c := ready(cluster, p, b["metadata"]["name"], n)) and c["status"] == "True" and c
                ),
                f"{body['kind']} Ready",
            )
            assert cond["reason"] == "Loaded"
            key = projection.key_of(body)
            obj = cluster.get(plural, ns, body["metadata"]["name"])
            assert obj["status"]["digest"] == ctl.compiled.digests[key]  # type: ignore[index]

        # The router reports exactly those digests.
        status = await router_status(router.url)
        reported = {(e["kind"], e["namespace"] or "", e["name"]): e["digest"] for e in status["entries"]}
        assert {k: reported[k] for k in ctl.compiled.digests} == ctl.compiled.digests

        # A policy the router refuses (looser than the cluster floor) carries the router's reason.
        await cluster.create("inferencepolicies", cr("InferencePolicy", "loose", {"contentSafety": {"hate": "High"}}))
        cond = await wait_until(
            lambda: (c := ready(cluster, "inferencepolicies", "loose")) and c["reason"] == "RouterRejected" and c,
            "the router's rejection",
        )
        assert cond["status"] == "False" and "looser than the cluster floor" in cond["message"]
        events = await wait_until(
            lambda: [e for e in cluster.events(NS) if e.get("reason") == "RouterRejected"], "a RouterRejected event"
        )
        assert events[0]["involvedObject"]["name"] == "loose" and "floor" in events[0]["message"]

        # A TrustGraph change reaches the running router (no restart): a new digest becomes Ready.
        generation = status["generation"]
        old = ctl.compiled.digests[("TrustGraph", "", "mesh")]
        await cluster.patch("trustgraphs", None, "mesh", {"spec": {"minScore": 700}})

        def new_digest_ready() -> bool:
            obj = cluster.get("trustgraphs", None, "mesh") or {}
            cond = ready(cluster, "trustgraphs", "mesh", None) or {}
            return cond.get("status") == "True" and obj["status"]["digest"] not in (None, old)

        await wait_until(new_digest_ready, "the new TrustGraph Ready")
        after = await router_status(router.url)
        assert after["generation"] > generation
        (graph,) = [e for e in after["entries"] if e["kind"] == "TrustGraph"]
        assert graph["digest"] == ctl.compiled.digests[("TrustGraph", "", "mesh")] != old


async def test_namespaced_controller_serves_its_namespaces_and_the_cluster_scoped_graph(
    cluster: Cluster, run_controller: ControllerFactory
) -> None:
    async with run_controller(namespaces=(NS,)):
        mine = cr("McpServer", "mine", {"url": "http://mine"})
        other = cr("McpServer", "other", {"url": "http://other"}, namespace="team-b")
        graph = cr("TrustGraph", "mesh", {"minScore": 1}, namespace=None)
        for body in (other, mine, graph):
            await cluster.create(projection.PLURALS[body["kind"]], body)
        await wait_until(lambda: projected(cluster, "McpServer") and projected(cluster, "TrustGraph"), "projection")
        assert [i["metadata"]["name"] for i in projected(cluster, "McpServer")] == ["mine"]
        assert projected(cluster, "TrustGraph")[0]["metadata"]["name"] == "mesh"


async def test_observed_generation_follows_a_spec_edit_that_keeps_the_digest(
    cluster: Cluster, run_controller: ControllerFactory
) -> None:
    async with run_controller() as ctl:
        await cluster.create("inferencepolicies", cr("InferencePolicy", "p", {"tokenBudget": {"dailyTokens": 100}}))
        await wait_until(lambda: ready(cluster, "inferencepolicies", "p"), "Ready")
        first = ctl.compiled.digests[("InferencePolicy", NS, "p")]
        await cluster.patch(
            "inferencepolicies", NS, "p", {"spec": {"tokenBudget": {"scope": "sandbox"}}}
        )  # the default
        assert cluster.get("inferencepolicies", NS, "p")["metadata"]["generation"] == 2  # type: ignore[index]

        def caught_up() -> bool:
            obj = cluster.get("inferencepolicies", NS, "p") or {}
            cond = ready(cluster, "inferencepolicies", "p") or {}
            return (obj.get("status") or {}).get("observedGeneration") == 2 and cond.get("observedGeneration") == 2

        await wait_until(caught_up, "observedGeneration 2 on the status and its Ready condition")
        assert ctl.compiled.digests[("InferencePolicy", NS, "p")] == first


async def test_first_projection_holds_every_policy_that_already_exists(
    cluster: Cluster, run_controller: ControllerFactory
) -> None:
    """A controller (re)starting must not write a projection from a half-listed cluster."""
    for i in range(40):
        await cluster.create(
            "toolpolicies", cr("ToolPolicy", f"deny-{i}", {"appliesTo": {"mcpServer": "t"}, "decision": "deny"})
        )
    async with run_controller():
        await wait_until(lambda: cluster.requests("POST", "/configmaps"), "the first ConfigMap write")
        first = cluster.requests("POST", "/configmaps")[0].data["data"]
        items = json.loads(first[projection.file_name("ToolPolicy")])["items"]
        assert len(items) == 40


async def _sandbox_with_a_budget(cluster: Cluster) -> Callable[[], str | None]:
    """An InferencePolicy and a KarsSandbox that refers to it; a probe of the sandbox's policyDigest."""
    await cluster.create("inferencepolicies", cr("InferencePolicy", "budget", {"tokenBudget": {"hourlyTokens": 10}}))
    body = cr(
        "KarsSandbox", "agent-1", {"image": "img:1", "policyRefs": [{"kind": "InferencePolicy", "name": "budget"}]}
    )
    await cluster.create("karssandboxes", body)

    def sandbox_digest() -> str | None:
        obj = cluster.get("karssandboxes", NS, "agent-1") or {}
        return (obj.get("status") or {}).get("policyDigest")

    return sandbox_digest


async def test_sandbox_policy_digest_follows_its_referenced_policies(
    cluster: Cluster, run_controller: ControllerFactory
) -> None:
    async with run_controller() as ctl:
        sandbox_digest = await _sandbox_with_a_budget(cluster)

        def expected() -> str | None:
            want = ctl.compiled.digests.get(("InferencePolicy", NS, "budget"))
            return digest.of_digests([want]) if want else None

        first = await wait_until(lambda: expected() and sandbox_digest() == expected() and sandbox_digest(), "digest")
        await cluster.patch("inferencepolicies", NS, "budget", {"spec": {"tokenBudget": {"hourlyTokens": 20}}})
        second = await wait_until(
            lambda: sandbox_digest() not in (None, first) and sandbox_digest() == expected() and sandbox_digest(),
            "new digest",
        )
        assert second != first and second == expected()


async def test_a_stale_policy_digest_from_another_writer_is_put_right(
    cluster: Cluster, run_controller: ControllerFactory
) -> None:
    """The sandbox handler writes the digest of the policy it had compiled when it ran; if that
    lands after the status loop wrote the current one, the loop writes the current one again."""
    async with run_controller() as ctl:
        sandbox_digest = await _sandbox_with_a_budget(cluster)
        key = ("InferencePolicy", NS, "budget")
        await wait_until(lambda: key in ctl.compiled.digests, "the policy compiled")
        want = digest.of_digests([ctl.compiled.digests[key]])
        await wait_until(lambda: sandbox_digest() == want, "the current digest")
        status_path = "/karssandboxes/agent-1/status"
        writes_before = len(cluster.requests("PATCH", status_path))
        stale = digest.of_digests([f"missing:InferencePolicy/{NS}/budget"])  # as if written before it compiled
        await cluster.patch("karssandboxes", NS, "agent-1", {"status": {"policyDigest": stale}}, sub="status")
        await wait_until(lambda: sandbox_digest() == want, "the stale digest put right")
        # Our stale write, then the controller's own: the current digest was written again.
        assert len(cluster.requests("PATCH", status_path)) >= writes_before + 2
        assert sandbox_digest() == want != stale
