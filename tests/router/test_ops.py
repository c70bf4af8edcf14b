"""Operations surface: health, readiness, metrics, error shapes, body limit, admin gate, access log."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from router import _body, errors
from router.app import build_app
from router.identity import devtokens
from tests.support import waiting


def token(srv: Any, sandbox: str = "default/dev") -> str:
    return devtokens.issue(srv.app.state.kars.dev_key, sandbox, audience="kars-router")


async def echo_json(request: Request) -> JSONResponse:
    return JSONResponse({"got": await _body.read_json(request.scope, request.receive)})


def with_echo(srv: Any) -> Any:
    srv.app.router.routes.insert(0, Route("/v1/echo-json", echo_json, methods=["POST"]))
    return srv


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in resp.text
    return body["error"]  # type: ignore[no-any-return]


def test_health_and_readiness(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    assert httpx.get(f"{srv.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{srv.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_readiness_reports_failing_checks(router_server: Callable[..., Any]) -> None:
    srv = router_server()

    async def store_down() -> str | None:
        return "budget store unreachable"

    async def boom() -> str | None:
        raise ConnectionError("refused")

    srv.app.state.kars.ops.ready_checks.update({"budgets": store_down, "credential": boom})
    resp = httpx.get(f"{srv.url}/readyz")
    err = assert_error(resp, 503, "not_ready")
    assert err["checks"] == {"budgets": "budget store unreachable", "credential": "ConnectionError: refused"}


def test_metrics_parse_with_prometheus_parser(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    httpx.get(f"{srv.url}/v1/whoami", headers={"Authorization": f"Bearer {token(srv)}"})
    httpx.get(f"{srv.url}/nope")
    httpx.post(f"{srv.url}/openai/v1/chat/completions", json={})
    text = httpx.get(f"{srv.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(name.startswith("kars_") for name in families)
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["kars_requests"].samples
        if s.name == "kars_requests_total"
    }
    assert requests[("/v1/whoami", "200")] == 1.0
    assert requests[("unrouted", "401")] == 1.0  # refused before routing, on a path no route takes
    assert requests[("/openai/{path:path}", "401")] == 1.0  # refused before routing: on its route's series
    assert "kars_request_duration_seconds" in families
    assert "kars_policy_generation" in families


def test_unknown_route_and_wrong_method(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    auth = {"Authorization": f"Bearer {token(srv)}"}
    assert_error(httpx.get(f"{srv.url}/no/such/route", headers=auth), 404, "not_found")
    for method in ("POST", "DELETE"):
        resp = httpx.request(method, f"{srv.url}/healthz")
        assert_error(resp, 405, "method_not_allowed")
        assert set(resp.headers["allow"].split(", ")) == {"GET", "HEAD"}
    # The router's own /v1 routes are not swallowed by the /v1/... alias of the inference API.
    for path in ("/v1/whoami", "/v1/budgets"):
        resp = httpx.post(f"{srv.url}{path}", headers=auth, json={})
        assert_error(resp, 405, "method_not_allowed")
        assert set(resp.headers["allow"].split(", ")) == {"GET", "HEAD"}


def test_malformed_json_is_400(router_server: Callable[..., Any]) -> None:
    srv = with_echo(router_server())
    auth = {"Authorization": f"Bearer {token(srv)}", "content-type": "application/json"}
    assert httpx.post(f"{srv.url}/v1/echo-json", headers=auth, content=b'{"a": 1}').json() == {"got": {"a": 1}}
    for bad in (b'{"a": ', b"\xff\xfe", b"{'single': 'quotes'}"):
        assert_error(httpx.post(f"{srv.url}/v1/echo-json", headers=auth, content=bad), 400, "invalid_request")


def test_body_over_the_limit_is_413(router_server: Callable[..., Any]) -> None:
    srv = with_echo(router_server(limits={"maxBodyBytes": 1024}))
    auth = {"Authorization": f"Bearer {token(srv)}"}
    ok = json.dumps({"x": "a" * 900}).encode()
    assert httpx.post(f"{srv.url}/v1/echo-json", headers=auth, content=ok).status_code == 200
    big = json.dumps({"x": "a" * 2000}).encode()
    # Declared up front...
    assert_error(httpx.post(f"{srv.url}/v1/echo-json", headers=auth, content=big), 413, "payload_too_large")

    # ...and chunked, with no Content-Length to go by.
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 256):
            yield big[i : i + 256]

    resp = httpx.post(f"{srv.url}/v1/echo-json", headers=auth, content=chunks())
    assert_error(resp, 413, "payload_too_large")
    # The worker is fine afterwards.
    assert httpx.get(f"{srv.url}/healthz").status_code == 200


def test_a_body_longer_than_its_content_length_is_cut_there(router_server: Callable[..., Any]) -> None:
    """The body limit trusts a declared Content-Length: the server hands the app no more than
    that; the bytes after it are the next request on the connection."""
    srv = with_echo(router_server(limits={"maxBodyBytes": 1024}))
    head = f"POST /v1/echo-json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token(srv)}\r\n"
    next_request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(head.encode() + b'Content-Length: 8\r\n\r\n{"a": 1}' + next_request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    assert b'\r\n\r\n{"got":{"a":1}}HTTP/1.1 200' in reply  # then /healthz answered on its own


def test_garbage_content_length_is_400(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/whoami HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400")


def test_admin_api_from_loopback(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    resp = httpx.get(f"{srv.url}/internal/policy-status")
    assert resp.status_code == 200
    assert {"generation", "entries", "kindDigests", "errors", "loadedAt"} <= set(resp.json())


def test_admin_api_in_sidecar_mode_needs_the_token(router_server: Callable[..., Any], tmp_path: Path) -> None:
    secret = tmp_path / "admin-token"
    secret.write_text("s3cret-admin-token\n")
    # In sidecar mode the sandbox itself is on loopback: loopback is not admin there.
    srv = router_server(server={"sandbox": "team-a/solo"}, admin={"tokenFile": str(secret)})
    url = f"{srv.url}/internal/policy-status"
    assert_error(httpx.get(url), 401, "missing_credentials")
    assert_error(httpx.get(url, headers={"Authorization": "Bearer s3cret-admin-tokeN"}), 401, "invalid_credentials")
    assert httpx.get(url, headers={"Authorization": "Bearer s3cret-admin-token"}).status_code == 200
    # No token configured: refused even from loopback, and the message says why.
    tokenless = router_server(server={"sandbox": "team-a/solo"})
    refused = httpx.get(f"{tokenless.url}/internal/policy-status")
    assert_error(refused, 403, "forbidden")
    assert "sidecar mode" in refused.json()["error"]["message"]


async def test_admin_api_from_another_host(make_settings: Callable[..., Any], tmp_path: Path) -> None:
    """A non-loopback peer, crafted at the ASGI level (no traffic leaves this machine)."""
    secret = tmp_path / "admin-token"
    secret.write_text("tok")
    remote = ("10.1.2.3", 40000)
    no_token_app = build_app(make_settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(no_token_app, client=remote), base_url="http://r") as c:
        assert_error(await c.get("/internal/policy-status"), 403, "forbidden")
    app = build_app(make_settings(admin={"tokenFile": str(secret)}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app, client=remote), base_url="http://r") as c:
        assert_error(await c.get("/internal/policy-status"), 401, "missing_credentials")
        assert (await c.get("/internal/policy-status", headers={"Authorization": "Bearer tok"})).status_code == 200


def test_one_json_access_line_per_request(router_server: Callable[..., Any]) -> None:
    srv = router_server()
    out = io.StringIO()
    srv.app.state.kars.access_log.stream = out
    httpx.get(f"{srv.url}/v1/whoami?api-key=should-not-be-logged", headers={"Authorization": f"Bearer {token(srv)}"})
    httpx.get(f"{srv.url}/v1/whoami")
    # The line is written once the response is complete, which the client may see first.
    waiting.until(lambda: out.getvalue().count("\n") >= 2, what="two access lines")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    assert all(line["logger"] == "kars.access" for line in lines)
    for line in lines:  # RFC 3339, UTC, milliseconds: 2026-11-23T01:59:17.093Z
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), line["ts"]
        stamp = dt.datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
        assert abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 30
    ok, refused = lines
    assert ok["principal"] == "default/dev" and ok["status"] == 200 and ok["route"] == "/v1/whoami"
    assert refused["principal"] is None and refused["status"] == 401
    assert (ok["decision"], refused["decision"]) == ("allow", "missing_credentials")  # SPEC.md §7
    assert isinstance(ok["latencyMs"], float)
    assert "should-not-be-logged" not in json.dumps(lines)
    assert token(srv).split(".")[0] not in json.dumps(lines)


def test_unexpected_error_is_a_clean_500(router_server: Callable[..., Any]) -> None:
    srv = router_server()

    async def explode(request: Request) -> JSONResponse:
        raise RuntimeError("secret internals")

    srv.app.router.routes.insert(0, Route("/v1/explode", explode))
    resp = httpx.get(f"{srv.url}/v1/explode", headers={"Authorization": f"Bearer {token(srv)}"})
    err = assert_error(resp, 500, "internal_error")
    assert "secret internals" not in resp.text
    assert err["message"] == "internal error"
    assert httpx.get(f"{srv.url}/healthz").status_code == 200


def test_error_hierarchy_statuses() -> None:
    expected = {
        errors.InvalidRequest: 400,
        errors.Unauthenticated: 401,
        errors.Forbidden: 403,
        errors.NotFound: 404,
        errors.MethodNotAllowed: 405,
        errors.Conflict: 409,
        errors.PayloadTooLarge: 413,
        errors.TooManyRequests: 429,
        errors.UpstreamError: 502,
        errors.ServiceUnavailable: 503,
        errors.UpstreamTimeout: 504,
    }
    for cls, status in expected.items():
        assert cls("x").status == status
        assert errors.for_status(status, "x").__class__ is cls
