"""Upstream faults and modelPreference fallbacks: the right status each, and nothing leaked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router.policy import model
from router.transports import foundry
from tests.router.foundry_support import foundry_stack
from tests.support import servers, waiting

MESSAGES = [{"role": "user", "content": "Say hello"}]

PREFERENCE = """\
apiVersion: kars.azure.com/v1alpha1
kind: InferencePolicy
metadata: {name: prefer, namespace: team-a}
spec:
  appliesTo: {action: chat}
  modelPreference:
    primary: {deployment: throttled}
    fallback: [{deployment: broken}, {deployment: gpt-4o-mini}]
"""


def chat(url: str, token: str, deployment: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21",
        json={"messages": MESSAGES, **body},
        headers={"api-key": token},
        timeout=20,
    )


def test_answered_requests_leave_nothing_behind_on_a_kept_alive_connection(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    """Each request's disconnect watcher ends once the response is complete, while the caller's
    connection stays open for the next request (nothing waits for the connection to close)."""
    with foundry_stack(make_settings, tmp_path) as s, httpx.Client(timeout=20) as caller:
        baseline = s.tasks()
        for stream in (False, True, False):
            r = caller.post(
                f"{s.router.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                json={"messages": MESSAGES, "stream": stream},
                headers={"api-key": s.token},
            )
            assert r.status_code == 200
        s.assert_idle(baseline)


def test_connection_refused_is_502_upstream_unavailable(
    make_settings: Callable[..., Any], tmp_path: Path, dead_port: int
) -> None:
    dead = f"http://127.0.0.1:{dead_port}"
    with foundry_stack(make_settings, tmp_path, endpoint=dead) as s:
        baseline = s.tasks()
        r = chat(s.router.url, s.token, "gpt-4o")
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unavailable"
        assert s.metric("kars_upstream_errors_total", {"upstream": "foundry", "code": "upstream_unavailable"}) == 1
        s.assert_idle(baseline)


def test_a_connect_timeout_is_502_upstream_unavailable_and_falls_back(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    """No connection within connectTimeoutS: nothing was sent, so it is 'unreachable' and the
    next deployment of the caller's modelPreference is tried (all three here: one endpoint)."""
    (policy_dir / "prefer.yaml").write_text(PREFERENCE)
    with (
        servers.unanswered_port() as port,
        foundry_stack(
            make_settings, tmp_path, endpoint=f"http://127.0.0.1:{port}", foundry={"connectTimeoutS": 0.2}
        ) as s,
    ):
        baseline = s.tasks()
        r = chat(s.router.url, s.token, "throttled")
        assert (r.status_code, r.json()["error"]["code"]) == (502, "upstream_unavailable")
        assert "0.2 s" in r.json()["error"]["message"]
        assert s.metric("kars_upstream_errors_total", {"upstream": "foundry", "code": "upstream_unavailable"}) == 3
        s.assert_idle(baseline)


def test_upstream_timeout_is_504_and_the_request_is_abandoned(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    with foundry_stack(make_settings, tmp_path, foundry={"readTimeoutS": 0.3}) as s:
        baseline = s.tasks()
        r = chat(s.router.url, s.token, "slow")
        assert r.status_code == 504
        assert r.json()["error"] == {
            "message": r.json()["error"]["message"],
            "type": "timeout_error",
            "code": "upstream_timeout",
            "param": None,
        }
        waiting.until(lambda: s.fake.disconnects == 1, timeout_s=5, what="the upstream sees the router hang up")
        s.assert_idle(baseline)


def test_upstream_500_passes_through_as_sent(make_settings: Callable[..., Any], tmp_path: Path) -> None:
    with foundry_stack(make_settings, tmp_path) as s:
        baseline = s.tasks()
        r = chat(s.router.url, s.token, "broken")
        assert r.status_code == 500
        assert r.json() == {"error": {"code": "InternalServerError", "message": "The server had an error."}}
        assert s.metric("kars_upstream_errors_total", {"upstream": "foundry", "code": "status_500"}) == 1
        s.assert_idle(baseline)


def test_malformed_upstream_json_is_502_upstream_error(make_settings: Callable[..., Any], tmp_path: Path) -> None:
    with foundry_stack(make_settings, tmp_path) as s:
        baseline = s.tasks()
        sdk = openai.AzureOpenAI(azure_endpoint=s.router.url, api_version="2024-10-21", api_key=s.token, max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.chat.completions.create(model="badjson", messages=MESSAGES)  # type: ignore[arg-type]
        assert caught.value.status_code == 502
        assert caught.value.body["code"] == "upstream_error"  # type: ignore[index]
        s.assert_idle(baseline)


def test_upstream_dying_mid_stream_ends_the_sse_stream_in_protocol(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    with foundry_stack(make_settings, tmp_path) as s:
        baseline = s.tasks()
        r = chat(s.router.url, s.token, "dies", stream=True)
        assert r.status_code == 200
        assert r.text.startswith('data: {"choices"')  # the chunk that arrived before the cut was relayed
        assert '\n\nevent: error\ndata: {"error":{' in r.text
        assert r.text.endswith("data: [DONE]\n\n")
        # The openai SDK turns it into its usual exception.
        sdk = openai.OpenAI(base_url=s.router.url + "/v1", api_key=s.token, max_retries=0)
        with pytest.raises(openai.APIError, match="broken off"):
            list(sdk.chat.completions.create(model="dies", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
        s.assert_idle(baseline)


def test_client_leaving_mid_stream_cancels_the_upstream_request(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    with foundry_stack(make_settings, tmp_path) as s:
        baseline = s.tasks()
        with httpx.stream(
            "POST",
            f"{s.router.url}/v1/chat/completions",
            json={"model": "endless", "messages": MESSAGES, "stream": True},
            headers={"authorization": f"Bearer {s.token}"},
            timeout=10,
        ) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_raw()):
                if i == 3:
                    break
        waiting.until(lambda: s.fake.disconnects == 1, timeout_s=5, what="the upstream sees the router hang up")
        s.assert_idle(baseline)
        waiting.until(lambda: s.recorder.states, timeout_s=5)
        assert s.recorder.states[-1]["kars.upstream_output"] is True  # the budget keeps the reservation


# -- modelPreference --------------------------------------------------------------------------


def test_fallback_on_429_and_5xx_in_preference_order(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    (policy_dir / "prefer.yaml").write_text(PREFERENCE)
    with foundry_stack(make_settings, tmp_path) as s:
        baseline = s.tasks()
        r = chat(s.router.url, s.token, "throttled")
        assert r.status_code == 200 and r.json()["model"] == "gpt-4o-mini"
        paths = [q.path.split("/")[3] for q in s.fake.requests]
        assert paths == ["throttled", "broken", "gpt-4o-mini"]
        assert all(q.body == s.fake.requests[0].body for q in s.fake.requests)
        s.assert_idle(baseline)


def test_fallback_rewrites_model_on_v1_routes_and_streams(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    (policy_dir / "prefer.yaml").write_text(PREFERENCE)
    with foundry_stack(make_settings, tmp_path) as s:
        sdk = openai.OpenAI(base_url=s.router.url + "/v1", api_key=s.token, max_retries=0)
        chunks = list(sdk.chat.completions.create(model="throttled", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake upstream."
        assert [q.json()["model"] for q in s.fake.requests] == ["throttled", "broken", "gpt-4o-mini"]


def test_deployment_outside_the_preference_gets_no_fallback(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    (policy_dir / "prefer.yaml").write_text(PREFERENCE.replace("throttled", "gpt-4o"))
    with foundry_stack(make_settings, tmp_path) as s:
        r = chat(s.router.url, s.token, "broken")  # a fallback named by the caller: broken -> gpt-4o -> ...
        assert r.status_code == 200 and [q.path.split("/")[3] for q in s.fake.requests] == ["broken", "gpt-4o"]
        s.fake.requests.clear()
        r = chat(s.router.url, s.token, "throttled")  # not in the list: served as named, no fallback
        assert r.status_code == 429 and len(s.fake.requests) == 1


def test_deployment_chain_rules() -> None:
    pref = model.ModelPreference.model_validate(
        {"primary": {"deployment": "a"}, "fallback": [{"deployment": "b"}, {"deployment": "c"}]}
    )
    assert foundry.deployment_chain("a", pref) == ["a", "b", "c"]
    assert foundry.deployment_chain("b", pref) == ["b", "a", "c"]
    assert foundry.deployment_chain(None, pref) == ["a", "b", "c"]
    assert foundry.deployment_chain("z", pref) == ["z"]
    assert foundry.deployment_chain("z", None) == ["z"]


def test_models_route_without_a_model_goes_to_the_primary(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    (policy_dir / "prefer.yaml").write_text(PREFERENCE.replace("throttled", "gpt-4o"))
    with foundry_stack(make_settings, tmp_path) as s:
        r = httpx.post(
            f"{s.router.url}/models/chat/completions?api-version=2024-05-01-preview",
            json={"messages": MESSAGES},
            headers={"authorization": f"Bearer {s.token}"},
        )
        assert r.status_code == 200
        seen = s.fake.requests[-1]
        assert seen.path == "/models/chat/completions" and seen.query["api-version"] == ["2024-05-01-preview"]
        assert seen.json() == {"messages": MESSAGES, "model": "gpt-4o"}
        # Without a policy preference the body goes through untouched.
        r = httpx.post(
            f"{s.router.url}/models/embeddings",
            json={"input": ["x"]},
            headers={"authorization": f"Bearer {s.token}"},
        )
        assert r.status_code == 200 and s.fake.requests[-1].json() == {"input": ["x"]}


def test_upstream_stalling_mid_stream_ends_it_with_a_timeout_event(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    with foundry_stack(make_settings, tmp_path, foundry={"readTimeoutS": 0.3}) as s:
        baseline = s.tasks()
        r = chat(s.router.url, s.token, "stalls", stream=True)
        assert r.status_code == 200
        assert '\n\nevent: error\ndata: {"error":{' in r.text and '"code":"upstream_timeout"' in r.text
        assert r.text.endswith("data: [DONE]\n\n")
        waiting.until(lambda: s.fake.disconnects == 1, timeout_s=5, what="the upstream sees the router hang up")
        s.assert_idle(baseline)


def test_redirects_are_not_followed(make_settings: Callable[..., Any], tmp_path: Path) -> None:
    with foundry_stack(make_settings, tmp_path) as s:
        r = chat(s.router.url, s.token, "moved")
        assert r.status_code == 307 and r.headers["location"] == "http://127.0.0.1:9/elsewhere"
        assert len(s.fake.requests) == 1
