"""What an inference request is: its action and deployment, from the path alone (SPEC.md §2).

Shared by the layers that act before the transport (token budget, content safety) and by the
Foundry transport itself, so all of them classify a path the same way. Pure and cheap.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

Action = Literal["chat", "responses", "embeddings", "image", "audio", "other"]

# The action of the endpoint, by the path after the deployment (Azure style) or after /v1.
_ACTIONS: dict[str, Action] = {
    "chat/completions": "chat",
    "completions": "chat",  # legacy text completions generate text like chat does
    "responses": "responses",
    "embeddings": "embeddings",
    "images/generations": "image",
    "images/edits": "image",
}

OPENAI_PREFIX = "/openai/"
V1_ALIAS_PREFIX = "/v1/"
MODELS_PREFIX = "/models/"


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceRoute:
    action: Action
    deployment: str | None  # from the path (Azure deployments style); None when the body's "model" names it
    upstream_path: str  # the path to call on the Foundry endpoint (the /v1 alias mapped to /openai/v1)

    @property
    def generates(self) -> bool:
        """Whether this call consumes tokens worth budgeting and checking."""
        return self.action not in ("other",)


def _action(endpoint: str) -> Action:
    return _ACTIONS.get(endpoint) or ("audio" if endpoint.startswith("audio/") else "other")


@functools.lru_cache(maxsize=4096)  # three layers ask per request; routes are immutable
def classify(path: str) -> InferenceRoute | None:
    """The inference route for ``path``, or None when the path is not an inference route."""
    if path.startswith(V1_ALIAS_PREFIX):
        path = "/openai" + path
    if path.startswith("/openai/deployments/"):
        rest = path[len("/openai/deployments/") :]
        deployment, _, endpoint = rest.partition("/")
        if not deployment or not endpoint:
            return None
        return InferenceRoute(_action(endpoint), deployment, path)
    if path.startswith("/openai/v1/"):
        endpoint = path[len("/openai/v1/") :]
        return InferenceRoute(_action(endpoint), None, path)
    if path.startswith(OPENAI_PREFIX) and len(path) > len(OPENAI_PREFIX):
        # Azure OpenAI's dated data plane without a deployment in the path (the AzureOpenAI SDK
        # calls /openai/responses?api-version=..., /openai/files, /openai/models): "model" is in the body.
        endpoint = path[len(OPENAI_PREFIX) :]
        return InferenceRoute(_action(endpoint), None, path)
    if path.startswith(MODELS_PREFIX):
        endpoint = path[len(MODELS_PREFIX) :]
        return InferenceRoute(_action(endpoint), None, path)
    return None
