"""The worst-case estimate and the counters a request charges (pure functions, odd input on purpose)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from router import budgets, inference
from router.policy import model

OVERHEAD = budgets.PROMPT_OVERHEAD_TOKENS


def policy(name: str = "p", namespace: str = "team-a", **budget: Any) -> model.InferencePolicy:
    return model.InferencePolicy.model_validate(
        {
            "apiVersion": "kars.azure.com/v1alpha1",
            "kind": "InferencePolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"tokenBudget": budget},
        }
    )


def test_ascii_is_four_characters_a_token() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}]}
    assert budgets.estimate_prompt_tokens(body) == 100 + 1 + 2 + OVERHEAD  # "user" is one more; one a string


def test_every_string_is_at_least_a_token() -> None:
    """2,048 one-letter embedding inputs are 2,048 tokens upstream: chars / 4 alone said 512."""
    assert budgets.estimate_prompt_tokens({"input": ["a"] * 2048}) >= 2048


def test_non_ascii_text_is_estimated_higher_than_chars_over_four() -> None:
    cjk = "漢" * 100  # real tokenizers spend about one token per CJK character
    assert budgets.estimate_prompt_tokens(cjk) == 25 + 100 + 1 + OVERHEAD
    assert budgets.estimate_prompt_tokens("é" * 100) == 25 + 50 + 1 + OVERHEAD
    assert budgets.estimate_prompt_tokens("\ud800") >= OVERHEAD  # a lone surrogate does not crash


def test_numbers_token_arrays_and_inline_images() -> None:
    assert budgets.estimate_prompt_tokens({"input": [[1, 2, 3], [4, 5]]}) == 5 + OVERHEAD
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    # "image_url" is 2.25, and each of the two strings is one more
    assert budgets.estimate_prompt_tokens(image) == budgets.DATA_URL_TOKENS + 3 + 2 + OVERHEAD
    assert budgets.estimate_prompt_tokens({"flag": True, "nothing": None}) == OVERHEAD
    deep: Any = "end"
    for _ in range(10_000):
        deep = [deep]
    assert budgets.estimate_prompt_tokens(deep) == 1 + 1 + OVERHEAD  # no recursion limit


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50, "max_tokens": 80}, 80),
        ({"max_output_tokens": 30}, 30),
        ({"max_tokens": 100, "n": 3}, 300),
        ({"max_tokens": 100, "n": 2, "best_of": 5}, 500),
        ({"max_tokens": 100, "n": 0}, 100),
        ({"max_tokens": True}, None),
        ({"max_tokens": -1}, None),
        ({"max_tokens": "100"}, None),
        ({"max_tokens": 100.0, "n": 2.0}, 200),  # JSON Schema's integers: what the upstream accepts
        ({"max_tokens": 1e30}, budgets.MAX_COUNT),  # an integer past 64 bits, as the JSON parser reads it
        ({"max_tokens": 10**19, "n": 10**19}, budgets.MAX_COUNT),  # what a store can still add up
        ({"max_tokens": 1.5}, None),
        ({"max_tokens": float("inf")}, None),
        ({"max_tokens": 10, "n": "many"}, 10),
        ({}, None),
        ([], None),
        (None, None),
    ],
)
def test_requested_output(body: Any, expected: int | None) -> None:
    assert budgets.requested_output(body) == expected


def test_worst_case() -> None:
    body = {"messages": "x" * 40, "max_tokens": 100}
    prompt = budgets.estimate_prompt_tokens(body)
    assert budgets.worst_case("chat", body, []) == budgets.WorstCase(prompt, prompt + 100)
    assert budgets.worst_case("embeddings", body, []) == budgets.WorstCase(prompt, prompt)
    unbounded = {"messages": "x" * 40}
    p = budgets.estimate_prompt_tokens(unbounded)
    capped = [policy(perRequestTokens=900, dailyTokens=1000), policy("q", perRequestTokens=500, dailyTokens=1000)]
    assert budgets.worst_case("chat", unbounded, capped).tokens == 500  # the smallest cap
    assert budgets.worst_case("chat", unbounded, [policy(dailyTokens=10)]).tokens == p + budgets.DEFAULT_OUTPUT_TOKENS
    tiny = [policy(perRequestTokens=5, dailyTokens=10)]
    assert budgets.worst_case("chat", unbounded, tiny).tokens == p  # the prompt alone exceeds the cap
    assert budgets.over_cap(tiny, p) == [(tiny[0], tiny[0].spec.token_budget, 5)]
    assert budgets.over_cap(capped, 500) == []
    assert [cap for _, _, cap in budgets.over_cap(capped, 901)] == [900, 500]


def route(path: str) -> inference.InferenceRoute:
    found = inference.classify(path)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("path", "query", "body", "expected"),
    [
        ("/openai/deployments/d/chat/completions", b"api-version=2024-10-21", {}, ("max_completion_tokens", 900)),
        (
            "/openai/deployments/d/chat/completions",
            b"api-version=2024-09-01-preview",
            {},
            ("max_completion_tokens", 900),
        ),
        ("/openai/deployments/d/chat/completions", b"x=1&api-version=2024-06-01", {}, ("max_tokens", 900)),
        ("/openai/v1/chat/completions", b"", {"n": 3}, ("max_completion_tokens", 300)),
        ("/models/chat/completions", b"api-version=2024-05-01-preview", {}, ("max_tokens", 900)),
        ("/openai/deployments/d/completions", b"api-version=2024-10-21", {"best_of": 2}, ("max_tokens", 450)),
        ("/openai/v1/responses", b"", {}, ("max_output_tokens", 900)),
        ("/openai/V1/Chat/Completions", b"", {}, ("max_completion_tokens", 900)),  # as an upstream may read it
        ("/openai/deployments/d/Completions", b"", {}, ("max_tokens", 900)),
        ("/openai/deployments/d/embeddings", b"", {}, None),  # no output to bound
        ("/openai/deployments/d/images/generations", b"", {}, None),
        ("/openai/v1/chat/completions", b"", None, None),  # not a JSON object
    ],
)
def test_output_bound(path: str, query: bytes, body: Any, expected: tuple[str, int] | None) -> None:
    worst = budgets.WorstCase(prompt=100, tokens=1_000, unbounded=True)
    assert budgets.output_bound(route(path), query, body, worst) == expected


@pytest.mark.parametrize("body", [{"max_tokens": 1.5}, {"max_tokens": "100"}, {"max_output_tokens": -1}])
def test_no_second_maximum_beside_one_that_is_no_count(body: dict[str, Any]) -> None:
    """A maximum the router cannot read is the upstream's to refuse: adding another field beside it
    would make even a valid-looking request carry two (which OpenAI refuses as exclusive)."""
    worst = budgets.worst_case("chat", body, [policy(perRequestTokens=900, dailyTokens=1000)])
    assert worst.unbounded and worst.tokens == 900  # reserved as if unbounded: the cap
    assert budgets.output_bound(route("/openai/v1/chat/completions"), b"", body, worst) is None


@pytest.mark.parametrize("body", [{"max_tokens": 5}, {"max_completion_tokens": 5}, {"max_output_tokens": 5}])
def test_no_output_bound_when_the_caller_set_one(body: dict[str, Any]) -> None:
    worst = budgets.worst_case("chat", body, [policy(perRequestTokens=900, dailyTokens=1000)])
    assert not worst.unbounded
    assert budgets.output_bound(route("/openai/v1/chat/completions"), b"", body, worst) is None
    assert budgets.worst_case("chat", {}, []).unbounded


def test_output_bound_leaves_at_least_one_token() -> None:
    """A prompt estimate that fills the whole per-request cap still sends a valid maximum."""
    full = budgets.WorstCase(100, 100, unbounded=True)
    bound = budgets.output_bound(route("/openai/v1/chat/completions"), b"", {"n": 2}, full)
    assert bound == ("max_completion_tokens", 1)


def test_lines_name_policy_scope_key_and_window() -> None:
    now = dt.datetime(2026, 11, 22, 20, 30, tzinfo=dt.UTC).timestamp()
    policies = [
        policy("mine", hourlyTokens=10, monthlyTokens=100),
        policy("team", dailyTokens=50, scope="namespace", rejectOnExceed=False),
        policy("all", dailyTokens=70, scope="cluster", failOpen=True),
        model.InferencePolicy.model_validate(
            {"apiVersion": "kars.azure.com/v1alpha1", "kind": "InferencePolicy", "metadata": {"name": "x"}, "spec": {}}
        ),
    ]
    lines = budgets.lines(policies, "team-a", "agent-1", now)
    assert [line.counter for line in lines] == [
        "team-a/mine|sandbox:team-a/agent-1|h2026112220",
        "team-a/mine|sandbox:team-a/agent-1|m202611",
        "team-a/team|namespace:team-a|d20261122",
        "team-a/all|cluster:*|d20261122",
    ]
    assert [(line.enforce, line.fail_open) for line in lines] == [(True, False)] * 2 + [(False, False), (True, True)]
    charge = lines[0].charge()
    assert charge.limit == 10 and charge.expires_at > lines[0].span.end
