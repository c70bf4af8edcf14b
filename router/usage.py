"""Token usage reported by an upstream, as one event the budget layer settles against.

A transport that learns the usage of a response (the ``usage`` object of a chat, completions,
embeddings or Responses reply, or the final chunk of a stream) stores one ``Usage`` in
``scope["state"]["kars.usage"]``. Layers above read it after the response has been sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(slots=True)  # not frozen: built per request (see router.stores.base.Counter)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_payload(cls, usage: Mapping[str, Any] | None) -> Usage | None:
        """Chat/completions/embeddings (``prompt_tokens``...) or Responses (``input_tokens``...)."""
        if not isinstance(usage, Mapping):
            return None
        prompt = _count(usage, "prompt_tokens", "input_tokens")
        completion = _count(usage, "completion_tokens", "output_tokens") or 0
        total = _count(usage, "total_tokens")
        if prompt is None and total is None:
            return None
        prompt = prompt or 0
        return cls(prompt, completion, total if total is not None else prompt + completion)


def _count(usage: Mapping[str, Any], name: str, other: str | None = None) -> int | None:
    """The first of the fields ``name``, ``other`` that holds a token count."""
    value = usage.get(name)
    if type(value) is int and value >= 0:  # exactly int: JSON true (bool) is no count
        return value
    if other is not None:
        value = usage.get(other)
        if type(value) is int and value >= 0:
            return value
    return None
