"""The kopf wiring of ``kars controller``: thin handlers over ``controller.reconciler``.

Handlers are registered on a registry built at start (never at import), so tests and the
benchmark run as many independent controllers as they like. Operator-level tasks (the
projection writer, the router poller) are started and stopped by kopf's startup and
cleanup activities.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import kopf

from controller import builders, conditions, config, kube, projection, reconciler, routerstatus
from router.policy import model

GROUP, VERSION = model.API_GROUP, "v1alpha1"
FINALIZER = f"{GROUP}/controller"
HANDLER_BACKOFF_S = 10.0


def operator_settings(settings: config.ControllerSettings | None = None) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    # Watching named namespaces: use the names as given instead of listing namespaces, which
    # the chart's RBAC does not grant (and a namespace that does not exist yet is still served).
    s.scanning.disabled = bool(settings is not None and settings.namespaces)
    # No handler needs a finalizer (owner references delete a sandbox's children); the name stays
    # so kopf finds and removes the finalizer on objects an older controller had put it on.
    s.persistence.finalizer = FINALIZER
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    s.posting.level = logging.WARNING  # Events for warnings and failures, not for every success
    s.peering.standalone = True  # one replica (the chart's Deployment uses the Recreate strategy)
    s.watching.server_timeout = 300
    s.watching.client_timeout = 330
    return s


def build_registry(ctl: reconciler.Controller, settings: config.ControllerSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    on = kopf.on
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()

    if settings.api_server:

        @on.login(registry=registry)
        def _login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=str(settings.api_server), insecure=True)

    @on.startup(registry=registry)
    async def _start(**_: Any) -> None:
        tasks.append(asyncio.create_task(ctl.run_projection(stop), name="kars-projection"))
        tasks.append(asyncio.create_task(ctl.run_router_poll(stop), name="kars-router-poll"))
        tasks.append(asyncio.create_task(ctl.run_status_updates(stop), name="kars-status"))

    @on.cleanup(registry=registry)
    async def _stop(**_: Any) -> None:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ctl.router is not None:
            await ctl.router.aclose()

    # Every kind is indexed for the projection (sandbox labels feed sandboxMatchLabels).
    for plural in projection.PLURALS.values():

        @on.event(GROUP, VERSION, plural, registry=registry)
        async def _observe(type: str | None, body: kopf.Body, **_: Any) -> None:
            ctl.observe(type, dict(body))
            if type != "DELETED" and body.get("kind") != "KarsSandbox":
                problem = ctl.validation_error(dict(body))
                if problem is not None:
                    kopf.warn(body, reason="InvalidPolicy", message=problem)
                    ctl.mark_dirty()

    sandboxes = {"registry": registry, "backoff": HANDLER_BACKOFF_S}

    @on.create(GROUP, VERSION, "karssandboxes", **sandboxes)  # type: ignore[arg-type]
    @on.update(GROUP, VERSION, "karssandboxes", **sandboxes)  # type: ignore[arg-type]
    @on.resume(GROUP, VERSION, "karssandboxes", **sandboxes)  # type: ignore[arg-type]
    async def _reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        ctl.observe("MODIFIED", dict(body))
        try:
            status = await ctl.reconcile_sandbox(dict(body))
        except kube.NameTaken as exc:
            kopf.warn(body, reason="NameConflict", message=str(exc))
            patch.status["phase"] = "Pending"
            patch.status["conditions"] = _not_ready(ctl, body, "NameConflict", str(exc))
            raise
        except kopf.PermanentError as exc:
            kopf.warn(body, reason="ReconcileFailed", message=str(exc))
            patch.status["phase"] = "Failed"
            patch.status["conditions"] = _not_ready(ctl, body, "InvalidSpec", str(exc))
            raise
        if status is not None:
            patch.status.update(status)
            ctl.index.get(projection.key_of(body), {}).setdefault("status", {}).update(status)

    @on.timer(
        GROUP,
        VERSION,
        "karssandboxes",
        registry=registry,
        interval=settings.lifecycle_check_s,
        when=_has_lifecycle,
    )
    async def _lifecycle(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        status = await ctl.check_lifecycle(dict(body))
        if status is not None:
            patch.status.update(status)

    @on.event("", "v1", "pods", labels={builders.SANDBOX_LABEL: kopf.PRESENT}, registry=registry)
    async def _pod(type: str | None, body: kopf.Body, **_: Any) -> None:
        await ctl.on_pod_event(type, dict(body))

    return registry


def _has_lifecycle(spec: kopf.Spec, **_: Any) -> bool:
    life = spec.get("lifecycle") or {}
    return bool(life.get("shutdownTime")) or life.get("ttlSecondsAfterFinished") is not None


def _not_ready(ctl: reconciler.Controller, body: kopf.Body, reason: str, message: str) -> list[dict[str, Any]]:
    return conditions.set_condition(
        (body.get("status") or {}).get("conditions"), "Ready", "False", reason, message, now=ctl.clock()
    )


@contextlib.asynccontextmanager
async def controller(settings: config.ControllerSettings) -> AsyncIterator[tuple[reconciler.Controller, Any]]:
    """A Controller and its registry, with the API client open for their lifetime."""
    async with kube.api_client(settings) as api:
        router = None
        url = settings.router_replicas_url or settings.router_url
        if url:
            router = routerstatus.RouterStatusClient(
                url,
                settings.admin_token_file,
                poll_s=settings.router_poll_s,
                max_poll_s=settings.router_poll_max_s,
                replicas=settings.router_replicas_url is not None,
            )
        ctl = reconciler.Controller(settings, kube.Kube(api), router)
        yield ctl, build_registry(ctl, settings)


async def run(
    settings: config.ControllerSettings,
    *,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    async with controller(settings) as (_ctl, registry):
        await kopf.operator(
            registry=registry,
            settings=operator_settings(settings),
            clusterwide=settings.clusterwide,
            namespaces=list(settings.namespaces),
            standalone=True,
            stop_flag=stop,
            ready_flag=ready,
        )
