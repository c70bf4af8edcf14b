"""The text of a request and of a reply, as content-safety providers see it. Pure, no I/O.

A prompt is split by who wrote it, because attacks are judged by origin (Prompt Shields'
``userPrompt`` and ``documents``): the caller's own words (``user``: chat ``user`` messages,
completions ``prompt``, Responses ``input``, image ``prompt``), third-party text the agent passes
on (``documents``: ``tool`` / ``function`` messages, Responses ``function_call_output``), and the
rest (``other``: system, developer and assistant turns, Responses ``instructions``). Content parts
(``[{"type": "text", "text": ...}]``, ``input_text``) count; images and audio parts carry no text.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
_DOCUMENT_ROLES = frozenset({"tool", "function"})
_OUTPUT_DELTA_TYPES = frozenset({"response.output_text.delta", "response.refusal.delta"})


@dataclasses.dataclass(slots=True)
class Prompt:
    user: list[str] = dataclasses.field(default_factory=list)
    documents: list[str] = dataclasses.field(default_factory=list)
    other: list[str] = dataclasses.field(default_factory=list)

    def all(self) -> list[str]:
        return [*self.user, *self.documents, *self.other]

    def __bool__(self) -> bool:
        return bool(self.user or self.documents or self.other)


def _content(value: Any, out: list[str]) -> None:
    """Text of a message ``content``: a string, or a list of content parts."""
    if isinstance(value, str):
        if value:
            out.append(value)
    elif isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
                out.append(part["text"])


def _message(item: dict[str, Any], prompt: Prompt) -> None:
    role = item.get("role")
    target = prompt.user if role == "user" else prompt.documents if role in _DOCUMENT_ROLES else prompt.other
    _content(item.get("content"), target)


def prompt_of(action: str, doc: Any) -> Prompt:
    """The prompt of an inference request body (``action`` from ``router.inference``)."""
    prompt = Prompt()
    if not isinstance(doc, dict):
        return prompt
    messages = doc.get("messages")
    if isinstance(messages, list):  # chat completions, /models chat
        for m in messages:
            if isinstance(m, dict):
                _message(m, prompt)
    raw = doc.get("prompt")  # legacy completions, images
    if isinstance(raw, str):
        prompt.user.append(raw)
    elif isinstance(raw, list):
        prompt.user.extend(p for p in raw if isinstance(p, str))  # token arrays carry no text to check
    if action == "responses":
        _responses_input(doc.get("input"), prompt)
        if isinstance(doc.get("instructions"), str):
            prompt.other.append(doc["instructions"])
    return prompt


def _responses_input(value: Any, prompt: Prompt) -> None:
    if isinstance(value, str):
        prompt.user.append(value)
        return
    if not isinstance(value, list):
        return
    for item in value:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "function_call_output" or kind == "custom_tool_call_output":
            _content(item.get("output"), prompt.documents)
        elif "role" in item and kind in (None, "message"):
            _message(item, prompt)


def output_of(doc: Any) -> str:
    """The generated text of a whole (non-streamed) reply: chat, completions or Responses."""
    if not isinstance(doc, dict):
        return ""
    out: list[str] = []
    _choice_texts(doc.get("choices"), "message", out)
    output = doc.get("output")
    if isinstance(output, list):
        for item in output:
            if isinstance(item, dict) and item.get("type") == "message":
                _content(item.get("content"), out)
    return "\n".join(out)


def delta_of(doc: Any) -> str:
    """The text one stream event adds: a chat / completions chunk, or a Responses text delta."""
    if not isinstance(doc, dict):
        return ""
    if doc.get("type") in _OUTPUT_DELTA_TYPES:
        delta = doc.get("delta")
        return delta if isinstance(delta, str) else ""
    out: list[str] = []
    _choice_texts(doc.get("choices"), "delta", out)
    return "".join(out)


def _choice_texts(choices: Any, part: str, out: list[str]) -> None:
    """The text of each choice's ``message`` (whole reply) or ``delta`` (stream chunk), and ``text``."""
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        body = choice.get(part)
        if isinstance(body, dict):
            _content(body.get("content"), out)
            _content(body.get("refusal"), out)
        _content(choice.get("text"), out)
