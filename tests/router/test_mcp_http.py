"""The MCP routes at the HTTP level: every status code of the spec, session binding, policy, failure.

Raw JSON-RPC over httpx against the router fronting a real ``mcp`` SDK server, so each header
and status is checked exactly (the SDK client hides them).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.router import mcp_support as ms
from tests.support import servers, waiting

VERSION = "2025-11-25"
ACCEPT_BOTH = "application/json, text/event-stream"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}


@pytest.fixture
def upstream() -> Iterator[tuple[servers.ServerThread, str]]:
    with ms.upstream_server("streamable-http") as pair:
        yield pair


@pytest.fixture
def start(
    upstream: tuple[servers.ServerThread, str], router_server: Callable[..., Any], policy_dir: Path
) -> Callable[..., Any]:
    """``start(*extra_docs, **settings)``: the router with McpServer ``tools`` (+ docs) in team-a."""

    def run(*docs: str, **tree: Any) -> Any:
        ms.write_policy(policy_dir, ms.mcp_server_doc("tools", upstream[1], "streamable-http"), *docs)
        return router_server(**tree)

    return run


def headers(router: Any, sandbox: str = ms.SANDBOX, **extra: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {ms.token(router, sandbox)}",
        "accept": ACCEPT_BOTH,
        "content-type": "application/json",
        **extra,
    }


def sse_messages(resp: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a POST's answer: a JSON body, or the events of an SSE stream."""
    if resp.headers["content-type"] == "application/json":
        body = resp.json()
        return body if isinstance(body, list) else [body]
    assert resp.headers["content-type"].startswith("text/event-stream")
    return [json.loads(e.data) for e in httpx_sse.EventSource(resp).iter_sse() if e.event == "message"]


def initialize(router: Any, sandbox: str = ms.SANDBOX) -> str:
    url = f"{router.url}/mcp/tools"
    resp = httpx.post(url, json=INIT, headers=headers(router, sandbox), timeout=10)
    assert resp.status_code == 200, resp.text
    assert sse_messages(resp)[0]["result"]["protocolVersion"] == VERSION
    session = resp.headers["mcp-session-id"]
    done = httpx.post(
        url,
        json={"jsonrpc": "2.0", "method": "notifications/initialized"},
        headers=headers(router, sandbox, **{"mcp-session-id": session, "mcp-protocol-version": VERSION}),
        timeout=10,
    )
    assert done.status_code == 202 and done.content == b""
    return session


def call(router: Any, session: str, tool: str, args: dict[str, Any], *, rid: int = 7, **kw: str) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool, "arguments": args}}
    hdrs = headers(router, **{"mcp-session-id": session, "mcp-protocol-version": VERSION, **kw})
    return httpx.post(f"{router.url}/mcp/tools", json=body, headers=hdrs, timeout=10)


def test_status_codes(start: Callable[..., Any]) -> None:
    router = start()
    url = f"{router.url}/mcp/tools"
    session = initialize(router)
    with_session = {"mcp-session-id": session, "mcp-protocol-version": VERSION}
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}

    ok = httpx.post(url, json=ping, headers=headers(router, **with_session))
    assert ok.status_code == 200 and sse_messages(ok) == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    assert ok.headers["content-type"] == "application/json"  # nothing came before the response: plain JSON
    progress = {"name": "count", "arguments": {"n": 2}, "_meta": {"progressToken": 1}}
    counting = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": progress}
    counted = httpx.post(url, json=counting, headers=headers(router, **with_session))  # progress first: a stream
    assert counted.headers["content-type"].startswith("text/event-stream")
    assert [m.get("method", "response") for m in sse_messages(counted)][-1] == "response"

    cases: list[tuple[str, dict[str, str], Any, int]] = [
        ("POST", {"accept": "application/json"}, ping, 406),
        ("POST", {"accept": "text/event-stream"}, ping, 406),
        ("GET", {"accept": "application/json"}, None, 406),
        ("POST", {"content-type": "text/plain"}, ping, 415),
        ("POST", {"mcp-session-id": ""}, ping, 400),  # no session id after initialize
        ("POST", {"mcp-protocol-version": "2099-01-01"}, ping, 400),
        ("POST", {}, {"not": "json-rpc"}, 400),
        ("POST", {"mcp-session-id": "forged-or-expired"}, ping, 404),
        ("PUT", {}, ping, 405),
        ("POST", {"origin": "http://evil.example"}, ping, 403),
    ]
    for method, extra, body, status in cases:
        hdrs = {k: v for k, v in {**headers(router, **with_session), **extra}.items() if v}
        resp = httpx.request(method, url, json=body, headers=hdrs, timeout=10)
        assert resp.status_code == status, (method, extra, resp.status_code, resp.text)
        if status == 405:
            assert resp.headers["allow"] == "GET, POST, DELETE"
    broken = httpx.post(url, content=b"{nope", headers=headers(router, **with_session))
    assert broken.status_code == 400

    loopback = httpx.post(url, json=ping, headers=headers(router, origin="http://localhost:3000", **with_session))
    assert loopback.status_code == 200  # loopback origins are allowed by default

    note = {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}
    assert httpx.post(url, json=note, headers=headers(router, **with_session)).status_code == 202

    gone = httpx.delete(url, headers=headers(router, **with_session))
    assert gone.status_code == 200
    assert httpx.post(url, json=ping, headers=headers(router, **with_session)).status_code == 404
    assert len(router.app.state.kars.mcp.table) == 0


def test_server_names_resolve_in_the_callers_namespace_only(start: Callable[..., Any], upstream: Any) -> None:
    router = start(ms.mcp_server_doc("theirs", upstream[1], "streamable-http", namespace="team-b"))
    assert httpx.post(f"{router.url}/mcp/theirs", json=INIT, headers=headers(router)).status_code == 404
    assert httpx.post(f"{router.url}/mcp/nothing", json=INIT, headers=headers(router)).status_code == 404
    assert httpx.get(f"{router.url}/mcp/nothing/sse", headers=headers(router)).status_code == 404


def test_a_session_belongs_to_the_principal_that_opened_it(start: Callable[..., Any]) -> None:
    router = start()
    session = initialize(router)
    for thief in ("team-a/other", "team-b/agent"):
        hdrs = headers(router, thief, **{"mcp-session-id": session, "mcp-protocol-version": VERSION})
        body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
        assert httpx.post(f"{router.url}/mcp/tools", json=body, headers=hdrs).status_code == 404
        assert httpx.get(f"{router.url}/mcp/tools", headers=hdrs).status_code == 404
        assert httpx.delete(f"{router.url}/mcp/tools", headers=hdrs).status_code == 404
        legacy = httpx.post(f"{router.url}/mcp/tools/messages?sessionId={session}", json=body, headers=hdrs)
        assert legacy.status_code == 404
    # the owner still has it
    assert sse_messages(call(router, session, "echo", {"text": "mine"}))[0]["result"]["content"][0]["text"] == "mine"


def test_denied_and_rate_limited_tools(start: Callable[..., Any]) -> None:
    router = start(
        ms.tool_policy_doc("no-secret", "appliesTo: {mcpServer: tools, tool: secret}\ndecision: deny\n"),
        ms.tool_policy_doc(
            "slow-echo", "appliesTo: {mcpServer: tools, tool: echo}\ndecision: allow\nrateLimit: {rps: 0.5, burst: 2}\n"
        ),
    )
    session = initialize(router)
    denied = sse_messages(call(router, session, "secret", {}))
    assert denied[0]["error"]["code"] == -32001
    assert "ToolPolicy team-a/no-secret" in denied[0]["error"]["message"]
    results = [sse_messages(call(router, session, "echo", {"text": str(i)}, rid=10 + i))[0] for i in range(3)]
    assert [r.get("result", {}).get("content", [{}])[0].get("text") for r in results[:2]] == ["0", "1"]
    limited = results[2]["error"]
    assert limited["code"] == -32005 and limited["data"]["retryAfterMs"] == 2000
    assert "retry after" in limited["message"]
    # the session stays open after both refusals
    assert "result" in sse_messages(call(router, session, "bearer", {}))[0]


def test_a_wildcard_rate_limit_is_one_bucket_whatever_tool_is_named(start: Callable[..., Any]) -> None:
    """SPEC §3: a ToolPolicy's rateLimit limits the calls it admits. Under ``tool: "*"`` a made-up
    tool name is limited with the rest (a fresh bucket per name would let a caller reset its limit)."""
    router = start(
        ms.tool_policy_doc(
            "all-tools", "appliesTo: {mcpServer: tools, tool: '*'}\ndecision: allow\nrateLimit: {rps: 0.01, burst: 1}\n"
        )
    )
    session = initialize(router)
    assert "result" in sse_messages(call(router, session, "echo", {"text": "first"}))[0]
    for i, tool in enumerate(["echo", "made-up-1", "made-up-2", "secret"]):
        (limited,) = sse_messages(call(router, session, tool, {}, rid=20 + i))
        assert limited["error"]["code"] == -32005, limited
        assert limited["error"]["data"]["retryAfterMs"] == 100_000


def tool_call_series(router: Any) -> dict[tuple[str, str, str], float]:
    """``kars_mcp_tool_calls_total`` from ``/metrics``: (tool, decision, outcome) -> count."""
    text = httpx.get(f"{router.url}/metrics", timeout=10).text
    return {
        (s.labels["tool"], s.labels["decision"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "kars_mcp_tool_calls"
        for s in family.samples
        if s.name == "kars_mcp_tool_calls_total"
    }


def test_tool_metrics_name_only_known_tools(start: Callable[..., Any]) -> None:
    """A tool name is a metric label only when the upstream listed it in the session or a policy
    names it; made-up names, allowed or denied, are one series "other" (the audit log keeps them)."""
    router = start(ms.tool_policy_doc("no-secret", "appliesTo: {mcpServer: tools, tool: secret}\ndecision: deny\n"))
    audit = io.StringIO()
    router.app.state.kars.audit_log.stream = audit  # the audit lines are written here from now on
    session = initialize(router)
    for i in range(20):
        call(router, session, f"made-up-{i}", {}, rid=100 + i)
    assert sse_messages(call(router, session, "echo", {"text": "x"}, rid=10))[0]["result"]
    assert sse_messages(call(router, session, "secret", {}, rid=11))[0]["error"]["code"] == -32001
    listed = httpx.post(
        f"{router.url}/mcp/tools",
        json={"jsonrpc": "2.0", "id": 12, "method": "tools/list"},
        headers=headers(router, **{"mcp-session-id": session, "mcp-protocol-version": VERSION}),
        timeout=10,
    )
    assert "echo" in [t["name"] for t in sse_messages(listed)[0]["result"]["tools"]]
    assert sse_messages(call(router, session, "echo", {"text": "y"}, rid=13))[0]["result"]

    series = tool_call_series(router)
    assert {tool for tool, _, _ in series} == {"other", "secret", "echo"}
    assert sum(n for (tool, _, _), n in series.items() if tool == "other") == 21  # echo before tools/list
    assert series[("secret", "deny", "denied")] == 1  # named by the policy, never listed (denied)
    assert series[("echo", "allow", "ok")] == 1
    waiting.until(lambda: audit.getvalue().count("\n") >= 23, what="the audit records")  # buffered
    logged = [json.loads(line)["tool"] for line in audit.getvalue().splitlines()]
    assert logged[:20] == [f"made-up-{i}" for i in range(20)]


def test_allowed_tools_empty_means_none(start: Callable[..., Any], upstream: Any, policy_dir: Path) -> None:
    router = start()
    ms.write_policy(policy_dir, ms.mcp_server_doc("tools", upstream[1], "streamable-http", "allowedTools: []\n"))
    router.call(router.app.state.kars.policy.reload())
    session = initialize(router)
    listed = httpx.post(
        f"{router.url}/mcp/tools",
        json={"jsonrpc": "2.0", "id": 5, "method": "tools/list"},
        headers=headers(router, **{"mcp-session-id": session}),
    )
    assert sse_messages(listed)[0]["result"]["tools"] == []
    refused = sse_messages(call(router, session, "echo", {"text": "x"}))[0]["error"]
    assert refused["code"] == -32001 and "allowedTools" in refused["message"]


def test_allowed_sandboxes_checked_before_any_upstream_contact(
    router_server: Callable[..., Any], policy_dir: Path, dead_port: int
) -> None:
    dead = f"http://127.0.0.1:{dead_port}/mcp"  # nothing listens: contact would be a 502
    sandbox = (
        "apiVersion: kars.azure.com/v1alpha1\nkind: KarsSandbox\n"
        "metadata: {name: agent, namespace: team-a, labels: {tier: gold}}\nspec: {image: busybox}\n"
    )
    ms.write_policy(
        policy_dir, sandbox, ms.mcp_server_doc("tools", dead, "sse", "allowedSandboxes: {matchLabels: {tier: gold}}\n")
    )
    router = router_server()
    refused = httpx.get(f"{router.url}/mcp/tools/sse", headers=headers(router, "team-a/other"))
    assert refused.status_code == 403
    refused = httpx.post(f"{router.url}/mcp/tools", json=INIT, headers=headers(router, "team-a/other"))
    assert refused.status_code == 403
    allowed = httpx.get(f"{router.url}/mcp/tools/sse", headers=headers(router))
    assert allowed.status_code == 502  # the gold sandbox passes the gate and reaches the (dead) upstream


def test_last_event_id_resumes_a_broken_stream(start: Callable[..., Any]) -> None:
    router = start()
    session = initialize(router)
    body = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "tools/call",
        "params": {"name": "count", "arguments": {"n": 3, "step_s": 0.2}, "_meta": {"progressToken": "p"}},
    }
    hdrs = headers(router, **{"mcp-session-id": session, "mcp-protocol-version": VERSION})
    with (
        httpx.Client(timeout=10) as client,
        httpx_sse.connect_sse(client, "POST", f"{router.url}/mcp/tools", json=body, headers=hdrs) as source,
    ):
        first = next(e for e in source.iter_sse() if e.event == "message")  # then drop the connection
    assert json.loads(first.data)["method"] == "notifications/progress"
    # The tool is still running: the resumed GET takes the stream over from the dropped POST.
    hdrs = headers(router, **{"mcp-session-id": session, "last-event-id": first.id})
    resumed = httpx.get(f"{router.url}/mcp/tools", headers=hdrs, timeout=10)
    rest = sse_messages(resumed)
    assert [m.get("params", {}).get("progress") for m in rest[:-1]] == [2, 3]
    assert rest[-1]["id"] == 9 and rest[-1]["result"]["content"][0]["text"] == "counted 3"
    unknown = httpx.get(f"{router.url}/mcp/tools", headers={**hdrs, "last-event-id": "99.1"})
    assert unknown.status_code == 404
    # Not an event id of ours: 400 (a 404 would tell the client its session is gone), no traceback.
    # b"\xb2" is a superscript two in Latin-1: str.isdigit() holds, int() refuses it.
    for garbled in (b"\xb2.1", b"0.\xb9", b"x.1", b"1", b"0.1.2", b"1" * 5000 + b".1"):
        raw = [(k.encode(), v.encode()) for k, v in hdrs.items() if k != "last-event-id"]
        resp = httpx.get(f"{router.url}/mcp/tools", headers=[*raw, (b"last-event-id", garbled)], timeout=10)
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, "invalid_request"), (garbled, resp.text)
    ping = {"jsonrpc": "2.0", "id": 10, "method": "ping"}
    alive = httpx.post(f"{router.url}/mcp/tools", json=ping, headers=headers(router, **{"mcp-session-id": session}))
    assert sse_messages(alive) == [{"jsonrpc": "2.0", "id": 10, "result": {}}]


def test_second_get_stream_is_a_conflict(start: Callable[..., Any]) -> None:
    router = start(mcp={"keepAliveS": 0.05})
    session = initialize(router)
    hdrs = headers(router, **{"mcp-session-id": session})
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{router.url}/mcp/tools", headers=hdrs) as first,
    ):
        assert first.status_code == 200
        chunks = first.iter_raw()  # held: a dropped iterator would close the stream
        assert next(chunks).startswith(b": keep-alive")  # idle streams get keep-alive comments
        assert client.get(f"{router.url}/mcp/tools", headers=hdrs).status_code == 409


def test_session_cap_and_idle_expiry(start: Callable[..., Any]) -> None:
    router = start(mcp={"maxSessionsPerPrincipal": 1, "sessionIdleTimeoutS": 0.3})
    session = initialize(router)
    again = httpx.post(f"{router.url}/mcp/tools", json=INIT, headers=headers(router))
    assert again.status_code == 429 and again.json()["error"]["code"] == "too_many_sessions"
    assert initialize(router, "team-a/other")  # the cap is per principal
    router.call(router.app.state.kars.mcp.table.wait_size(0), timeout=5)  # the reaper ended both
    assert call(router, session, "echo", {"text": "late"}).status_code == 404
    assert initialize(router)  # a new session after expiry


def test_upstream_killed_mid_call_ends_the_session_cleanly(router_server: Callable[..., Any], policy_dir: Path) -> None:
    port = servers.free_port()
    upstream = servers.ServerThread(ms.build_upstream().streamable_http_app(), port=port)
    upstream.start_and_wait()
    ms.write_policy(policy_dir, ms.mcp_server_doc("tools", f"{upstream.url}/mcp", "streamable-http"))
    router = router_server(mcp={"keepAliveS": 0.05})  # a silent tool: the answer turns SSE, with keep-alives
    session = initialize(router)
    body = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "hang", "arguments": {}}}
    hdrs = headers(router, **{"mcp-session-id": session, "mcp-protocol-version": VERSION})
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{router.url}/mcp/tools", json=body, headers=hdrs) as pending,
    ):
        assert pending.status_code == 200
        ms.kill(upstream)  # while the call is in flight
        lost = [json.loads(e.data) for e in httpx_sse.EventSource(pending).iter_sse()]
    assert lost[-1]["id"] == 4 and lost[-1]["error"]["code"] == -32006
    assert call(router, session, "echo", {"text": "x"}).status_code == 404  # the client re-initializes
    with ms.upstream_server("streamable-http") as (_srv, url):
        ms.write_policy(policy_dir, ms.mcp_server_doc("tools", url, "streamable-http"))
        router.call(router.app.state.kars.policy.reload())
        fresh = initialize(router)
        assert sse_messages(call(router, fresh, "echo", {"text": "back"}))[0]["result"]["content"][0]["text"] == "back"
        assert httpx.delete(f"{router.url}/mcp/tools", headers=headers(router, **{"mcp-session-id": fresh})).is_success


def test_policy_reload_applies_to_open_sessions(start: Callable[..., Any], upstream: Any, policy_dir: Path) -> None:
    router = start()
    session = initialize(router)
    assert "result" in sse_messages(call(router, session, "secret", {}))[0]
    ms.write_policy(
        policy_dir,
        ms.mcp_server_doc("tools", upstream[1], "streamable-http"),
        ms.tool_policy_doc("no-secret", "appliesTo: {mcpServer: tools, tool: secret}\ndecision: deny\n"),
    )
    router.call(router.app.state.kars.policy.reload())
    assert sse_messages(call(router, session, "secret", {}))[0]["error"]["code"] == -32001
    listed = httpx.post(
        f"{router.url}/mcp/tools",
        json={"jsonrpc": "2.0", "id": 5, "method": "tools/list"},
        headers=headers(router, **{"mcp-session-id": session}),
    )
    names = [t["name"] for t in sse_messages(listed)[0]["result"]["tools"]]
    assert "echo" in names and "secret" not in names


def test_legacy_sse_endpoint_event_keepalive_and_statuses(start: Callable[..., Any]) -> None:
    router = start(mcp={"keepAliveS": 0.05})
    auth = {"authorization": f"Bearer {ms.token(router)}"}
    with (
        httpx.Client(base_url=router.url, timeout=10, headers=auth) as client,
        client.stream("GET", "/mcp/tools/sse", headers={"accept": "text/event-stream"}) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines) == "event: endpoint"
        endpoint = next(lines).removeprefix("data: ")
        assert endpoint.startswith("/mcp/tools/messages?sessionId=")  # relative: on the router's own origin
        assert next(lines) == ""
        assert next(lines) == ": keep-alive"
        json_type = {"content-type": "application/json"}
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        assert client.post(endpoint, json=INIT).status_code == 202  # the reply comes down the stream
        assert client.post("/mcp/tools/messages", json=ping).status_code == 400  # no sessionId
        assert client.post("/mcp/tools/messages?sessionId=nope", json=ping).status_code == 404
        assert client.post(endpoint, content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
        assert client.post(endpoint, content=b"{nope", headers=json_type).status_code == 400
        assert client.post(endpoint, json=ping, headers={"origin": "http://evil.example"}).status_code == 403
        reply = next(line for line in lines if line.startswith("data: "))
        assert json.loads(reply.removeprefix("data: "))["result"]["protocolVersion"] == VERSION
    assert httpx.get(f"{router.url}/mcp/tools/sse", headers={**auth, "accept": "application/json"}).status_code == 406
    router.call(router.app.state.kars.mcp.table.wait_size(0), timeout=5)  # the stream closed: session over
    # A HEAD gets a GET's headers and opens no session (no upstream session either).
    head = httpx.head(f"{router.url}/mcp/tools/sse", headers=auth, timeout=10)
    assert (head.status_code, head.headers["content-type"]) == (200, "text/event-stream")
    assert len(router.app.state.kars.mcp.table) == 0
    assert httpx.head(f"{router.url}/mcp/nothing/sse", headers=auth, timeout=10).status_code == 404


def test_a_server_whose_secret_is_missing_is_503_not_an_unauthenticated_call(
    start: Callable[..., Any], upstream: Any, tmp_path: Path
) -> None:
    doc = ms.mcp_server_doc("locked", upstream[1], "streamable-http", "auth: {bearerFromSecret: nope}\n")
    router = start(doc, mcp={"secretsDir": str(tmp_path)})
    refused = httpx.post(f"{router.url}/mcp/locked", json=INIT, headers=headers(router))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "upstream_not_configured"


def test_a_2025_03_26_batch_is_answered_on_one_stream(start: Callable[..., Any]) -> None:
    router = start()
    session = initialize(router)
    hdrs = headers(router, **{"mcp-session-id": session, "mcp-protocol-version": "2025-03-26"})
    batch = [
        {"jsonrpc": "2.0", "id": 21, "method": "ping"},
        {"jsonrpc": "2.0", "id": 22, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "b"}}},
        {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"},
    ]
    answered = sse_messages(httpx.post(f"{router.url}/mcp/tools", json=batch, headers=hdrs, timeout=10))
    assert sorted(m["id"] for m in answered) == [21, 22]
    notes = [{"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}] * 2
    assert httpx.post(f"{router.url}/mcp/tools", json=notes, headers=hdrs).status_code == 202
    assert httpx.post(f"{router.url}/mcp/tools", json=[], headers=hdrs).status_code == 400
    # MCP 2025-06-18 removed batches: a batch under a later revision is refused.
    for later in ("2025-06-18", VERSION):
        hdrs["mcp-protocol-version"] = later
        refused = httpx.post(f"{router.url}/mcp/tools", json=batch, headers=hdrs, timeout=10)
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_request")
        assert "batches were removed" in refused.json()["error"]["message"]


class RecordingUpstream:
    """The SDK upstream behind a wrapper that keeps the body of every POST it read: the messages
    that reached it (the session's GET stream, opened whenever the router gets to it, is not one)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)

        async def recording() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.bodies.append(message.get("body", b""))
            return message

        await self.app(scope, recording, send)


def test_invalid_json_rpc_is_refused_unforwarded_and_the_session_lives_on(
    router_server: Callable[..., Any], policy_dir: Path
) -> None:
    """A tools/call without an id (a 'notification' that would skip the tool policy), a null id,
    and one id twice in a batch: each a 400 that never reaches the upstream; the session stays."""
    upstream = RecordingUpstream(ms.build_upstream().streamable_http_app())
    with servers.serve(upstream) as srv:
        ms.write_policy(
            policy_dir,
            ms.mcp_server_doc("tools", f"{srv.url}/mcp", "streamable-http"),
            ms.tool_policy_doc("no-secret", "appliesTo: {mcpServer: tools, tool: secret}\ndecision: deny\n"),
        )
        router = router_server()
        session = initialize(router)
        hdrs = headers(router, **{"mcp-session-id": session, "mcp-protocol-version": VERSION})
        secret = {"name": "secret", "arguments": {}}
        ping = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
        invalid: list[tuple[Any, str]] = [
            ({"jsonrpc": "2.0", "method": "tools/call", "params": secret}, "tools/call is a request: it needs an id"),
            ({"jsonrpc": "2.0", "id": None, "method": "ping"}, "a request id must be a string or an integer"),
            ({"jsonrpc": "2.0", "id": True, "method": "ping"}, "a request id must be a string or an integer"),
            ([ping, ping], "request id 9 is used twice in one batch"),
            ([], "the batch is empty"),
        ]
        seen = len(upstream.bodies)
        for body, reason in invalid:
            version = "2025-03-26" if isinstance(body, list) else VERSION  # the last revision with batches
            hdrs["mcp-protocol-version"] = version
            resp = httpx.post(f"{router.url}/mcp/tools", json=body, headers=hdrs, timeout=10)
            assert (resp.status_code, resp.json()["error"]["code"]) == (400, "invalid_request"), resp.text
            assert reason in resp.json()["error"]["message"]
        assert upstream.bodies[seen:] == []  # nothing reached the upstream
        # The legacy endpoint reads messages the same way.
        legacy = httpx.post(
            f"{router.url}/mcp/tools/messages?sessionId=whatever",
            json=invalid[0][0],
            headers=headers(router),
            timeout=10,
        )
        assert legacy.status_code in (400, 404)  # refused before or at the session lookup
        assert upstream.bodies[seen:] == []
        # The session is alive: the denied tool is still denied, the rest answered.
        assert sse_messages(call(router, session, "secret", {}))[0]["error"]["code"] == -32001
        assert (
            sse_messages(call(router, session, "echo", {"text": "still here"}))[0]["result"]["content"][0]["text"]
            == "still here"
        )
        hdrs["mcp-protocol-version"] = VERSION
        assert httpx.delete(f"{router.url}/mcp/tools", headers=hdrs, timeout=10).status_code == 200  # then stop it


@pytest.mark.parametrize("kind", ["streamable-http", "sse"])
def test_a_tool_that_outlasts_the_read_timeout_fails_alone(
    kind: str, router_server: Callable[..., Any], policy_dir: Path
) -> None:
    """The call gets a JSON-RPC error of its own and the upstream is told to cancel it; the
    session, and the calls after it, go on (a slow tool is not a dead upstream). On a legacy
    SSE upstream the reply would come on the shared stream, which other traffic keeps alive."""
    sdk = ms.build_upstream()
    upstream = RecordingUpstream(sdk.streamable_http_app() if kind == "streamable-http" else sdk.sse_app())
    with servers.serve(upstream) as srv:
        ms.write_policy(policy_dir, ms.mcp_server_doc("tools", f"{srv.url}/{'mcp' if kind != 'sse' else 'sse'}", kind))
        router = router_server(mcp={"upstreamReadTimeoutS": 0.5})
        session = initialize(router)
        (answer,) = sse_messages(call(router, session, "hang", {}, rid=21))
        assert answer["id"] == 21 and answer["error"]["code"] == -32007
        assert answer["error"]["message"] == "upstream stopped sending for 0.5 s"
        cancel = {"requestId": 21, "reason": "upstream stopped sending for 0.5 s"}
        sent = [json.loads(body) for body in upstream.bodies]
        assert {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel} in sent
        (echoed,) = sse_messages(call(router, session, "echo", {"text": "after"}, rid=22))
        assert echoed["result"]["content"][0]["text"] == "after"
        hdrs = headers(router, **{"mcp-session-id": session, "mcp-protocol-version": VERSION})
        assert httpx.delete(f"{router.url}/mcp/tools", headers=hdrs, timeout=10).status_code == 200  # then stop it


def test_a_failed_initialize_leaves_no_session_behind(
    upstream: tuple[servers.ServerThread, str], router_server: Callable[..., Any], policy_dir: Path
) -> None:
    """The upstream refuses initialize (here: a wrong path, 404): the client gets the error, and the
    session it was given is gone, so retries never run into the per-caller session cap."""
    ms.write_policy(policy_dir, ms.mcp_server_doc("tools", upstream[1] + "/wrong", "streamable-http"))
    router = router_server(mcp={"maxSessionsPerPrincipal": 1})
    url = f"{router.url}/mcp/tools"
    for _ in range(3):
        resp = httpx.post(url, json=INIT, headers=headers(router), timeout=10)
        assert resp.status_code == 200, resp.text
        (answer,) = sse_messages(resp)
        assert answer["id"] == 1 and "upstream answered HTTP 404" in answer["error"]["message"]
        session = resp.headers["mcp-session-id"]
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        later = headers(router, **{"mcp-session-id": session, "mcp-protocol-version": VERSION})
        assert httpx.post(url, json=ping, headers=later, timeout=10).status_code == 404
    assert router.call(router.app.state.kars.mcp.table.wait_size(0), timeout=5) is None


def test_an_id_still_pending_in_the_session_is_refused(start: Callable[..., Any]) -> None:
    """MCP: a request id is not reused within a session. While id 30 waits on a tool, another
    request with id 30 gets -32600 and does not take the first one's place."""
    router = start(mcp={"keepAliveS": 0.05})
    session = initialize(router)
    hdrs = headers(router, **{"mcp-session-id": session, "mcp-protocol-version": VERSION})
    hang = {"jsonrpc": "2.0", "id": 30, "method": "tools/call", "params": {"name": "hang", "arguments": {}}}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{router.url}/mcp/tools", json=hang, headers=hdrs) as pending,
    ):
        assert pending.status_code == 200
        (clash,) = sse_messages(call(router, session, "echo", {"text": "x"}, rid=30))
        assert clash["id"] == 30 and clash["error"]["code"] == -32600
        assert "still in use" in clash["error"]["message"]
        (other,) = sse_messages(call(router, session, "echo", {"text": "y"}, rid=31))
        assert other["result"]["content"][0]["text"] == "y"
        assert httpx.delete(f"{router.url}/mcp/tools", headers=hdrs, timeout=10).status_code == 200  # frees the hang
