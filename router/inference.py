"""What an inference request is: its action and deployment, from the path alone (SPEC.md §2).

Shared by the layers that act before the transport (token budget, content safety) and by the
Foundry transport itself, so all of them classify a path the same way. Pure and cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import urllib.parse
from typing import Literal

Action = Literal["chat", "responses", "embeddings", "image", "audio", "other"]

# The action of the endpoint, by the path after the deployment (Azure style) or after /v1.
_ACTIONS: dict[str, Action] = {
    "chat/completions": "chat",
    "extensions/chat/completions": "chat",  # "On Your Data" chat, in Azure's earlier preview API versions
    "completions": "chat",  # legacy text completions generate text like chat does
    "responses": "responses",
    "embeddings": "embeddings",
    "images/generations": "image",
    "images/edits": "image",
}

OPENAI_PREFIX = "/openai/"
OPENAI_V1_PREFIX = "/openai/v1/"
DEPLOYMENTS_PREFIX = "/openai/deployments/"
V1_ALIAS_PREFIX = "/v1/"
MODELS_PREFIX = "/models/"


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceRoute:
    action: Action
    deployment: str | None  # from the path (Azure deployments style); None when the body's "model" names it
    upstream_path: str  # the path to call on the Foundry endpoint (the /v1 alias mapped to /openai/v1)
    endpoint: str = ""  # what follows the deployment, /v1 or /models, in lower case: "chat/completions"

    @property
    def generates(self) -> bool:
        """Whether this call consumes tokens worth budgeting and checking."""
        return self.action not in ("other",)


def starts(path: str, prefix: str) -> bool:
    """``path`` begins with ``prefix``, in any case (as the endpoint is matched: see ``_route``)."""
    return path[: len(prefix)].lower() == prefix


def _route(endpoint: str, deployment: str | None, path: str) -> InferenceRoute:
    # Case-blind: an upstream whose routing is (ASP.NET's is) must not get an unbudgeted chat call.
    endpoint = endpoint.lower()
    action = _ACTIONS.get(endpoint) or ("audio" if endpoint.startswith("audio/") else "other")
    return InferenceRoute(action, deployment, path, endpoint)


@functools.lru_cache(maxsize=4096)  # three layers ask per request; routes are immutable
def classify(path: str) -> InferenceRoute | None:
    """The inference route for ``path``, or None when the path is not an inference route.

    A path with an empty, ``.`` or ``..`` segment is none: an upstream that normalises it would
    serve another endpoint than the one classified here (``/openai/v1/x/../chat/completions``
    would be a chat call that the budget and safety layers took for ``other``).
    """
    if "//" in path or "/." in path or path.endswith("/"):
        segments = path.split("/")[1:]
        if any(s in ("", ".", "..") for s in segments):
            return None
    if starts(path, V1_ALIAS_PREFIX):
        path = "/openai" + path
    if starts(path, DEPLOYMENTS_PREFIX):
        rest = path[len(DEPLOYMENTS_PREFIX) :]
        deployment, _, endpoint = rest.partition("/")
        if not deployment or not endpoint:
            return None
        return _route(endpoint, deployment, path)
    if starts(path, OPENAI_V1_PREFIX):
        return _route(path[len(OPENAI_V1_PREFIX) :], None, path)
    if starts(path, OPENAI_PREFIX) and len(path) > len(OPENAI_PREFIX):
        # Azure OpenAI's dated data plane without a deployment in the path (the AzureOpenAI SDK
        # calls /openai/responses?api-version=..., /openai/files, /openai/models): "model" is in the body.
        return _route(path[len(OPENAI_PREFIX) :], None, path)
    if starts(path, MODELS_PREFIX):
        return _route(path[len(MODELS_PREFIX) :], None, path)
    return None


def predates(query: bytes, version: str) -> bool:
    """Whether the request names an Azure ``api-version`` older than ``version`` (dates compare as text)."""
    if b"api-version=" not in query:
        return False
    named = urllib.parse.parse_qs(query.decode("latin-1")).get("api-version")
    return named is not None and named[0] < version
