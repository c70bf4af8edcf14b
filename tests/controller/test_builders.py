"""The pure parts of the controller: object builders, lifecycle, status, projection, error mapping."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import kopf
import pydantic
import pytest
from kubernetes_asyncio.client.exceptions import ApiException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controller import builders, conditions, config, crds, kube, projection, routerstatus
from controller import cli as controller_cli
from router.policy import digest, model
from tests.support import servers

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
OWNER = {"apiVersion": model.API_VERSION, "kind": "KarsSandbox", "name": "a", "uid": "u", "controller": True}


def sandbox(**spec: Any) -> model.KarsSandbox:
    return model.KarsSandbox.model_validate(
        {
            "apiVersion": model.API_VERSION,
            "kind": "KarsSandbox",
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"image": "img:1", **spec},
        }
    )


def test_pod_resources_default_and_override() -> None:
    settings = config.ControllerSettings()
    pod = builders.pod(sandbox(), OWNER, settings)
    res = pod["spec"]["containers"][0]["resources"]
    assert res["limits"] == {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "1Gi"}
    pod = builders.pod(sandbox(resources={"limits": {"cpu": "2"}, "requests": {"memory": "1Gi"}}), OWNER, settings)
    res = pod["spec"]["containers"][0]["resources"]
    assert res["limits"]["cpu"] == "2" and res["requests"]["memory"] == "1Gi"
    # Quantities written as numbers, as kubectl takes them (cpu: 1), are kept as their text.
    pod = builders.pod(sandbox(resources={"limits": {"cpu": 1, "memory": 1073741824}}), OWNER, settings)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "1"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "1073741824"
    with pytest.raises(pydantic.ValidationError):
        sandbox(resources={"limits": {"cpu": True}})


@pytest.mark.parametrize(
    ("resources", "requests", "limits"),
    [
        ({}, {"cpu": "100m", "memory": "256Mi"}, {"cpu": "1", "memory": "1Gi"}),
        # Requests above the default limits: the limits follow the requests.
        ({"requests": {"cpu": "2", "memory": "2Gi"}}, {"cpu": "2", "memory": "2Gi"}, {"cpu": "2", "memory": "2Gi"}),
        # Requests below them keep the default limits.
        (
            {"requests": {"cpu": "50m", "memory": "64Mi"}},
            {"cpu": "50m", "memory": "64Mi"},
            {"cpu": "1", "memory": "1Gi"},
        ),
        # A limit alone is the request too (Kubernetes' convention), even below the default request.
        ({"limits": {"memory": "128Mi"}}, {"cpu": "100m", "memory": "128Mi"}, {"cpu": "1", "memory": "128Mi"}),
        ({"limits": {"cpu": "4"}}, {"cpu": "4", "memory": "256Mi"}, {"cpu": "4", "memory": "1Gi"}),
        (
            {"limits": {"cpu": "500m"}, "requests": {"memory": "1.5Gi"}},
            {"cpu": "500m", "memory": "1.5Gi"},
            {"cpu": "500m", "memory": "1.5Gi"},
        ),
        # Both given: as written (a request above its limit is the API server's to refuse).
        (
            {"limits": {"cpu": "1"}, "requests": {"cpu": "250m"}},
            {"cpu": "250m", "memory": "256Mi"},
            {"cpu": "1", "memory": "1Gi"},
        ),
        # Numbers and exponents compare by value: 2e9 bytes is more than 1Gi.
        (
            {"requests": {"memory": 2000000000}},
            {"cpu": "100m", "memory": "2000000000"},
            {"cpu": "1", "memory": "2000000000"},
        ),
        ({"requests": {"memory": "1e3"}}, {"cpu": "100m", "memory": "1e3"}, {"cpu": "1", "memory": "1Gi"}),
    ],
)
def test_pod_resources_never_request_more_than_their_limits(
    resources: dict[str, Any], requests: dict[str, str], limits: dict[str, str]
) -> None:
    pod = builders.pod(sandbox(resources=resources), OWNER, config.ControllerSettings())
    res = pod["spec"]["containers"][0]["resources"]
    assert res["requests"] == requests
    assert res["limits"] == {**limits, "ephemeral-storage": "1Gi"}
    for name in ("cpu", "memory"):
        assert builders.quantity(res["requests"][name]) <= builders.quantity(res["limits"][name])  # type: ignore[operator]


def test_default_requests_above_default_limits_are_capped() -> None:
    settings = config.ControllerSettings(sandbox=config.SandboxDefaults(cpu_request="2", memory_request="2Gi"))
    res = builders.pod(sandbox(), OWNER, settings)["spec"]["containers"][0]["resources"]
    assert res["requests"] == {"cpu": "1", "memory": "1Gi"}


def test_quantities() -> None:
    assert builders.quantity("250m") == Fraction(1, 4)
    assert builders.quantity("1Gi") == 2**30 == builders.quantity("1073741824")
    assert builders.quantity("1.5Gi") == 3 * 2**29
    assert builders.quantity("129e6") == 129_000_000 and builders.quantity("1k") == 1000
    assert builders.quantity(".5") == Fraction(1, 2)
    assert builders.quantity("lots") is None and builders.quantity("1Gb") is None


def test_pod_runtime_class_and_user_env_wins() -> None:
    pod = builders.pod(
        sandbox(runtime="kata", env=[{"name": "KARS_SANDBOX", "value": "mine"}]), OWNER, config.ControllerSettings()
    )
    assert pod["spec"]["runtimeClassName"] == "kata"
    env = pod["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "KARS_SANDBOX"] == [{"name": "KARS_SANDBOX", "value": "mine"}]


def test_pod_token_is_for_the_routers_audience() -> None:
    """The projected token's audience is the one the router checks, whatever it is set to."""
    for audience in (config.TOKEN_AUDIENCE, "my-aud"):
        settings = config.ControllerSettings(sandbox=config.SandboxDefaults(token_audience=audience))
        (volume,) = [v for v in builders.pod(sandbox(), OWNER, settings)["spec"]["volumes"] if "projected" in v]
        assert volume["projected"]["sources"][0]["serviceAccountToken"]["audience"] == audience
    parser = argparse.ArgumentParser()
    controller_cli.add_arguments(parser)
    args = parser.parse_args(["--token-audience", "my-aud"])
    assert controller_cli.settings_from_args(args).sandbox.token_audience == "my-aud"


def test_pod_hash_follows_the_spec() -> None:
    settings = config.ControllerSettings()
    a = builders.pod(sandbox(), OWNER, settings)
    assert builders.pod_is_current(a, builders.pod(sandbox(), OWNER, settings))
    assert not builders.pod_is_current(a, builders.pod(sandbox(image="img:2"), OWNER, settings))
    assert not builders.pod_is_current({"metadata": {}}, a)


def test_lifecycle_decisions() -> None:
    later = (NOW + dt.timedelta(seconds=30)).isoformat()
    decision = builders.lifecycle(sandbox(lifecycle={"shutdownTime": later}).spec, None, NOW)
    assert decision == builders.LifecycleDecision(recheck_in_s=30.0)
    assert builders.lifecycle(
        sandbox(lifecycle={"shutdownTime": later}).spec, None, NOW + dt.timedelta(seconds=31)
    ).expired

    finished = {
        "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"finishedAt": NOW.isoformat()}}}]}
    }
    spec = sandbox(lifecycle={"ttlSecondsAfterFinished": 60}).spec
    assert builders.lifecycle(spec, finished, NOW + dt.timedelta(seconds=10)).recheck_in_s == pytest.approx(50)
    assert builders.lifecycle(spec, finished, NOW + dt.timedelta(seconds=61)).delete_sandbox
    running = {"status": {"phase": "Running"}}
    assert builders.lifecycle(spec, running, NOW + dt.timedelta(days=1)) == builders.LifecycleDecision()


def test_status_keeps_transition_times_when_nothing_changed() -> None:
    spec = sandbox().spec
    pod = {"metadata": {"name": "a"}, "status": {"phase": "Pending"}}
    first = builders.sandbox_status(spec, pod, None, now=NOW, generation=3)
    assert first["phase"] == "Pending" and first["podName"] == "a" and first["observedGeneration"] == 3
    again = builders.sandbox_status(spec, pod, first, now=NOW + dt.timedelta(minutes=5), generation=3)
    assert again["conditions"] == first["conditions"]
    ready_pod = {
        "metadata": {"name": "a"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    later = NOW + dt.timedelta(minutes=6)
    running = builders.sandbox_status(spec, ready_pod, again, now=later, generation=3)
    ready = conditions.get_condition(running["conditions"], "Ready")
    assert ready is not None and ready["status"] == "True" and ready["lastTransitionTime"] == conditions.iso(later)
    suspended = builders.sandbox_status(sandbox(replicas=0).spec, None, running, now=later, generation=4)
    assert suspended["phase"] == "Suspended" and suspended["podName"] is None


def test_a_condition_message_always_fits_the_crd() -> None:
    """A TrustGraph of 600 vertices with a bad key: its Invalid message is longer than the
    CRD's maxLength, and a status patch holding it would be refused whole (422)."""
    key = base64.urlsafe_b64encode(b"\x01" * 31).rstrip(b"=").decode()  # 31 bytes: not an Ed25519 key
    vertices = [{"id": f"team-a/agent-{i}", "publicKeyB64u": key} for i in range(600)]
    graph = _body("TrustGraph", "mesh", {"vertices": vertices}, namespace=None)
    compiled = projection.compile_resources([graph])
    judged = projection.readiness(compiled, {"entries": []}, [("TrustGraph", "", "mesh")])
    message = judged[("TrustGraph", "", "mesh")].message
    assert len(message) > conditions.MESSAGE_MAX_CHARS
    (cond,) = conditions.set_condition(None, "Ready", "False", "Invalid", message, now=NOW)
    assert len(cond["message"]) == conditions.MESSAGE_MAX_CHARS and cond["message"].endswith(conditions.TRUNCATED)
    assert cond["message"].startswith(message[:1000])
    conditions.Condition.model_validate(cond)  # the model the CRD's status schema is made from
    crd = crds.crd(crds.BY_KIND["TrustGraph"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    limit = crd["properties"]["status"]["properties"]["conditions"]["items"]["properties"]["message"]["maxLength"]
    assert limit == conditions.MESSAGE_MAX_CHARS
    (short,) = conditions.set_condition(None, "Ready", "True", "Loaded", "ok", now=NOW)
    assert short["message"] == "ok"


def _body(kind: str, name: str, spec: dict[str, Any], namespace: str | None = "ns") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": "x", "managedFields": [{}], "resourceVersion": "9"}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": model.API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


def test_projection_is_deterministic_and_digests_match_the_router() -> None:
    bodies = [
        _body("McpServer", "b", {"url": "http://b"}),
        _body("McpServer", "a", {"url": "http://a"}),
        _body("TrustGraph", "g", {}, namespace=None),
    ]
    one = projection.compile_resources(bodies)
    two = projection.compile_resources(reversed(bodies))
    assert one == two
    items = projection.projected_items(one, "McpServer")
    assert [i["metadata"]["name"] for i in items] == ["a", "b"]
    assert "uid" not in items[0]["metadata"]
    resource = model.McpServer.model_validate(items[0])
    assert one.digests[("McpServer", "ns", "a")] == digest.of_resource(resource)
    assert ("TrustGraph", "", "g") in one.digests


def test_readiness_only_on_the_reported_digest() -> None:
    compiled = projection.compile_resources(
        [_body("McpServer", "a", {"url": "http://a"}), _body("McpServer", "bad", {"url": "ftp://x"})]
    )
    want = compiled.digests[("McpServer", "ns", "a")]
    keys = [("McpServer", "ns", "a"), ("McpServer", "ns", "bad")]
    judged = projection.readiness(compiled, {"entries": []}, keys)
    assert judged[keys[0]].reason == "Pending" and judged[keys[1]].reason == "Invalid"
    entry = {"kind": "McpServer", "namespace": "ns", "name": "a", "digest": "sha256:old", "lastError": None}
    assert projection.readiness(compiled, {"entries": [entry]}, keys)[keys[0]].status == "False"
    entry["digest"] = want
    assert projection.readiness(compiled, {"entries": [entry]}, keys)[keys[0]].status == "True"
    # Loaded, with parts that do not count (a TrustGraph's dropped edges): Ready, and the condition says so.
    entry["warnings"] = [f"edge a -> b{i} dropped: signature does not verify" for i in range(7)]
    warned = projection.readiness(compiled, {"entries": [entry]}, keys)[keys[0]]
    assert (warned.status, warned.reason) == ("True", "LoadedWithWarnings")
    assert "edge a -> b0 dropped: signature does not verify" in warned.message
    assert warned.message.endswith("(and 2 more)")
    del entry["warnings"]
    entry["lastError"] = "x.json:1: nope"
    rejected = projection.readiness(compiled, {"entries": [entry]}, keys)[keys[0]]
    assert (rejected.status, rejected.reason, rejected.message) == ("False", "RouterRejected", "x.json:1: nope")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, kopf.PermanentError),
        (422, kopf.PermanentError),
        (403, kopf.PermanentError),
        (409, kopf.TemporaryError),
        (429, kopf.TemporaryError),
        (500, kopf.TemporaryError),
        (503, kopf.TemporaryError),
    ],
)
def test_api_errors_map_by_status(status: int, expected: type[Exception]) -> None:
    assert isinstance(kube.map_api_error(ApiException(status=status, reason="x"), "op"), expected)


def test_throttling_honours_retry_after() -> None:
    exc = ApiException(status=429, reason="Too Many Requests")
    exc.headers = {"Retry-After": "7"}
    err = kube.map_api_error(exc, "op")
    assert isinstance(err, kopf.TemporaryError) and err.delay == 7.0
    assert kube.map_api_error(OSError("boom"), "op").delay == kube.RETRY_DELAY_S  # type: ignore[union-attr]


async def test_router_client_backs_off_and_recovers(tmp_path: Path, dead_port: int) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    seen: list[str | None] = []
    healthy = {"on": False}

    async def policy_status(request: Request) -> Response:
        seen.append(request.headers.get("authorization"))
        if not healthy["on"]:
            return Response("down", status_code=503)
        return JSONResponse({"entries": []})

    app = Starlette(routes=[Route(routerstatus.POLICY_STATUS_PATH, policy_status)])
    with servers.serve(app) as srv:
        client = routerstatus.RouterStatusClient(srv.url, token, poll_s=0.1, max_poll_s=0.5)
        try:
            for expected in (0.2, 0.4, 0.5, 0.5):
                with pytest.raises(routerstatus.RouterUnavailable):
                    await client.fetch()
                assert client.next_delay_s == pytest.approx(expected)
            healthy["on"] = True
            assert await client.fetch() == {"entries": []}
            assert client.next_delay_s == 0.1
        finally:
            await client.aclose()
    assert seen[0] == "Bearer s3cret"
    unreachable = routerstatus.RouterStatusClient(f"http://127.0.0.1:{dead_port}", None, poll_s=1, max_poll_s=2)
    with pytest.raises(routerstatus.RouterUnavailable):
        await unreachable.fetch()
    await unreachable.aclose()


async def test_router_replicas_are_each_asked_and_a_policy_counts_once_all_have_it(tmp_path: Path) -> None:
    """Two router replicas (127.0.0.1 and 127.0.0.2, one port: what a headless Service resolves to).
    The DNS answer is injected: cluster DNS cannot run here; the HTTP to each replica is real."""
    compiled = projection.compile_resources([_body("McpServer", "a", {"url": "http://a"})])
    key = ("McpServer", "ns", "a")
    want = compiled.digests[key]
    reported = {"127.0.0.1": "sha256:old", "127.0.0.2": want}
    errors_at: dict[str, str] = {}

    async def policy_status(request: Request) -> Response:
        host = request.url.hostname or ""
        entry = {"kind": "McpServer", "namespace": "ns", "name": "a", "digest": reported[host]}
        entry["lastError"] = errors_at.get(host)
        return JSONResponse({"entries": [entry]})

    app = Starlette(routes=[Route(routerstatus.POLICY_STATUS_PATH, policy_status)])
    port = servers.free_port()
    resolved = ["127.0.0.1", "127.0.0.2"]

    async def resolver(host: str) -> list[str]:
        assert host == "kars-router-replicas.kars-system.svc"
        return list(resolved)

    with servers.serve(app, host="127.0.0.1", port=port), servers.serve(app, host="127.0.0.2", port=port):
        client = routerstatus.RouterStatusClient(
            f"http://kars-router-replicas.kars-system.svc:{port}",
            None,
            poll_s=1,
            max_poll_s=2,
            replicas=True,
            resolver=resolver,
        )
        try:
            status = await client.fetch()
            assert status["replicas"] == 2
            assert projection.readiness(compiled, status, [key])[key].reason == "Pending"  # one has not loaded it
            reported["127.0.0.1"] = want
            assert projection.readiness(compiled, await client.fetch(), [key])[key].reason == "Loaded"
            errors_at["127.0.0.2"] = "x.json:1: nope"
            assert projection.readiness(compiled, await client.fetch(), [key])[key].reason == "RouterRejected"
            resolved.clear()
            with pytest.raises(routerstatus.RouterUnavailable, match="no router replica is ready"):
                await client.fetch()
        finally:
            await client.aclose()


def test_merge_of_replica_statuses() -> None:
    a = {"kind": "TrustGraph", "namespace": "", "name": "g", "digest": "d1", "warnings": ["w1"]}
    merged = routerstatus.merge([{"entries": [a]}, {"entries": [{**a, "warnings": ["w2"]}]}])
    assert merged["entries"] == [{**a, "warnings": ["w1", "w2"]}]
    only_one = routerstatus.merge([{"entries": [a]}, {"entries": []}])
    assert only_one["entries"][0]["digest"] is None  # a replica that does not have it at all


def test_projection_cache_gives_the_same_result_and_forgets_deleted_resources() -> None:
    bodies = [_body("McpServer", "a", {"url": "http://a"}), _body("McpServer", "bad", {"url": "ftp://x"})]
    cache: projection.Cache = {}
    first = projection.compile_resources(bodies, cache)
    assert first == projection.compile_resources(bodies) == projection.compile_resources(bodies, cache)
    changed = [_body("McpServer", "a", {"url": "http://changed"})]
    second = projection.compile_resources(changed, cache)
    assert second == projection.compile_resources(changed)
    assert set(cache) == {("McpServer", "ns", "a")}


def test_finished_pod_phases_carry_over() -> None:
    spec = sandbox().spec
    for phase in ("Succeeded", "Failed"):
        status = builders.sandbox_status(
            spec, {"metadata": {"name": "a"}, "status": {"phase": phase}}, None, now=NOW, generation=1
        )
        assert status["phase"] == phase
        ready = conditions.get_condition(status["conditions"], "Ready")
        assert ready is not None and ready["status"] == "False" and ready["reason"] == f"Pod{phase}"


def test_sandboxes_reach_the_router_with_labels_but_without_env_or_identity() -> None:
    body = _body(
        "KarsSandbox",
        "agent",
        {"image": "img:1", "env": [{"name": "TOKEN", "value": "s3cret"}], "identity": {"clientId": "c"}},
    )
    body["metadata"]["labels"] = {"team": "a"}
    (item,) = projection.projected_items(projection.compile_resources([body]), "KarsSandbox")
    assert item["metadata"]["labels"] == {"team": "a"}
    assert "s3cret" not in json.dumps(item) and "identity" not in item["spec"]


async def test_an_event_about_a_cluster_scoped_object_goes_to_the_controllers_namespace(cluster: Any) -> None:
    """A TrustGraph has no namespace: its Events go where the chart lets the controller post them."""
    settings = config.ControllerSettings(api_server=str(cluster.api.url))
    async with kube.api_client(settings) as api:
        graph = {"apiVersion": model.API_VERSION, "kind": "TrustGraph", "metadata": {"name": "mesh", "uid": "u1"}}
        await kube.Kube(api).post_event(
            graph, type_="Warning", reason="RouterRejected", message="nope", home_namespace="kars-system"
        )
    (event,) = cluster.events("kars-system")
    assert (event["involvedObject"]["name"], event["reason"]) == ("mesh", "RouterRejected")
    assert cluster.events("default") == []
