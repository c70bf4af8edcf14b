"""A real a2a-sdk agent for tests (JSON-RPC, v1.0 with v0.3 compatibility), and card signing helpers.

The agent echoes the user's text. For a streaming request it first reports ``working``, then
waits on ``gate`` (set by the test) before its artifact and completion: a test can check that
the first event crossed the router before the rest exists. Cards are served as plain JSON of
what was signed (``card_json``), or, for agents with ``stock_card_route``, by a2a-sdk's own route.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from typing import Any

import jwt
import rfc8785
from a2a.helpers import proto_helpers
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandlerV2
from a2a.server.routes.agent_card_routes import create_agent_card_routes
from a2a.server.routes.jsonrpc_routes import create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

GATE_TIMEOUT_S = 30.0  # longer than any test wait: a router that buffered the stream fails the test


class EchoExecutor(AgentExecutor):
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen_headers: list[dict[str, str]] = []

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        text = context.get_user_input()
        if not text.startswith("stream:"):
            await event_queue.enqueue_event(proto_helpers.new_text_message(f"echo: {text}"))
            return
        assert context.message is not None
        task = context.current_task or proto_helpers.new_task_from_user_message(context.message)
        await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        await asyncio.to_thread(self.gate.wait, GATE_TIMEOUT_S)
        await updater.add_artifact([proto_helpers.new_text_part(f"echo: {text}")], name="echo")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None and context.context_id is not None
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def make_card(public_url: str, *, versions: tuple[str, ...] = ("1.0", "0.3"), name: str = "echo") -> AgentCard:
    """A card whose interfaces point at ``public_url`` (the router's ``/a2a/{agent}``)."""
    return AgentCard(
        name=name,
        description="echoes what it is told",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=public_url, protocol_binding="JSONRPC", protocol_version=v) for v in versions
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="echo", name="echo", description="echo", tags=["test"])],
    )


def card_json(card: AgentCard) -> bytes:
    return json.dumps(MessageToDict(card), indent=1).encode()


@dataclasses.dataclass
class Agent:
    executor: EchoExecutor
    app: Starlette
    card_body: list[bytes]  # what the card route serves; tests may swap it


def build(
    card: AgentCard,
    *,
    card_body: bytes | None = None,
    stock_card_route: bool = False,
    extended_card: AgentCard | None = None,
) -> Agent:
    """``extended_card`` is the answer to ``GetExtendedAgentCard`` (``card`` must announce it)."""
    executor = EchoExecutor()
    handler = DefaultRequestHandlerV2(
        agent_executor=executor, task_store=InMemoryTaskStore(), agent_card=card, extended_agent_card=extended_card
    )
    body = [card_body if card_body is not None else card_json(card)]

    async def serve_card(request: Request) -> Response:
        return Response(body[0], media_type="application/json")

    routes: list[Any] = create_jsonrpc_routes(handler, rpc_url="/", enable_v0_3_compat=True)
    if stock_card_route:
        routes += create_agent_card_routes(card)
    else:
        routes += [Route("/.well-known/agent-card.json", serve_card, methods=["GET"])]
    return Agent(executor, Starlette(routes=routes), body)


# -- signing cards the way the spec says (JCS of the whole card, empty values kept) -------------


def sign_card_dict(
    card: dict[str, Any], key: Any, *, alg: str, kid: str, header: dict[str, Any] | None = None
) -> dict[str, Any]:
    unsigned = {k: v for k, v in card.items() if k != "signatures"}
    protected = {"alg": alg, "kid": kid, "typ": "JOSE", **(header or {})}
    compact = jwt.api_jws.encode(rfc8785.dumps(unsigned), key, algorithm=alg, headers=protected)
    head, _, signature = compact.split(".")
    return {**card, "signatures": [*card.get("signatures", []), {"protected": head, "signature": signature}]}
