"""Controller test fixtures: the emulated API server, a Kubernetes client for the test, the controller."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import kmock
import kopf
import pytest

from controller import config, crds, operator, reconciler
from tests.controller import kubeapi
from tests.support import waiting

WAIT_S = 30.0  # generous: the machine is shared; a passing wait returns as soon as its condition holds
POLL_S = 0.01
NS = "team-a"
POLICY_NS = "kars-system"

GROUP_PATH = "/apis/kars.azure.com/v1alpha1"


class Cluster:
    """What a test does to the cluster, over HTTP like kubectl, and what it reads back."""

    def __init__(self, api: kubeapi.KubeAPI, http: httpx.AsyncClient) -> None:
        self.api = api
        self.http = http

    @staticmethod
    def path(plural: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        core = plural in kubeapi.CORE
        base = "/api/v1" if core else GROUP_PATH
        out = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        if name:
            out += f"/{name}"
        if sub:
            out += f"/{sub}"
        return out

    async def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.post(self.path(plural, body["metadata"].get("namespace")), json=body)
        assert r.status_code in (200, 201), r.text
        return dict(r.json())

    async def patch(
        self, plural: str, namespace: str | None, name: str, patch: dict[str, Any], sub: str | None = None
    ) -> None:
        r = await self.http.patch(
            self.path(plural, namespace, name, sub),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert r.status_code == 200, r.text

    async def delete(self, plural: str, namespace: str | None, name: str) -> None:
        r = await self.http.delete(self.path(plural, namespace, name))
        assert r.status_code in (200, 202), r.text

    def get(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        group = "v1" if plural in kubeapi.CORE else "kars.azure.com/v1alpha1"
        key = (kmock.resource(f"{group}/{plural}"), namespace, name)
        if key not in self.api.objects or self.api.objects[key].deleted:
            return None
        return _plain(self.api.objects[key])

    def requests(self, method: str, path_part: str) -> list[Any]:
        return [r for r in self.api._requests if r.method == method and path_part in r.url.path]

    def events(self, namespace: str) -> list[dict[str, Any]]:
        out = []
        for (res, ns, _name), obj in self.api.objects.items():
            if res == kmock.resource("v1/events") and ns == namespace and not obj.deleted:
                out.append(_plain(obj))
        return out


def _plain(value: Any) -> Any:
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


async def wait_until(predicate: Callable[[], Any], what: str, within_s: float = WAIT_S) -> Any:
    """Poll a condition on state the test can see; fail with ``what`` after ``within_s`` seconds."""
    return await waiting.until_async(predicate, timeout_s=within_s, interval_s=POLL_S, what=what)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with kubeapi.KubeAPI() as api, kmock.Server(api):
        kubeapi.declare_resources(api)
        async with httpx.AsyncClient(base_url=str(api.url), timeout=WAIT_S) as http:
            yield Cluster(api, http)


ControllerFactory = Callable[..., contextlib.AbstractAsyncContextManager[reconciler.Controller]]


@pytest.fixture
def run_controller(cluster: Cluster) -> ControllerFactory:
    """``async with run_controller(**settings) as ctl:`` runs kopf with our registry against ``cluster``.

    The controller runs on its own event loop in a thread, as it would in its own process:
    kopf cancels every task created on its loop after it started when it stops, which on a
    shared loop would include the emulated API server's request handlers.
    """

    @contextlib.asynccontextmanager
    async def run(**overrides: Any) -> AsyncIterator[reconciler.Controller]:
        fields: dict[str, Any] = {
            "api_server": str(cluster.api.url),
            "policy_namespace": POLICY_NS,
            "router_poll_s": 0.05,
            "router_poll_max_s": 0.5,
            "lifecycle_check_s": 0.2,
            "projection_debounce_s": 0.01,
        }
        fields.update(overrides)
        settings = config.ControllerSettings(**fields)
        stop, ready = threading.Event(), threading.Event()
        box: dict[str, Any] = {}

        async def main() -> None:
            async with operator.controller(settings) as (ctl, registry):
                box["ctl"] = ctl
                await kopf.operator(
                    registry=registry,
                    settings=_fast(operator.operator_settings(settings)),
                    clusterwide=settings.clusterwide,
                    namespaces=list(settings.namespaces),
                    standalone=True,
                    stop_flag=stop,
                    ready_flag=ready,
                )

        def thread_main() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # surfaced to the test below
                box["error"] = exc

        thread = threading.Thread(target=thread_main, name="kars-controller-test", daemon=True)
        thread.start()
        try:
            assert await asyncio.to_thread(ready.wait, WAIT_S), f"controller did not start: {box.get('error')!r}"
            await wait_until(lambda: _watching(cluster, settings.namespaces), "the controller's watches")
            yield box["ctl"]
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, WAIT_S)
            assert not thread.is_alive(), "controller did not stop"
        assert "error" not in box, box.get("error")

    return run


WATCHED = ("/pods", *(f"/{k.plural}" for k in crds.KINDS))


def _watching(cluster: Cluster, namespaces: tuple[str, ...] = ()) -> bool:
    """kopf watches every resource it serves (so a stop never interrupts its discovery)."""
    paths = {r.url.path for r in cluster.api._requests if r.params.get("watch") == "true"}
    found = all(any(p.endswith(w) for p in paths) for w in WATCHED)
    return found and all(any(f"/namespaces/{ns}/" in p for p in paths) for ns in namespaces)


def _fast(s: kopf.OperatorSettings) -> kopf.OperatorSettings:
    s.posting.level = 30
    s.queueing.idle_timeout = 0.2
    s.queueing.exit_timeout = 0.1
    s.background.instant_exit_timeout = 0.1
    return s


Waiter = Callable[[Callable[[], Any], str], Awaitable[Any]]
