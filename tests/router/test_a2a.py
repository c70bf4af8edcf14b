"""The A2A proxy with the real a2a-sdk client and server on both sides of a real router (SPEC.md §5)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory, create_client
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    SubscribeToTaskRequest,
)

from router.identity import devtokens
from tests.support import a2a_agent, asgi, servers, trustgraphs

WAIT_S = 10.0


def a2a_agent_yaml(name: str, endpoint: str, namespace: str = "team", extra: str = "") -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: kars.azure.com/v1alpha1
        kind: A2AAgent
        metadata: {{name: {name}, namespace: {namespace}}}
        spec:
          endpointUrl: {endpoint}
        """
    ) + textwrap.indent(textwrap.dedent(extra), "  ")


@dataclasses.dataclass
class Setup:
    router: Any
    agent: a2a_agent.Agent
    agent_url: str

    @property
    def base(self) -> str:
        return f"{self.router.url}/a2a/echo"

    def auth(self, principal: str = "team/caller") -> dict[str, str]:
        tok = devtokens.issue(self.router.app.state.kars.dev_key, principal, audience="kars-router")
        return {"Authorization": f"Bearer {tok}"}


@pytest.fixture
def setup(router_server: Callable[..., Any], policy_dir: Path) -> Iterator[Setup]:
    agent = a2a_agent.build(a2a_agent.make_card("http://placeholder"))
    with servers.serve(agent.app) as agent_srv:
        (policy_dir / "agents.yaml").write_text(a2a_agent_yaml("echo", agent_srv.url + "/"))
        trustgraphs.Graph().edge("team/caller", "team/echo").write(policy_dir)
        router = router_server()
        # The agent advertises the router as its address, as an agent behind a gateway does.
        agent.card_body[0] = a2a_agent.card_json(a2a_agent.make_card(f"{router.url}/a2a/echo"))
        yield Setup(router, agent, agent_srv.url)
        agent.executor.gate.set()


@pytest.fixture
async def http(setup: Setup) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(headers=setup.auth(), timeout=WAIT_S) as client:
        yield client


def user_message(text: str) -> SendMessageRequest:
    return SendMessageRequest(message=Message(role=Role.ROLE_USER, parts=[Part(text=text)], message_id=f"m-{text}"))


async def test_card_is_served_byte_for_byte(setup: Setup, http: httpx.AsyncClient) -> None:
    for path in ("/.well-known/agent-card.json", "/.well-known/agent.json"):
        resp = await http.get(setup.base + path)
        assert resp.status_code == 200, resp.text
        assert resp.content == setup.agent.card_body[0]  # indentation and all: never re-serialised


async def test_v1_send_message_through_the_router(setup: Setup, http: httpx.AsyncClient) -> None:
    client = await create_client(setup.base, client_config=ClientConfig(httpx_client=http, streaming=False))
    events = [e async for e in client.send_message(user_message("hello"))]
    assert [e.message.parts[0].text for e in events] == ["echo: hello"]


async def test_v1_streaming_events_arrive_as_they_happen(setup: Setup, http: httpx.AsyncClient) -> None:
    client = await create_client(setup.base, client_config=ClientConfig(httpx_client=http, streaming=True))
    stream = client.send_message(user_message("stream: one"))
    first = await asyncio.wait_for(anext(stream), WAIT_S)  # sent before the agent may go on
    assert first.HasField("task")
    setup.agent.executor.gate.set()
    rest = [e async for e in stream]
    kinds = [e.WhichOneof("payload") for e in rest]
    assert "artifact_update" in kinds
    final = rest[-1]
    assert final.status_update.status.state == 3  # TASK_STATE_COMPLETED
    task = await client.get_task(GetTaskRequest(id=first.task.id))
    assert task.artifacts[0].parts[0].text == "echo: stream: one"


async def test_v0_3_client_through_the_router(setup: Setup, http: httpx.AsyncClient) -> None:
    card = a2a_agent.make_card(setup.base, versions=("0.3",))
    client = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(card)
    events = [e async for e in client.send_message(user_message("old"))]
    assert [e.message.parts[0].text for e in events] == ["echo: old"]

    streaming = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(card)
    setup.agent.executor.gate.set()
    events = [e async for e in streaming.send_message(user_message("stream: old"))]
    assert events[-1].status_update.status.state == 3


async def test_method_must_match_the_protocol_version(setup: Setup, http: httpx.AsyncClient) -> None:
    call = {"jsonrpc": "2.0", "id": 7, "method": "GetTask", "params": {"id": "x"}}
    resp = await http.post(setup.base, json=call)  # no A2A-Version: 0.3, where GetTask does not exist
    assert resp.status_code == 200 and resp.json()["error"]["code"] == -32601
    resp = await http.post(setup.base, json={**call, "method": "tasks/get"}, headers={"A2A-Version": "1.0"})
    assert resp.json()["error"]["code"] == -32601
    resp = await http.post(setup.base, json=call, headers={"A2A-Version": "9.9"})
    assert resp.json() == {"jsonrpc": "2.0", "id": 7, "error": {"code": -32009, "message": "version not supported"}}
    # The right pairing reaches the agent (which answers with its own "task not found").
    resp = await http.post(setup.base, json=call, headers={"A2A-Version": "1.0"})
    assert resp.status_code == 200 and resp.json()["error"]["code"] == -32001


async def test_bad_input_is_refused_in_the_error_shape(setup: Setup, http: httpx.AsyncClient) -> None:
    resp = await http.post(setup.base, content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"
    resp = await http.post(setup.base, json=[{"jsonrpc": "2.0", "method": "message/send"}])
    assert resp.status_code == 400
    resp = await http.get(setup.base)
    assert resp.status_code == 405


async def test_agents_of_other_namespaces_do_not_exist(setup: Setup, policy_dir: Path, http: httpx.AsyncClient) -> None:
    resp = await http.get(f"{setup.router.url}/a2a/nobody/.well-known/agent-card.json")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    # other/caller has an edge to other/echo but no A2AAgent other/echo exists: 404.
    trustgraphs.Graph().edge("team/caller", "team/echo").edge("other/caller", "other/echo").write(policy_dir)
    store = setup.router.app.state.kars.policy
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(store.reload(), setup.router.loop))
    resp = await http.post(
        setup.base, json={"jsonrpc": "2.0", "id": 1, "method": "tasks/get"}, headers=setup.auth("other/caller")
    )
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


async def test_caller_credentials_are_not_forwarded(setup: Setup, http: httpx.AsyncClient) -> None:
    seen: list[dict[str, str]] = []
    original = setup.agent.app.middleware_stack

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        assert original is not None
        await original(scope, receive, send)

    setup.agent.app.middleware_stack = spy
    call = {"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"id": "nope"}}
    resp = await http.post(setup.base, json=call, headers={"api-key": "secret", "x-api-key": "secret"})
    assert resp.status_code == 200
    assert seen and all(h not in seen[-1] for h in ("authorization", "api-key", "x-api-key"))
    assert json.loads(resp.content)["id"] == 1


@pytest.mark.parametrize("versions", [("1.0",), ("0.3",)])
async def test_subscribe_list_and_cancel_through_the_router(
    setup: Setup, http: httpx.AsyncClient, versions: tuple[str, ...]
) -> None:
    card = a2a_agent.make_card(setup.base, versions=versions)
    client = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(card)
    stream = client.send_message(user_message("stream: long"))
    first = await asyncio.wait_for(anext(stream), WAIT_S)
    task_id = first.task.id
    # A second stream on the same task (SubscribeToTask / tasks/resubscribe) while it is working.
    subscription = client.subscribe(SubscribeToTaskRequest(id=task_id))
    current = await asyncio.wait_for(anext(subscription), WAIT_S)  # the task as it stands now
    assert current.WhichOneof("payload") in ("task", "status_update")
    setup.agent.executor.gate.set()
    seen = [e async for e in subscription]
    assert seen and seen[-1].status_update.status.state == 3  # TASK_STATE_COMPLETED
    _ = [e async for e in stream]
    if versions == ("1.0",):  # ListTasks exists in 1.0 only
        listed = await client.list_tasks(ListTasksRequest())
        assert task_id in [t.id for t in listed.tasks]
    with pytest.raises(Exception) as info:  # a completed task cannot be cancelled: the agent's own error
        await client.cancel_task(CancelTaskRequest(id=task_id))
    assert "cancel" in str(info.value).lower()


async def test_unreachable_agent_is_502(router_server: Callable[..., Any], policy_dir: Path) -> None:
    (policy_dir / "agents.yaml").write_text(a2a_agent_yaml("gone", "http://127.0.0.1:9/"))
    trustgraphs.Graph().edge("team/caller", "team/gone").write(policy_dir)
    router = router_server()
    tok = devtokens.issue(router.app.state.kars.dev_key, "team/caller", audience="kars-router")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {tok}"}, timeout=WAIT_S) as http:
        resp = await http.post(f"{router.url}/a2a/gone", json={"jsonrpc": "2.0", "id": 1, "method": "tasks/get"})
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_unavailable"
        resp = await http.get(f"{router.url}/a2a/gone/.well-known/agent-card.json")
        assert resp.status_code == 502


class BreakingAgent:
    """An agent whose event stream breaks off: it sends ``sent`` and then its connection is reset
    (the exception makes uvicorn abort it, with no closing chunk), as a crashed agent's would be."""

    def __init__(self, sent: bytes) -> None:
        self.sent = sent

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await asgi.lifespan(receive, send)
        await asgi.read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": self.sent, "more_body": True})
        raise RuntimeError("the agent crashed")


EVENT = b'data: {"jsonrpc":"2.0","id":7,"result":{"kind":"status-update"}}\n\n'


@pytest.mark.parametrize("between_events", [True, False])
async def test_an_event_stream_the_agent_breaks_off(
    router_server: Callable[..., Any], policy_dir: Path, between_events: bool
) -> None:
    """Broken off between two events, the stream ends with a JSON-RPC error event for the request,
    so the client learns why; inside an event, the reply is aborted (never a truncated event that
    looks whole)."""
    sent = EVENT if between_events else EVENT + b'data: {"jsonrpc":"2.0","id":7,"res'
    with servers.serve(BreakingAgent(sent)) as agent_srv:
        (policy_dir / "agents.yaml").write_text(a2a_agent_yaml("echo", agent_srv.url + "/"))
        trustgraphs.Graph().edge("team/caller", "team/echo").write(policy_dir)
        router = router_server()
        tok = devtokens.issue(router.app.state.kars.dev_key, "team/caller", audience="kars-router")
        body = {"jsonrpc": "2.0", "id": 7, "method": "message/stream", "params": {}}
        async with (
            httpx.AsyncClient(headers={"Authorization": f"Bearer {tok}"}, timeout=WAIT_S) as http,
            http.stream("POST", f"{router.url}/a2a/echo", json=body) as resp,
        ):
            assert resp.status_code == 200
            if not between_events:
                with pytest.raises(httpx.RemoteProtocolError):
                    await resp.aread()
                return
            events = [line[len("data: ") :] async for line in resp.aiter_lines() if line.startswith("data: ")]
        assert json.loads(events[0])["result"] == {"kind": "status-update"}
        error = json.loads(events[1])
        assert (error["id"], error["error"]["code"]) == (7, -32603)
        assert error["error"]["message"].startswith("the agent's stream broke off")
        assert len(events) == 2
