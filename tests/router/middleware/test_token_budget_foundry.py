"""Token budgets end to end: the real Foundry transport against the fake Azure OpenAI upstream.

What the transport reports decides the settle: usage (JSON or the stream's usage chunk) settles
to it; a stream broken off after output keeps the whole reservation; an upstream failure before
any output releases it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from router import budgets
from tests.router.foundry_support import foundry_stack
from tests.router.middleware.budget_support import window, write_policy
from tests.support import waiting

MESSAGES = [{"role": "user", "content": "Say hello"}]
FAKE_USAGE = 15  # the fake upstream's usage: 9 prompt + 6 completion tokens
MAX_TOKENS = 200


def worst(**extra: Any) -> int:
    return budgets.worst_case("chat", {"messages": MESSAGES, "max_tokens": MAX_TOKENS, **extra}, []).tokens


def chat(s: Any, deployment: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{s.router.url}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21",
        json={"messages": MESSAGES, "max_tokens": MAX_TOKENS, **extra},
        headers={"api-key": s.token},
        timeout=20,
    )


def day(s: Any) -> dict[str, Any]:
    resp = httpx.get(f"{s.router.url}/v1/budgets", headers={"authorization": f"Bearer {s.token}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return window(resp.json(), "day")


@pytest.mark.parametrize(
    ("deployment", "extra", "status", "charged"),
    [
        ("gpt-4o", {}, 200, lambda: FAKE_USAGE),  # JSON reply with usage
        ("gpt-4o", {"stream": True}, 200, lambda: FAKE_USAGE),  # usage chunk the router asked for
        ("dies", {"stream": True}, 200, lambda: worst(stream=True)),  # broken off after output: all of it
        ("broken", {}, 500, lambda: 0),  # the upstream failed before any output
        ("badjson", {}, 502, lambda: 0),
    ],
)
def test_settle_through_the_real_transport(
    make_settings: Callable[..., Any],
    tmp_path: Path,
    policy_dir: Path,
    deployment: str,
    extra: dict[str, Any],
    status: int,
    charged: Callable[[], int],
) -> None:
    write_policy(policy_dir, dailyTokens=100_000)
    with foundry_stack(make_settings, tmp_path) as s:
        resp = chat(s, deployment, **extra)
        assert resp.status_code == status, resp.text
        if extra.get("stream") and deployment == "gpt-4o":
            assert '"total_tokens"' not in resp.text  # the usage chunk the caller did not ask for is stripped
        assert (day(s)["used"], day(s)["reserved"]) == (charged(), 0)


def test_an_unbounded_request_is_sent_with_the_output_maximum_it_reserved_for(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    """No request can generate past its reservation (SPEC.md §3): the router adds the bound the caller left out."""
    write_policy(policy_dir, dailyTokens=100_000)
    with foundry_stack(make_settings, tmp_path) as s:
        azure = openai.AzureOpenAI(azure_endpoint=s.router.url, api_version="2024-10-21", api_key=s.token)
        azure.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        sent = json.loads(s.fake.requests[-1].body)
        prompt = budgets.estimate_prompt_tokens({"model": "gpt-4o", "messages": MESSAGES})
        assert sent == {"model": "gpt-4o", "messages": MESSAGES, "max_completion_tokens": budgets.DEFAULT_OUTPUT_TOKENS}
        assert s.recorder.log_fields()["budgetReservedTokens"] == prompt + budgets.DEFAULT_OUTPUT_TOKENS
        # Two choices share the bound; an API version from before max_completion_tokens gets max_tokens.
        old = openai.AzureOpenAI(azure_endpoint=s.router.url, api_version="2024-06-01", api_key=s.token)
        old.chat.completions.create(model="gpt-4o", messages=MESSAGES, n=2)  # type: ignore[arg-type]
        assert json.loads(s.fake.requests[-1].body)["max_tokens"] == budgets.DEFAULT_OUTPUT_TOKENS // 2
        # Responses, on the v1 API: max_output_tokens.
        v1 = openai.OpenAI(base_url=s.router.url + "/openai/v1", api_key=s.token)
        v1.responses.create(model="gpt-4o", input="Say hello")
        assert json.loads(s.fake.requests[-1].body)["max_output_tokens"] == budgets.DEFAULT_OUTPUT_TOKENS
        # A request that names its maximum goes as it was sent, byte for byte.
        raw = json.dumps({"messages": MESSAGES, "max_tokens": MAX_TOKENS}, indent=1).encode()
        resp = httpx.post(
            f"{s.router.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            content=raw,
            headers={"api-key": s.token, "content-type": "application/json"},
            timeout=20,
        )
        assert resp.status_code == 200
        assert s.fake.requests[-1].body == raw
    # Under a per-request cap, the bound is what the cap leaves after the prompt estimate.
    write_policy(policy_dir, dailyTokens=100_000, perRequestTokens=1_000)
    with foundry_stack(make_settings, tmp_path) as s:
        azure = openai.AzureOpenAI(azure_endpoint=s.router.url, api_version="2024-10-21", api_key=s.token)
        azure.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert json.loads(s.fake.requests[-1].body)["max_completion_tokens"] == 1_000 - prompt


def test_a_multipart_image_edit_is_budgeted_and_passed_through(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    """Image edits are multipart/form-data, not JSON: no prompt to estimate, but still budgeted."""
    write_policy(policy_dir, dailyTokens=100_000, perRequestTokens=4_000)
    with foundry_stack(make_settings, tmp_path) as s:
        form = httpx.Request(
            "POST",
            f"{s.router.url}/openai/deployments/gpt-image-1/images/edits?api-version=2025-04-01-preview",
            files={"image": ("cat.png", b"\x89PNG\r\n\x1a\n-not-really-a-png", "image/png")},
            data={"prompt": "Give the cat a hat"},
            headers={"api-key": s.token},
        )
        body = form.read()
        with httpx.Client(timeout=20) as client:
            resp = client.send(form)
        assert resp.status_code == 200, resp.text
        assert resp.json()["data"][0]["b64_json"] == "aW1hZ2U="
        sent = s.fake.requests[-1]
        assert sent.headers["content-type"] == form.headers["content-type"]  # multipart/form-data; boundary=...
        assert sent.body == body  # the form, byte for byte
        assert (day(s)["used"], day(s)["reserved"]) == (150, 0)  # the reply's usage, settled


@pytest.mark.parametrize(
    "path",
    [
        "/openai/deployments/gpt-4o-transcribe/audio/transcriptions?api-version=2025-03-01-preview",
        "/openai/v1/audio/transcriptions",
        "/v1/audio/transcriptions",
    ],
)
def test_audio_transcriptions_are_budgeted_on_every_route(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path, path: str
) -> None:
    """The same transcription, by deployment path or by the v1 API (model in the form): settled to its usage."""
    write_policy(policy_dir, dailyTokens=100_000, perRequestTokens=4_000)
    with foundry_stack(make_settings, tmp_path) as s:
        resp = httpx.post(
            s.router.url + path,
            files={"file": ("hello.wav", b"RIFF\x00\x00\x00\x00WAVE-not-really", "audio/wav")},
            data={"model": "gpt-4o-transcribe"},
            headers={"api-key": s.token},
            timeout=20,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["text"] == "Hello from the fake upstream."
        assert s.fake.requests[-1].path.endswith("/audio/transcriptions")
        assert (day(s)["used"], day(s)["reserved"]) == (59, 0)


def test_unreachable_upstream_releases_the_reservation(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path, dead_port: int
) -> None:
    write_policy(policy_dir, dailyTokens=100_000)
    with foundry_stack(make_settings, tmp_path, endpoint=f"http://127.0.0.1:{dead_port}") as s:
        assert chat(s, "gpt-4o").status_code == 502
        assert (day(s)["used"], day(s)["reserved"]) == (0, 0)


def test_caller_leaving_mid_stream_keeps_the_reservation(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    write_policy(policy_dir, dailyTokens=100_000)
    with foundry_stack(make_settings, tmp_path) as s:
        body = {"model": "endless", "messages": MESSAGES, "stream": True, "max_tokens": MAX_TOKENS}
        with httpx.stream(
            "POST",
            f"{s.router.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {s.token}"},
            timeout=10,
        ) as r:
            assert r.status_code == 200
            assert day(s)["reserved"] == budgets.worst_case("chat", body, []).tokens
            for i, _ in enumerate(r.iter_raw()):
                if i == 3:
                    break
        expected = budgets.worst_case("chat", body, []).tokens
        waiting.until(lambda: day(s)["reserved"] == 0, timeout_s=10, what="the reservation settled")
        assert day(s)["used"] == expected


def test_azure_sdk_gets_rate_limit_error_from_the_budget(
    make_settings: Callable[..., Any], tmp_path: Path, policy_dir: Path
) -> None:
    sdk_worst = worst(model="gpt-4o")  # the Azure SDK also sends the deployment as "model"
    write_policy(policy_dir, dailyTokens=2 * FAKE_USAGE + sdk_worst - 1)  # room for two requests, not three
    with foundry_stack(make_settings, tmp_path) as s:
        sdk = openai.AzureOpenAI(azure_endpoint=s.router.url, api_version="2024-10-21", api_key=s.token)
        for _ in range(2):
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
        assert day(s)["used"] == 2 * FAKE_USAGE
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
        assert caught.value.status_code == 429
        assert caught.value.body["code"] == "budget_exceeded"  # type: ignore[index]
        assert len(s.fake.requests) == 2  # refused before the upstream, and not retried by the SDK
