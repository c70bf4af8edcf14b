"""TrustGraph admission on a real router: every way an edge can fail to count is a 403 before any upgrade."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.sync import client as ws_sync

from router.identity import devtokens
from router.identity.principal import Principal
from router.middleware import trust_graph
from tests.support import trustgraphs, waiting


def mesh_status(srv: Any, caller: str, peer: str) -> tuple[int, str | None]:
    """The HTTP status of a mesh upgrade attempt (101 when accepted) and the error code if refused."""
    tok = devtokens.issue(srv.app.state.kars.dev_key, caller, audience="kars-router")
    url = srv.url.replace("http://", "ws://") + f"/mesh/{peer}"
    try:
        with ws_sync.connect(url, additional_headers={"Authorization": f"Bearer {tok}"}) as conn:
            conn.close()
            return 101, None
    except websockets.InvalidStatus as exc:
        body = json.loads(exc.response.body or b"{}")
        return exc.response.status_code, body.get("error", {}).get("code")


def warnings(srv: Any) -> list[str]:
    entries = httpx.get(f"{srv.url}/internal/policy-status", timeout=5).json()["entries"]
    return [w for e in entries if e["kind"] == "TrustGraph" for w in e.get("warnings", [])]


@pytest.fixture
def start(router_server: Callable[..., Any], policy_dir: Path) -> Callable[[trustgraphs.Graph], Any]:
    def run(graph: trustgraphs.Graph) -> Any:
        graph.write(policy_dir)
        return router_server(mesh={"pairTimeoutS": 0.2})

    return run


def test_verified_edge_admits_and_missing_edge_is_403(start: Callable[..., Any]) -> None:
    srv = start(trustgraphs.Graph().edge("ns/a", "ns/b"))
    assert mesh_status(srv, "ns/a", "ns/b") == (101, None)
    assert mesh_status(srv, "ns/b", "ns/a") == (403, "trust_edge_missing")  # edges are directed
    assert mesh_status(srv, "ns/a", "ns/zed") == (403, "trust_edge_missing")


def test_forged_edge_signature_is_dropped_and_reported(start: Callable[..., Any]) -> None:
    graph = trustgraphs.Graph().edge("ns/a", "ns/b", signer="ns/mallory")  # not ns/a's key
    srv = start(graph)
    assert mesh_status(srv, "ns/a", "ns/b") == (403, "trust_edge_missing")
    assert warnings(srv) == ["edge ns/a -> ns/b dropped: signature does not verify"]


def test_edge_below_min_score_is_403(start: Callable[..., Any]) -> None:
    srv = start(trustgraphs.Graph(min_score=500).edge("ns/a", "ns/b", score=499).edge("ns/a", "ns/c", score=500))
    assert mesh_status(srv, "ns/a", "ns/b") == (403, "trust_edge_missing")
    assert mesh_status(srv, "ns/a", "ns/c") == (101, None)
    assert warnings(srv) == ["edge ns/a -> ns/b dropped: score 499 below minScore 500"]


def test_expired_edge_is_403(start: Callable[..., Any]) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    srv = start(trustgraphs.Graph().edge("ns/a", "ns/b", not_after=past))
    assert mesh_status(srv, "ns/a", "ns/b") == (403, "trust_edge_missing")
    assert len(warnings(srv)) == 1 and "expired" in warnings(srv)[0]


def test_edge_expiring_while_loaded_stops_admitting(start: Callable[..., Any]) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    srv = start(trustgraphs.Graph().edge("ns/a", "ns/b", not_after=soon))
    assert mesh_status(srv, "ns/a", "ns/b") == (101, None)
    waiting.until(lambda: mesh_status(srv, "ns/a", "ns/b")[0] == 403, timeout_s=10, what="the edge to expire")


def test_a2a_route_needs_an_edge_to_the_agent_in_the_callers_namespace(
    start: Callable[..., Any], policy_dir: Path
) -> None:
    agents = [
        f"apiVersion: kars.azure.com/v1alpha1\nkind: A2AAgent\nmetadata: {{name: agent, namespace: {ns}}}\n"
        "spec: {endpointUrl: 'http://127.0.0.1:9/'}\n"
        for ns in ("ns", "other")
    ]
    (policy_dir / "agents.yaml").write_text("---\n".join(agents))
    srv = start(trustgraphs.Graph().edge("ns/a", "other/agent"))
    tok = devtokens.issue(srv.app.state.kars.dev_key, "ns/a", audience="kars-router")
    auth = {"Authorization": f"Bearer {tok}"}
    # ns/a calling /a2a/agent means ns/agent: the edge to other/agent does not count.
    resp = httpx.post(f"{srv.url}/a2a/agent", headers=auth, json={}, timeout=5)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "trust_edge_missing"
    # An agent that does not exist in the caller's namespace is a 404, edge or not.
    resp = httpx.post(f"{srv.url}/a2a/nobody", headers=auth, json={}, timeout=5)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_target_of_paths() -> None:
    who = Principal("sandbox", "team/me", "router-token")
    assert trust_graph.target_of("/a2a/helper", who) == "team/helper"
    assert trust_graph.target_of("/a2a/helper/.well-known/agent-card.json", who) == "team/helper"
    assert trust_graph.target_of("/mesh/other/peer", who) == "other/peer"
    assert trust_graph.target_of("/mesh/other", who) is None
    assert trust_graph.target_of("/mesh/a/b/c", who) is None
    assert trust_graph.target_of("/a2a/", who) is None
    assert trust_graph.target_of("/v1/whoami", who) is None
