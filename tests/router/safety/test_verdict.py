"""Effective ceilings (the floor tightened, never loosened), what trips, and Azure's result shape."""

from __future__ import annotations

from router.policy import model
from router.safety import content_safety, foundry, texts, verdict

F = verdict.Finding


def cs(**fields: object) -> model.ContentSafety:
    return model.ContentSafety.model_validate(fields)


def test_floor_alone_and_tightened_by_every_policy() -> None:
    floor = model.SafetyFloor()  # Medium everywhere
    assert verdict.effective(floor, []).harm == (2, 2, 2, 2)
    tightened = verdict.effective(floor, [cs(hate="Low"), cs(violence="Safe", requirePromptShields=True)])
    assert tightened.harm == (1, 2, 2, 0)
    assert tightened.shields is True


def test_a_policy_never_loosens_the_floor_even_if_it_got_past_the_load_check() -> None:
    floor = model.SafetyFloor(sexual="Low")
    assert verdict.effective(floor, [cs(sexual="High")]).harm == (2, 2, 1, 2)


def test_fail_open_only_when_the_floor_allows_and_every_policy_asks() -> None:
    closed = model.SafetyFloor()
    open_floor = model.SafetyFloor(allow_fail_open=True)
    assert verdict.effective(closed, [cs(failOpen=True)]).fail_open is False  # the floor decides
    assert verdict.effective(open_floor, []).fail_open is False  # nobody asked
    assert verdict.effective(open_floor, [cs(failOpen=True)]).fail_open is True
    assert verdict.effective(open_floor, [cs(failOpen=True), cs(hate="Low")]).fail_open is False


def test_tripped_by_severity_boundary_and_by_origin() -> None:
    c = verdict.Ceilings((2, 2, 2, 1))
    assert verdict.tripped([F("hate", "x", 2), F("violence", "x", 1)], c) == []
    assert verdict.tripped([F("hate", "x", 3)], c) == [F("hate", "x", 3)]
    assert verdict.tripped([F("violence", "x", 2)], c) == [F("violence", "x", 2)]
    remote_attack = F(verdict.JAILBREAK, "content_safety")
    assert verdict.tripped([remote_attack], c) == []  # only with requirePromptShields
    assert verdict.tripped([remote_attack], verdict.Ceilings((2, 2, 2, 2), shields=True)) == [remote_attack]
    assert verdict.tripped([F(verdict.JAILBREAK, "local")], c) == [F(verdict.JAILBREAK, "local")]


def test_content_filter_result_is_azures_shape() -> None:
    blocked = [
        F("violence", "content_safety", 2),
        F("violence", "foundry", 3),
        F(verdict.BLOCKLIST, "local", name="secrets"),
        F(verdict.INDIRECT, "content_safety"),
    ]
    assert verdict.content_filter_result(blocked) == {
        "violence": {"filtered": True, "severity": "high"},
        "custom_blocklists": {"filtered": True, "details": [{"filtered": True, "id": "secrets"}]},
        "indirect_attack": {"filtered": True, "detected": True},
    }


def test_prompt_text_by_origin() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "image_url", "image_url": {}}]},
            {"role": "tool", "tool_call_id": "1", "content": "tool says"},
            {"role": "user", "content": "plain"},
            "garbage",
        ]
    }
    p = texts.prompt_of("chat", chat)
    assert (p.user, p.documents, p.other) == (["part one", "plain"], ["tool says"], ["be nice"])
    r = texts.prompt_of(
        "responses",
        {
            "instructions": "sys",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "function_call_output", "call_id": "c", "output": "doc"},
            ],
        },
    )
    assert (r.user, r.documents, r.other) == (["hi"], ["doc"], ["sys"])
    assert texts.prompt_of("responses", {"input": "just text"}).user == ["just text"]
    assert texts.prompt_of("chat", {"prompt": ["a", 1, "b"]}).user == ["a", "b"]
    assert not texts.prompt_of("chat", None) and not texts.prompt_of("chat", {"messages": "nope"})


def test_output_text_of_replies_and_stream_events() -> None:
    assert texts.output_of({"choices": [{"message": {"content": "a"}}, {"text": "b"}]}) == "a\nb"
    response = {"output": [{"type": "message", "content": [{"type": "output_text", "text": "r"}]}]}
    assert texts.output_of(response) == "r"
    assert texts.delta_of({"choices": [{"delta": {"content": "x"}}]}) == "x"
    assert texts.delta_of({"type": "response.output_text.delta", "delta": "y"}) == "y"
    assert texts.delta_of({"choices": []}) == "" and texts.delta_of([1]) == ""


def test_foundry_annotations_and_malformed_ones() -> None:
    doc = {
        "prompt_filter_results": [{"content_filter_results": {"hate": {"filtered": False, "severity": "Low"}}}],
        "choices": [{"content_filter_results": {"violence": {"severity": "weird"}, "jailbreak": {"detected": True}}}],
    }
    assert foundry.prompt_findings(doc) == [F("hate", "foundry", 1)]
    assert foundry.output_findings(doc) == [F(verdict.JAILBREAK, "foundry")]
    assert foundry.prompt_findings({"prompt_filter_results": "x"}) == []
    assert foundry.output_findings({"choices": [None, {"content_filter_results": 3}]}) == []
    refused = {
        "error": {
            "code": "content_filter",
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {
                    "sexual": {"filtered": True, "severity": "medium"},
                    "hate": {"filtered": False, "severity": "low"},
                },
            },
        }
    }
    assert foundry.error_findings(refused) == [F("sexual", "foundry", 2)]
    assert foundry.error_findings({"error": {"code": "429"}}) is None


def test_content_safety_split_keeps_every_character_under_the_limit() -> None:
    text = ("word " * 5_000) + "x" * 25_000
    pieces = content_safety.split(text)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= content_safety.MAX_TEXT_CHARS for p in pieces)
    assert content_safety.split("") == [""] and content_safety.split("short") == ["short"]
