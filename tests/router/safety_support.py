"""Set-up for the content-safety tests: Azure's content-filter behaviours on top of the fake Foundry.

``FlaggingFoundry`` answers like ``tests.fakes.foundry.FakeFoundry`` and adds what Azure OpenAI does
when its own filters rate a text, chosen by the deployment in the path:

- ``flag-prompt-<category>-<severity>``: the reply's ``prompt_filter_results`` (a stream's first
  chunk, whose ``choices`` is empty) rate the prompt so (``filtered: false``: below Azure's own limit);
- ``flag-output-<category>-<severity>``: the third content chunk's (or the whole reply's)
  ``choices[].content_filter_results`` rate the output so;
- ``refused-<category>``: Azure's own 400 ``content_filter`` with ``innererror.content_filter_result``;
- ``words``: the reply is ``self.words`` (stream or not), annotated safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.types import Receive, Scope, Send

from router.app import build_app
from router.identity import devtokens
from tests.fakes.content_safety import FakeContentSafety
from tests.fakes.foundry import FakeFoundry, Recorded
from tests.router.foundry_support import SANDBOX, UPSTREAM_KEY, StateRecorder
from tests.support import servers

CATEGORIES = ("hate", "self_harm", "sexual", "violence")
FLAGGED_CHUNK = 2  # which content chunk of a flagged stream carries the output annotation


def results(category: str | None = None, severity: str = "safe", *, filtered: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {c: {"filtered": False, "severity": "safe"} for c in CATEGORIES}
    if category is not None:
        out[category] = {"filtered": filtered, "severity": severity}
    out["jailbreak"] = {"filtered": False, "detected": False}
    return out


class FlaggingFoundry(FakeFoundry):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.words = ["Hello", " from", " the", " fake", " upstream", "."]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        parts = path.split("/")
        deployment = parts[3] if path.startswith("/openai/deployments/") and len(parts) > 3 else ""
        if not deployment.startswith(("flag-", "refused-", "words")):
            return await super().__call__(scope, receive, send)
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append(Recorded(scope["method"], path, {}, headers, body))
        doc = json.loads(body) if body else {}
        if deployment.startswith("refused-"):
            return await _json(send, 400, refusal(deployment.removeprefix("refused-")))
        # flag-<prompt|output>-<category>-<severity>
        _, where, category, severity = [*deployment.split("-"), "", "", "", ""][:4]
        prompt_results = results(category, severity) if where == "prompt" else results()
        output_category = category if where == "output" else None
        if doc.get("stream") is True:
            return await self._stream(send, deployment, prompt_results, output_category, severity)
        choice_results = results(output_category, severity) if output_category else results()
        reply = {
            "choices": [
                {
                    "content_filter_results": choice_results,
                    "finish_reason": "stop",
                    "index": 0,
                    "message": {"content": "".join(self.words), "role": "assistant"},
                }
            ],
            "created": 1700000000,
            "id": "chatcmpl-flag",
            "model": deployment,
            "object": "chat.completion",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": prompt_results}],
            "usage": {"completion_tokens": len(self.words), "prompt_tokens": 9, "total_tokens": 9 + len(self.words)},
        }
        await _json(send, 200, reply)

    async def _stream(
        self, send: Send, deployment: str, prompt_results: dict[str, Any], output_category: str | None, severity: str
    ) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        first = {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": []}
        first["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": prompt_results}]
        await _event(send, first)
        for i, word in enumerate(self.words):
            flagged = output_category is not None and i == FLAGGED_CHUNK
            annotation = results(output_category, severity) if flagged else results()
            await _event(send, _chunk(deployment, {"content": word}, annotation))
        await _event(send, _chunk(deployment, {}, {}, finish="stop"))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def refusal(category: str) -> dict[str, Any]:
    """Azure OpenAI's own 400 for a prompt its content filter refused (FACTS.md: singular ``result``)."""
    message = (
        "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
        "Please modify your prompt and retry."
    )
    inner = {"code": "ResponsibleAIPolicyViolation", "content_filter_result": results(category, "high", filtered=True)}
    return {
        "error": {
            "message": message,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": inner,
        }
    }


def _chunk(
    deployment: str, delta: dict[str, Any], annotation: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {
        "choices": [
            {
                "content_filter_results": annotation,
                "delta": delta,
                "finish_reason": finish,
                "index": 0,
                "logprobs": None,
            }
        ],
        "created": 1700000000,
        "id": "chatcmpl-flag",
        "model": deployment,
        "object": "chat.completion.chunk",
    }


async def _json(send: Send, status: int, doc: Any) -> None:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _event(send: Send, doc: Any) -> None:
    await send(
        {"type": "http.response.body", "body": b"data: " + json.dumps(doc).encode() + b"\n\n", "more_body": True}
    )


CS_KEY = "content-safety-key"


@dataclasses.dataclass
class SafetyStack:
    fake: FlaggingFoundry
    content_safety: FakeContentSafety
    router: servers.ServerThread
    app: Any
    token: str
    recorder: StateRecorder

    def log_fields(self) -> dict[str, Any]:
        return self.recorder.log_fields()

    def tokens(self, sandbox: str) -> str:
        return devtokens.issue(self.app.state.kars.dev_key, sandbox, audience="kars-router")

    def metric(self, name: str, labels: dict[str, str]) -> float:
        value = self.app.state.kars.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)


@contextlib.contextmanager
def safety_stack(
    make_settings: Callable[..., Any],
    tmp_path: Path,
    *,
    content_safety: bool | str = False,
    safety: dict[str, Any] | None = None,
) -> Iterator[SafetyStack]:
    """Fake Foundry + fake Content Safety + a router. ``content_safety``: False (not configured),
    True (the fake), or an endpoint URL (e.g. a port nothing listens on)."""
    fake = FlaggingFoundry(api_key=UPSTREAM_KEY)
    cs = FakeContentSafety(key=CS_KEY)
    foundry_key = tmp_path / "foundry-key"
    foundry_key.write_text(UPSTREAM_KEY)
    cs_key = tmp_path / "cs-key"
    cs_key.write_text(CS_KEY + "\n")
    with servers.serve(fake) as upstream, servers.serve(cs) as cs_server:
        tree = dict(safety or {})
        if content_safety:
            endpoint = cs_server.url if content_safety is True else content_safety
            tree |= {"contentSafetyEndpoint": endpoint, "contentSafetyKeyFile": str(cs_key)}
        settings = make_settings(foundry={"endpoint": upstream.url, "apiKeyFile": str(foundry_key)}, safety=tree)
        app = build_app(settings)
        recorder = StateRecorder(app)
        with servers.serve(recorder) as router:
            token = devtokens.issue(app.state.kars.dev_key, SANDBOX, audience="kars-router")
            yield SafetyStack(fake, cs, router, app, token, recorder)
