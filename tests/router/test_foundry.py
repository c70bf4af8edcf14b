"""The Foundry transport driven by the real openai SDK, against a fake Azure OpenAI on loopback."""

from __future__ import annotations

import gc
import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router import budgets
from router import usage as usage_mod
from tests.router.foundry_support import UPSTREAM_KEY, Stack, foundry_stack
from tests.support import waiting

API_VERSION = "2025-04-01-preview"
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def stack(make_settings: Callable[..., Any], tmp_path: Path) -> Iterator[Stack]:
    with foundry_stack(make_settings, tmp_path) as s:
        yield s


def azure(stack: Stack) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=stack.router.url, api_version=API_VERSION, api_key=stack.token, max_retries=0
    )


def plain(stack: Stack, prefix: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.router.url + prefix, api_key=stack.token, max_retries=0)


def last_state(stack: Stack) -> dict[str, Any]:
    """The scope state of the last forwarded request, once the router has returned from it."""
    waiting.until(lambda: len(stack.recorder.states) >= len(stack.fake.requests), timeout_s=5, what="router done")
    return stack.recorder.states[-1]


def last_usage(stack: Stack) -> usage_mod.Usage:
    found = last_state(stack).get("kars.usage")
    assert isinstance(found, usage_mod.Usage)
    return found


def assert_credentials_swapped(stack: Stack) -> None:
    seen = stack.fake.requests[-1].headers
    assert seen["api-key"] == UPSTREAM_KEY  # the router's own credential
    assert "authorization" not in seen  # the caller's, never forwarded
    assert stack.token not in json.dumps(seen)
    assert "x-api-key" not in seen


def test_azure_sdk_chat_forwards_with_router_credential(stack: Stack) -> None:
    reply = azure(stack).chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.2)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "Hello from the fake upstream."
    seen = stack.fake.requests[-1]
    assert seen.path == "/openai/deployments/gpt-4o/chat/completions"
    assert seen.query["api-version"] == [API_VERSION]
    assert seen.json() == {"model": "gpt-4o", "messages": MESSAGES, "temperature": 0.2}
    assert_credentials_swapped(stack)
    assert last_usage(stack) == usage_mod.Usage(9, 6, 15)
    assert last_state(stack)["kars.upstream_output"] is True
    assert stack.metric("kars_tokens_total", {"direction": "prompt", "deployment": "gpt-4o"}) == 9
    assert stack.metric("kars_tokens_total", {"direction": "completion", "deployment": "gpt-4o"}) == 6
    requests = {"route": "/openai/{path:path}", "method": "POST", "status": "200"}
    assert stack.metric("kars_requests_total", requests) == 1  # the route is named in metrics and logs


def test_body_passed_through_byte_for_byte(stack: Stack) -> None:
    raw = b'{"messages": [{"role":"user","content":"hi \\u00e9"}],   "max_tokens": 5}'
    r = httpx.post(
        stack.router.url + "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        content=raw,
        headers={"authorization": f"Bearer {stack.token}", "content-type": "application/json"},
    )
    assert r.status_code == 200
    assert stack.fake.requests[-1].body == raw


@pytest.mark.parametrize("prefix", ["/openai/v1", "/v1"])
def test_openai_sdk_chat_on_v1_routes(stack: Stack, prefix: str) -> None:
    reply = plain(stack, prefix).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.total_tokens == 15
    seen = stack.fake.requests[-1]
    assert seen.path == "/openai/v1/chat/completions"
    assert seen.json() == {"model": "gpt-4o-mini", "messages": MESSAGES}
    assert_credentials_swapped(stack)
    assert last_usage(stack).total_tokens == 15


def test_chat_stream_without_include_usage_adds_it_and_strips_the_chunk(stack: Stack) -> None:
    chunks = list(azure(stack).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake upstream."
    assert all(c.usage is None for c in chunks)  # the extra usage chunk never reached the caller
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "stop"
    sent = stack.fake.requests[-1].json()
    assert sent == {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    assert last_usage(stack) == usage_mod.Usage(9, 6, 15)
    assert_credentials_swapped(stack)


def test_chat_stream_with_include_usage_false_gets_usage_upstream_but_not_the_chunk(stack: Stack) -> None:
    """The caller said no usage chunk; the router still needs the usage (SPEC.md §2): asked for, then stripped."""
    chunks = list(
        azure(stack).chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": False},
        )
    )
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake upstream."
    assert stack.fake.requests[-1].json()["stream_options"] == {"include_usage": True}
    assert last_usage(stack) == usage_mod.Usage(9, 6, 15)


@pytest.mark.parametrize(
    ("method", "path", "upstream_path"),
    [
        ("GET", "/openai/v1/models", "/openai/v1/models"),
        ("GET", "/v1/models", "/openai/v1/models"),  # the alias
        ("GET", "/openai/v1/files", "/openai/v1/files"),
        ("POST", "/openai/v1/batches", "/openai/v1/batches"),
        ("GET", "/openai/v1/vector_stores", "/openai/v1/vector_stores"),
        ("POST", "/openai/v1/conversations", "/openai/v1/conversations"),
        ("GET", "/models/info?api-version=2024-05-01-preview", "/models/info"),
        (
            "POST",
            "/openai/deployments/dall-e-3/images/generations?api-version=2024-10-21",
            "/openai/deployments/dall-e-3/images/generations",
        ),
        ("DELETE", "/openai/v1/files/file-abc123", "/openai/v1/files/file-abc123"),
    ],
)
def test_every_route_family_reaches_the_upstream_with_the_router_credential(
    stack: Stack, method: str, path: str, upstream_path: str
) -> None:
    """SPEC.md §2's routes beyond chat/embeddings/Responses: forwarded as they are, the upstream's answer relayed."""
    body: dict[str, Any] | None = None
    if method == "POST":
        batch = {"input_file_id": "file-abc123", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        body = {"prompt": "A cat in a hat", "n": 1} if "images" in path else batch
    r = httpx.request(method, stack.router.url + path, json=body, headers={"api-key": stack.token}, timeout=10)
    seen = stack.fake.requests[-1]
    assert (seen.method, seen.path) == (method, upstream_path)
    if "?" in path:
        assert seen.query == {"api-version": [path.rpartition("=")[2]]}
    if body is not None:
        assert seen.json() == body
    assert_credentials_swapped(stack)
    # The fake knows none of these: its Azure-shaped 404 reaches the caller as it was sent.
    assert (r.status_code, r.json()) == (404, {"error": {"code": "404", "message": "Resource not found"}})


@pytest.mark.parametrize("prefix", ["/openai/v1", "/v1"])
def test_chat_stream_with_include_usage_keeps_the_chunk(stack: Stack, prefix: str) -> None:
    chunks = list(
        plain(stack, prefix).chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 15
    assert stack.fake.requests[-1].json()["stream_options"] == {"include_usage": True}
    assert last_usage(stack).total_tokens == 15


def test_stream_passes_chunks_as_they_arrive(stack: Stack) -> None:
    """The fake holds the rest of the stream until the caller has seen the first words."""
    stream = azure(stack).chat.completions.create(model="gated", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    seen = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += chunk.choices[0].delta.content
            if seen == "Hello":
                stack.fake.release()
    assert seen == "Hello from the fake upstream."
    assert not stack.fake.gate_timed_out


@pytest.mark.parametrize("client", ["azure", "/openai/v1", "/v1"])
def test_embeddings(stack: Stack, client: str) -> None:
    sdk = azure(stack) if client == "azure" else plain(stack, client)
    reply = sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(reply.data) == 2 and reply.usage.prompt_tokens == 6
    assert stack.fake.requests[-1].json()["input"] == ["a", "b"]
    assert last_usage(stack) == usage_mod.Usage(6, 0, 6)
    assert_credentials_swapped(stack)


@pytest.mark.parametrize("client", ["azure", "/openai/v1"])
def test_responses(stack: Stack, client: str) -> None:
    sdk = azure(stack) if client == "azure" else plain(stack, client)
    reply = sdk.responses.create(model="gpt-4o", input="Say hello")
    assert reply.output_text == "Hello from the fake upstream."
    assert stack.fake.requests[-1].json() == {"model": "gpt-4o", "input": "Say hello"}
    assert last_usage(stack) == usage_mod.Usage(11, 6, 17)
    assert_credentials_swapped(stack)


@pytest.mark.parametrize("client", ["azure", "/v1"])
def test_responses_streaming(stack: Stack, client: str) -> None:
    sdk = azure(stack) if client == "azure" else plain(stack, client)
    events = list(sdk.responses.create(model="gpt-4o", input="Say hello", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Hello from the fake upstream."
    assert events[-1].type == "response.completed"
    sent = stack.fake.requests[-1].json()
    assert sent == {"model": "gpt-4o", "input": "Say hello", "stream": True}  # nothing added to Responses
    assert last_usage(stack) == usage_mod.Usage(11, 6, 17)


def test_legacy_completions(stack: Stack) -> None:
    reply = azure(stack).completions.create(model="davinci", prompt="Say hello")
    assert reply.choices[0].text == "Hello from the fake upstream."
    assert last_usage(stack) == usage_mod.Usage(4, 6, 10)


def test_a_served_request_leaves_no_garbage_for_the_cycle_collector(stack: Stack) -> None:
    """Reference counting frees all a request made. A reference cycle through the scope (say, the
    server's ``receive``, a bound method of the object holding the scope, kept in its state) would
    leave every request to the cycle collector, whose pauses grow with the traffic."""
    client = azure(stack)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert [c for c in stream]
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage, to be looked at
    try:
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
            stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            assert [c for c in stream]
        last_state(stack)
        stack.recorder.states.clear()  # the test's own references to the requests' states
        gc.collect()
        states = [o for o in gc.garbage if isinstance(o, dict) and "kars.log" in o]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert states == []


def test_upstream_error_json_passes_through_as_sent(stack: Stack) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        azure(stack).chat.completions.create(model="throttled", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 429
    assert caught.value.body == {"code": "429", "message": "Rate limit is exceeded. Try again in 1 seconds."}
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.response.headers["apim-request-id"] == "fake-1"
    assert "kars.usage" not in last_state(stack)
    assert not last_state(stack).get("kars.upstream_output")  # an error reply is no generated output


def test_caller_credential_is_still_required(stack: Stack) -> None:
    sdk = openai.AzureOpenAI(azure_endpoint=stack.router.url, api_version=API_VERSION, api_key="dummy", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert stack.fake.requests == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-4o", "messages": [',  # cut short
        b'{"model": "gpt-4o", "messages": [], "temperature": NaN}',  # Python's json takes it; JSON does not
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff"}]}',  # not UTF-8
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\ud800"}]}',  # lone surrogate
    ],
    ids=["truncated", "nan", "not-utf8", "lone-surrogate"],
)
def test_malformed_request_json_is_400_and_never_forwarded(stack: Stack, body: bytes) -> None:
    r = httpx.post(
        stack.router.url + "/openai/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {stack.token}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert stack.fake.requests == []


def test_hop_by_hop_headers_are_not_forwarded(stack: Stack) -> None:
    r = httpx.post(
        stack.router.url + "/openai/v1/embeddings",
        json={"model": "e", "input": "x"},
        headers={
            "authorization": f"Bearer {stack.token}",
            "connection": "keep-alive, x-secret-hop",
            "x-secret-hop": "1",
            "keep-alive": "timeout=5",
            "te": "trailers",
            "x-api-key": "caller-key",
            "x-ms-client-request-id": "req-42",
        },
    )
    assert r.status_code == 200
    seen = stack.fake.requests[-1].headers
    for name in ("x-secret-hop", "keep-alive", "te", "x-api-key"):
        assert name not in seen
    assert seen["x-ms-client-request-id"] == "req-42"  # end-to-end headers pass
    assert seen["accept-encoding"] == "identity"
    assert r.headers["apim-request-id"] == "fake-1"


def test_router_local_v1_routes_are_not_forwarded(stack: Stack) -> None:
    r = httpx.get(stack.router.url + "/v1/whoami", headers={"authorization": f"Bearer {stack.token}"})
    assert r.status_code == 200 and r.json()["principal"] == "team-a/agent-1"
    assert stack.fake.requests == []


def test_no_endpoint_is_503_upstream_not_configured(router_server: Callable[..., Any]) -> None:
    from router.identity import devtokens

    srv = router_server()
    token = devtokens.issue(srv.app.state.kars.dev_key, "team-a/agent-1", audience="kars-router")
    sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "upstream_not_configured"  # type: ignore[index]


def budget_policy(name: str, token_budget: str) -> str:
    """An InferencePolicy for every action of team-a with ``token_budget`` (YAML flow mapping)."""
    return (
        "apiVersion: kars.azure.com/v1alpha1\nkind: InferencePolicy\n"
        f"metadata: {{name: {name}, namespace: team-a}}\n"
        f'spec:\n  appliesTo: {{action: "*"}}\n  tokenBudget: {token_budget}\n'
    )


BUDGET = budget_policy("budget", "{dailyTokens: 100000}")


def test_usage_settles_the_token_budget(make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path) -> None:
    """The transport's usage event is what the budget layer charges: settle, or release on no output."""
    (policy_dir / "budget.yaml").write_text(BUDGET)
    with foundry_stack(make_settings, tmp_path) as s:

        def used() -> int:
            last_state(s)
            r = httpx.get(s.router.url + "/v1/budgets", headers={"authorization": f"Bearer {s.token}"})
            lines = r.json()["budgets"]
            assert lines and all(line["reserved"] == 0 for line in lines)
            return int(lines[0]["used"])

        azure(s).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert used() == 15
        list(azure(s).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
        assert used() == 30  # the usage chunk the caller never saw was still charged
        with pytest.raises(openai.RateLimitError):
            azure(s).chat.completions.create(model="throttled", messages=MESSAGES)  # type: ignore[arg-type]
        assert used() == 30  # an upstream error reply generated nothing: the reservation is released


def test_chat_stream_gets_no_stream_options_on_an_api_version_that_refuses_them(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    """Azure answers 400 "Unrecognized request argument supplied: stream_options" before api-version
    2024-09-01, so the router adds nothing there; the stream then ends without usage and is
    charged its whole reservation (SPEC.md §3). From 2024-09-01 on, it is added."""
    (policy_dir / "budget.yaml").write_text(BUDGET)
    with foundry_stack(make_settings, tmp_path) as s:
        for version, added in (("2024-06-01", False), ("2024-10-21", True)):
            sdk = openai.AzureOpenAI(azure_endpoint=s.router.url, api_version=version, api_key=s.token, max_retries=0)
            chunks = list(sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=50))  # type: ignore[arg-type]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "Hello from the fake upstream."
            assert all(c.usage is None for c in chunks)
            sent = s.fake.requests[-1].json()
            assert ("stream_options" in sent) is added, version
            assert last_state(s)["kars.log"]["budgetChargedTokens"] == (
                budgets.estimate_prompt_tokens(sent) + 50 if not added else 15
            )


NON_CANONICAL = [
    "/openai/v1/x/../chat/completions",
    "/openai/v1/./chat/completions",
    "/openai/v1//chat/completions",
    "/openai/v1/chat/completions/",
    "/v1/x/%2e%2e/chat/completions",
    "/openai/deployments/gpt-4o/./chat/completions?api-version=2024-10-21",
    "/openai/deployments/gpt-4o/x/../chat/completions?api-version=2024-10-21",
]


@pytest.mark.parametrize("path", NON_CANONICAL)
def test_a_path_with_empty_or_dot_segments_is_404_and_never_forwarded(stack: Stack, path: str) -> None:
    """An upstream that normalises such a path would serve chat completions that the budget and
    safety layers took for some other endpoint: it is no inference route. (http.client sends the
    path as written; httpx would normalise it first.)"""
    conn = http.client.HTTPConnection(stack.router.host, stack.router.port, timeout=10)
    try:
        body = json.dumps({"model": "gpt-4o", "messages": MESSAGES})
        conn.request("POST", path, body, {"api-key": stack.token, "content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 404
        assert json.loads(resp.read())["error"]["code"] == "not_found"
    finally:
        conn.close()
    assert stack.fake.requests == []


CAPPED = budget_policy("capped", "{perRequestTokens: 100}")


@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/Chat/Completions",
        "/openai/deployments/gpt-4o/CHAT/completions",
        "/openai/deployments/gpt-4o/extensions/chat/completions",  # "On Your Data" (earlier previews)
    ],
)
def test_every_spelling_of_chat_completions_is_budgeted(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path, path: str
) -> None:
    """Chat completions however the path spells them (routing that ignores case, as ASP.NET's
    does, or Azure's "On Your Data" endpoint) are budgeted as chat completions."""
    (policy_dir / "budget.yaml").write_text(CAPPED)
    with foundry_stack(make_settings, tmp_path) as s:
        body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5000}
        r = httpx.post(f"{s.router.url}{path}?api-version=2024-10-21", json=body, headers={"api-key": s.token})
        assert (r.status_code, r.json()["error"]["code"]) == (429, "per_request_tokens_exceeded")
        assert s.fake.requests == []
