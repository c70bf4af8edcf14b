"""Policy files: strict validation with file:document:field messages, and the compiled snapshot."""

from __future__ import annotations

import base64
import datetime as dt
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from router import cli
from router.policy import load, model, snapshot, store, trustgraph

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def inference(name: str, spec: str, namespace: str = "team-a") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return (
        "apiVersion: kars.azure.com/v1alpha1\nkind: InferencePolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}\n"
    )


def test_examples_validate() -> None:
    result = load.load_dir(EXAMPLES)
    assert result.ok, result.lines()
    kinds = sorted({r.resource.kind for r in result.resources})
    assert kinds == ["InferencePolicy", "KarsSandbox", "McpServer", "ToolPolicy"]


def test_errors_name_file_document_and_field(policy_dir: Path) -> None:
    good = inference("ok", "tokenBudget: {dailyTokens: 10}")
    unknown_field = inference("typo", "tokenBudget: {dailyTokens: 10, dialyTokens: 5}")
    wrong_type = inference("wrong-type", "tokenBudget: {hourlyTokens: lots}")
    bad_enum = inference("bad-enum", "appliesTo: {action: dance}")
    write(policy_dir, "p.yaml", "---\n".join([good, unknown_field, wrong_type, bad_enum]))
    result = load.load_dir(policy_dir)
    file = str(policy_dir / "p.yaml")
    assert [r.resource.name for r in result.resources] == ["ok"]
    assert result.lines() == [
        f"{file}:2: spec.tokenBudget.dialyTokens: unknown field",
        f"{file}:3: spec.tokenBudget.hourlyTokens: Input should be a valid integer",
        f"{file}:4: spec.appliesTo.action: Input should be 'chat', 'responses', 'embeddings', 'image' or '*'",
    ]


def test_strings_are_not_coerced_to_numbers(policy_dir: Path) -> None:
    write(policy_dir, "p.yaml", inference("quoted", 'tokenBudget: {dailyTokens: "100"}'))
    assert (
        load.load_dir(policy_dir).lines()[0].endswith("spec.tokenBudget.dailyTokens: Input should be a valid integer")
    )


def test_unquoted_timestamps_load_as_the_api_server_reads_them(policy_dir: Path) -> None:
    """The same YAML as in a cluster: an unquoted date-time is the string the schema asks for."""
    sandbox = """\
        apiVersion: kars.azure.com/v1alpha1
        kind: KarsSandbox
        metadata: {name: agent-1, namespace: team-a}
        spec:
          image: ghcr.io/example/agent:1
          lifecycle: {shutdownTime: 2030-01-01T00:00:00Z}
        """
    write(policy_dir, "s.yaml", sandbox)
    result = load.load_dir(policy_dir)
    assert result.ok, result.lines()
    (found,) = result.resources
    assert found.resource.spec.lifecycle.shutdown_time == "2030-01-01T00:00:00Z"


def test_cross_field_rules(policy_dir: Path) -> None:
    write(policy_dir, "p.yaml", inference("inverted", "tokenBudget: {hourlyTokens: 100, dailyTokens: 50}"))
    (line,) = load.load_dir(policy_dir).lines()
    assert "dailyTokens (50) must be >= hourlyTokens (100)" in line


def test_unknown_kind_and_non_mapping(policy_dir: Path) -> None:
    write(policy_dir, "a.yaml", "apiVersion: kars.azure.com/v1alpha1\nkind: Budget\nmetadata: {name: x}\nspec: {}\n")
    write(policy_dir, "b.yaml", "- just\n- a list of strings\n")
    lines = load.load_dir(policy_dir).lines()
    assert any("a.yaml:1: kind: unknown kind 'Budget'" in line for line in lines)
    assert any("b.yaml:1: (document): expected a mapping" in line for line in lines)


def test_unparseable_file_is_a_file_error(policy_dir: Path) -> None:
    write(policy_dir, "broken.yaml", "kind: [unclosed\n")
    result = load.load_dir(policy_dir)
    assert not result.ok
    assert result.file_errors[0].file.endswith("broken.yaml")
    assert "cannot parse" in result.file_errors[0].message


def test_projected_json_lists_and_kubernetes_lists(policy_dir: Path) -> None:
    doc = {
        "apiVersion": "kars.azure.com/v1alpha1",
        "kind": "McpServer",
        "metadata": {"name": "docs", "namespace": "team-a", "uid": "ignored", "resourceVersion": "7"},
        "spec": {"url": "http://127.0.0.1:9/mcp"},
    }
    (policy_dir / "McpServer.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [doc]}))
    other = dict(doc, metadata={"name": "wiki", "namespace": "team-a"})
    (policy_dir / "more.json").write_text(json.dumps([other]))
    result = load.load_dir(policy_dir)
    assert result.ok, result.lines()
    assert sorted(r.resource.name for r in result.resources) == ["docs", "wiki"]


def test_configmap_volume_layout_is_followed(policy_dir: Path) -> None:
    # kubelet writes ..<timestamp>/file, points ..data at it, and links file -> ..data/file.
    real = policy_dir / "..2026_11_22_12_00_00.1"
    real.mkdir()
    write(real, "InferencePolicy.yaml", inference("cm", "tokenBudget: {dailyTokens: 10}"))
    (policy_dir / "..data").symlink_to(real.name)
    (policy_dir / "InferencePolicy.yaml").symlink_to("..data/InferencePolicy.yaml")
    result = load.load_dir(policy_dir)
    assert result.ok and [r.resource.name for r in result.resources] == ["cm"]


def test_cluster_scoped_trustgraph_refuses_a_namespace(policy_dir: Path) -> None:
    write(
        policy_dir,
        "tg.yaml",
        "apiVersion: kars.azure.com/v1alpha1\nkind: TrustGraph\nmetadata: {name: g, namespace: x}\nspec: {}\n",
    )
    (line,) = load.load_dir(policy_dir).lines()
    assert "cluster-scoped" in line


def test_floor_loosening_is_rejected_with_the_field(policy_dir: Path) -> None:
    write(policy_dir, "p.yaml", inference("loose", "contentSafety: {violence: High, failOpen: true}"))
    st = store.PolicyStore(policy_dir, model.SafetyFloor())
    outcome = st._reload_blocking()
    assert outcome.result == "error"
    (err,) = outcome.errors
    assert "spec.contentSafety.violence: High is looser than the cluster floor (Medium)" in err
    assert "spec.contentSafety.failOpen: the cluster floor does not allow failOpen" in err
    assert st.snapshot.inference_policies("team-a", "x", "chat") == ()
    # A floor that allows it accepts the same policy.
    permissive = model.SafetyFloor(violence="High", allow_fail_open=True)
    assert store.PolicyStore(policy_dir, permissive)._reload_blocking().result == "ok"


def test_policy_validate_cli_exit_codes(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "validate", str(EXAMPLES)]) == 0
    write(policy_dir, "p.yaml", inference("typo", "tokenBudget: {dailyTokenz: 1}"))
    assert cli.main(["policy", "validate", str(policy_dir)]) == 1
    assert f"{policy_dir / 'p.yaml'}:1: spec.tokenBudget.dailyTokenz: unknown field" in capsys.readouterr().out


# -- the snapshot ---------------------------------------------------------------------------


def test_inference_policy_resolution(policy_dir: Path) -> None:
    write(
        policy_dir,
        "p.yaml",
        "---\n".join(
            [
                "apiVersion: kars.azure.com/v1alpha1\nkind: KarsSandbox\n"
                "metadata: {name: a1, namespace: team-a, labels: {tier: gold}}\nspec: {image: img}\n",
                inference("ns-wide", "tokenBudget: {dailyTokens: 100}"),
                inference("gold", "appliesTo: {sandboxMatchLabels: {tier: gold}}"),
                inference("only-a1-chat", "appliesTo: {sandboxName: a1, action: chat}"),
                inference("other-ns", "tokenBudget: {dailyTokens: 1}", namespace="team-b"),
            ]
        ),
    )
    st = store.PolicyStore(policy_dir, model.SafetyFloor())
    assert st._reload_blocking().result == "ok"
    snap = st.snapshot
    names = [p.name for p in snap.inference_policies("team-a", "a1", "chat")]
    assert names == ["only-a1-chat", "gold", "ns-wide"]  # most specific first
    assert [p.name for p in snap.inference_policies("team-a", "a1", "embeddings")] == ["gold", "ns-wide"]
    assert [p.name for p in snap.inference_policies("team-a", "a2", "chat")] == ["ns-wide"]
    assert [p.name for p in snap.inference_policies("team-b", "a1", "chat")] == ["other-ns"]
    # Memoised: the same tuple object comes back.
    assert snap.inference_policies("team-a", "a1", "chat") is snap.inference_policies("team-a", "a1", "chat")


def _b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _edge(key: ed25519.Ed25519PrivateKey, src: str, dst: str, score: int, not_after: str | None = None) -> dict:
    edge = model.Edge.model_validate(
        {
            "from": src,
            "to": dst,
            "score": score,
            "issuedAt": "2026-11-01T00:00:00Z",
            "notAfter": not_after,
            "signature": "x",
        }
    )
    sig = key.sign(trustgraph.signing_input(edge))
    return edge.model_dump(by_alias=True, exclude_none=True) | {"signature": _b64u(sig)}


def write_graph(policy_dir: Path, name: str, **spec: Any) -> None:
    """A TrustGraph ``name`` with ``spec`` (its keys as in the CRD), as the controller projects it."""
    doc = {"apiVersion": "kars.azure.com/v1alpha1", "kind": "TrustGraph", "metadata": {"name": name}, "spec": spec}
    (policy_dir / f"{name}.json").write_text(json.dumps(doc))


def test_trustgraph_edges_verified_at_load(policy_dir: Path) -> None:
    alice, bob, mallory = (ed25519.Ed25519PrivateKey.generate() for _ in range(3))
    pub = {
        n: _b64u(k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        for n, k in (("ns/alice", alice), ("ns/bob", bob))
    }
    forged = _edge(mallory, "ns/bob", "ns/alice", 900)  # bob's name, mallory's key
    edges = [
        _edge(alice, "ns/alice", "ns/bob", 800),
        forged,
        _edge(alice, "ns/alice", "ns/carol", 100),
        _edge(alice, "ns/alice", "ns/dave", 900, not_after="2026-11-01T00:00:00Z"),
        _edge(alice, "ns/alice", "ns/erin", 900, not_after="2026-11-22T12:30:00Z"),
    ]
    vertices = [{"id": v, "publicKeyB64u": k} for v, k in pub.items()]
    write_graph(policy_dir, "mesh", minScore=500, vertices=vertices, edges=edges)
    st = store.PolicyStore(policy_dir, model.SafetyFloor(), clock=lambda: NOW)
    st._reload_blocking()
    snap = st.snapshot
    assert snap.trust_edge("ns/alice", "ns/bob", NOW) is not None
    assert snap.trust_edge("ns/bob", "ns/alice", NOW) is None  # forged signature
    assert snap.trust_edge("ns/alice", "ns/carol", NOW) is None  # below minScore
    assert snap.trust_edge("ns/alice", "ns/dave", NOW) is None  # expired before load
    assert snap.trust_edge("ns/alice", "ns/erin", NOW) is not None
    assert snap.trust_edge("ns/alice", "ns/erin", NOW + dt.timedelta(hours=1)) is None  # expires later
    (entry,) = st.status()["entries"]
    reasons = "\n".join(entry["warnings"])
    assert "ns/bob -> ns/alice dropped: signature does not verify" in reasons
    assert "ns/alice -> ns/carol dropped: score 100 below minScore 500" in reasons
    assert "ns/alice -> ns/dave dropped: expired" in reasons


def test_a_pair_vouched_for_by_two_graphs_outlives_the_stronger_edge(policy_dir: Path) -> None:
    """The strongest edge counts while it is live; when it expires, another graph's edge still does."""
    alice = ed25519.Ed25519PrivateKey.generate()
    vertices = [
        {"id": "ns/alice", "publicKeyB64u": _b64u(alice.public_key().public_bytes(*RAW))},
        {"id": "ns/bob", "publicKeyB64u": _b64u(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(*RAW))},
    ]
    for name, edge in (
        ("strong", _edge(alice, "ns/alice", "ns/bob", 900, not_after="2026-11-22T12:30:00Z")),
        ("lasting", _edge(alice, "ns/alice", "ns/bob", 600)),
    ):
        write_graph(policy_dir, name, minScore=500, vertices=vertices, edges=[edge])
    st = store.PolicyStore(policy_dir, model.SafetyFloor(), clock=lambda: NOW)
    st._reload_blocking()
    assert st.snapshot.trust_edge("ns/alice", "ns/bob", NOW).score == 900  # type: ignore[union-attr]
    later = st.snapshot.trust_edge("ns/alice", "ns/bob", NOW + dt.timedelta(hours=1))
    assert later is not None and later.score == 600


def test_snapshot_lookup_is_a_dictionary_hit() -> None:
    res = model.McpServer.model_validate(
        {
            "apiVersion": "kars.azure.com/v1alpha1",
            "kind": "McpServer",
            "metadata": {"name": "m", "namespace": "n"},
            "spec": {"url": "http://x"},
        }
    )
    entry = snapshot.Entry(res, "sha256:0", load.Source("f", 1))
    snap = snapshot.Snapshot([entry], generation=1, now=NOW)
    assert snap.mcp_server("n", "m") is res
    assert snap.mcp_server("other", "m") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-01T00:00:00Z", dt.datetime(2030, 1, 1, tzinfo=dt.UTC)),
        ("2030-01-01t00:00:00z", dt.datetime(2030, 1, 1, tzinfo=dt.UTC)),  # RFC 3339 §5.6: either case
        ("2030-01-01T01:00:00.5+01:00", dt.datetime(2030, 1, 1, 0, 0, 0, 500_000, tzinfo=dt.UTC)),
        ("2030-01-01T00:00:00.123456789Z", dt.datetime(2030, 1, 1, 0, 0, 0, 123_456, tzinfo=dt.UTC)),
    ],
)
def test_rfc_3339_timestamps(text: str, expected: dt.datetime) -> None:
    assert model.parse_timestamp(text) == expected


@pytest.mark.parametrize(
    "text",
    ["20300101T000000Z", "2030-W01-1T00:00:00Z", "2030-01-01T00:00Z", "2030-01-01", "2030-02-30T00:00:00Z", "+01"],
)
def test_other_iso_8601_forms_are_not_rfc_3339(text: str) -> None:
    """Python's fromisoformat takes these; the API server's date-time format does not."""
    with pytest.raises(ValueError, match="not an RFC 3339 timestamp"):
        model.parse_timestamp(text)
    with pytest.raises(ValueError, match="needs a UTC offset"):
        model.parse_timestamp("2030-01-01T00:00:00")


def test_a_vertex_listed_twice_is_refused(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two keys for one vertex: the graph says which signs for it, not the last one listed."""
    one, two = (_b64u(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()) for _ in range(2))
    write_graph(
        policy_dir, "mesh", vertices=[{"id": "ns/a", "publicKeyB64u": one}, {"id": "ns/a", "publicKeyB64u": two}]
    )
    (line,) = load.load_dir(policy_dir).lines()
    assert "vertex 'ns/a' is listed twice: a vertex has one key" in line


def test_policy_validate_names_the_edges_that_will_not_count(
    policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid (exit 0), as the router loads it, but each dropped edge is a warning with its reason."""
    alice = ed25519.Ed25519PrivateKey.generate()
    vertices = [{"id": "ns/alice", "publicKeyB64u": _b64u(alice.public_key().public_bytes_raw())}]
    edges = [
        _edge(alice, "ns/alice", "ns/bob", 800),
        _edge(alice, "ns/alice", "ns/carol", 100),
        _edge(alice, "ns/alice", "ns/dave", 900, not_after="2021-01-01T00:00:00Z"),
    ]
    write_graph(policy_dir, "mesh", minScore=500, vertices=vertices, edges=edges)
    assert cli.main(["policy", "validate", str(policy_dir)]) == 0
    out, err = capsys.readouterr()
    where = f"{policy_dir / 'mesh.json'}:1: warning:"
    assert out.splitlines() == [
        f"{where} edge ns/alice -> ns/carol dropped: score 100 below minScore 500",
        f"{where} edge ns/alice -> ns/dave dropped: expired at 2021-01-01T00:00:00Z",
    ]
    assert err == f"ok: 1 resources in {policy_dir}, 2 warnings\n"
