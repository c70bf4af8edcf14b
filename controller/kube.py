"""The controller's writes to the Kubernetes API, and the one place API errors are mapped.

kopf watches; this module creates, patches and deletes with ``kubernetes_asyncio``. Every
API error is translated here (kopf's convention): a request the server will never accept
(400, 403, 422) becomes ``kopf.PermanentError`` (no retry; kopf posts an Event on the
object), throttling, server errors and network failures become ``kopf.TemporaryError``
with a delay, so a handler retries with backoff and never hot-loops.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import kopf
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from controller import builders, projection
from controller import config as ctl_config
from router.policy import model

MERGE_PATCH = "application/merge-patch+json"
RETRY_DELAY_S = 5.0
PERMANENT_STATUSES = frozenset({400, 403, 405, 413, 415, 422})

Body = dict[str, Any]
T = TypeVar("T")
NAME_TAKEN_RETRY_S = 30.0


class NameTaken(kopf.TemporaryError):  # type: ignore[misc]
    """A child's name is held by an object the sandbox does not own: left untouched, retried later."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} exists and is not this sandbox's; it is left as it is", delay=NAME_TAKEN_RETRY_S)


def _claim(what: str, current: Body | None, desired: Body) -> None:
    """Raise ``NameTaken`` unless ``current`` is owned by the sandbox that owns ``desired``."""
    if not builders.owned_by(current, desired["metadata"]["ownerReferences"][0]):
        raise NameTaken(what)


def map_api_error(exc: BaseException, what: str) -> kopf.PermanentError | kopf.TemporaryError:
    """API failure -> kopf's retry meaning, by status (the only place this decision is made)."""
    if isinstance(exc, ApiException):
        if exc.status in PERMANENT_STATUSES:
            body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body)
            return kopf.PermanentError(f"{what}: the API server refused it ({exc.status} {exc.reason}): {body}")
        headers: Mapping[str, str] = exc.headers or {}
        retry_after = headers.get("Retry-After") if exc.status == 429 else None
        delay = float(retry_after) if retry_after and str(retry_after).isdigit() else RETRY_DELAY_S
        return kopf.TemporaryError(f"{what}: {exc.status} {exc.reason}", delay=delay)
    return kopf.TemporaryError(f"{what}: {type(exc).__name__}: {exc}", delay=RETRY_DELAY_S)


async def _call(what: str, coro: Awaitable[T], *, missing_ok: bool = False, exists_ok: bool = False) -> T | None:
    try:
        return await coro
    except ApiException as exc:
        if missing_ok and exc.status == 404:
            return None
        if exists_ok and exc.status == 409:
            return None
        raise map_api_error(exc, what) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise map_api_error(exc, what) from exc


async def _raw(what: str, coro: Awaitable[Any], *, missing_ok: bool = False) -> Body | None:
    """A call made with ``_preload_content=False``, read as JSON. Pods are read this way: the
    generated models refuse partial statuses the API server does send (a container status
    without ``image``). Such calls do not raise on errors, so the status is checked here."""
    try:
        response = await coro
        async with response:
            if missing_ok and response.status == 404:
                return None
            if response.status >= 400:
                exc = ApiException(status=response.status, reason=response.reason)
                exc.body = await response.text()
                exc.headers = response.headers
                raise map_api_error(exc, what) from exc
            found: Body = await response.json()
            return found
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise map_api_error(exc, what) from exc


@contextlib.asynccontextmanager
async def api_client(settings: ctl_config.ControllerSettings) -> AsyncIterator[client.ApiClient]:
    """An API client: the explicit server from settings, else in-cluster, else kubeconfig."""
    cfg = client.Configuration()
    if settings.api_server:
        cfg.host = settings.api_server
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except ConfigException:
            await config.load_kube_config(client_configuration=cfg)
    api = client.ApiClient(configuration=cfg)
    try:
        yield api
    finally:
        await api.close()


class Kube:
    """The handful of writes the controller makes; bodies in and out are plain dicts."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        # Typed as Any: the generated stubs want model objects; the API takes the same JSON as dicts.
        self.core: Any = client.CoreV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)

    def _plain(self, obj: Any) -> Body | None:
        if obj is None:
            return None
        plain: Body = self._api.sanitize_for_serialization(obj)
        return plain

    # -- sandbox children ---------------------------------------------------------------------

    async def ensure_service_account(self, body: Body) -> None:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        what = f"ServiceAccount {ns}/{name}"
        created = await _call(f"create {what}", self.core.create_namespaced_service_account(ns, body), exists_ok=True)
        if created is None:  # exists: keep its annotations (workload identity) in step, if it is ours
            current = self._plain(await _call(f"read {what}", self.core.read_namespaced_service_account(name, ns)))
            _claim(what, current, body)
            # A merge patch removes a key only when it is set to null: the client id goes when
            # spec.identity does. Annotations others put on the account are left alone.
            annotations: dict[str, str | None] = {builders.WORKLOAD_IDENTITY_CLIENT_ID: None}
            annotations.update(body["metadata"].get("annotations") or {})
            patch = {"metadata": {"annotations": annotations}}
            await _call(
                f"patch {what}", self.core.patch_namespaced_service_account(name, ns, patch, _content_type=MERGE_PATCH)
            )

    async def ensure_service(self, body: Body) -> None:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        what = f"Service {ns}/{name}"
        created = await _call(f"create {what}", self.core.create_namespaced_service(ns, body), exists_ok=True)
        if created is None:
            current = self._plain(await _call(f"read {what}", self.core.read_namespaced_service(name, ns)))
            _claim(what, current, body)
            patch = {"spec": body["spec"]}
            await _call(f"patch {what}", self.core.patch_namespaced_service(name, ns, patch, _content_type=MERGE_PATCH))

    async def get_pod(self, namespace: str, name: str) -> Body | None:
        call = self.core.read_namespaced_pod(name, namespace, _preload_content=False)
        return await _raw(f"read Pod {namespace}/{name}", call, missing_ok=True)

    async def create_pod(self, body: Body) -> Body | None:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        call = self.core.create_namespaced_pod(ns, body, _preload_content=False)
        return await _raw(f"create Pod {ns}/{name}", call)

    async def delete_pod(self, namespace: str, name: str) -> None:
        await _call(f"delete Pod {namespace}/{name}", self.core.delete_namespaced_pod(name, namespace), missing_ok=True)

    # -- the projection -----------------------------------------------------------------------

    async def apply_configmap(
        self, namespace: str, name: str, data: Mapping[str, str], annotations: Mapping[str, str]
    ) -> bool:
        """Create or update the ConfigMap; ``True`` when something was written."""
        what = f"ConfigMap {namespace}/{name}"
        current = self._plain(
            await _call(f"read {what}", self.core.read_namespaced_config_map(name, namespace), missing_ok=True)
        )
        if current is None:
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations)},
                "data": dict(data),
            }
            await _call(f"create {what}", self.core.create_namespaced_config_map(namespace, body))
            return True
        have = current.get("data") or {}
        if have == dict(data):
            return False
        patch_data: dict[str, str | None] = {k: None for k in have if k not in data}
        patch_data.update(data)
        patch = {"metadata": {"annotations": dict(annotations)}, "data": patch_data}
        await _call(
            f"patch {what}", self.core.patch_namespaced_config_map(name, namespace, patch, _content_type=MERGE_PATCH)
        )
        return True

    # -- custom resources ---------------------------------------------------------------------

    async def patch_status(self, plural: str, namespace: str, name: str, status: Body) -> None:
        what = f"patch {plural}/{name} status"
        patch = {"status": status}
        if namespace:
            call: Callable[..., Awaitable[Any]] = self.custom.patch_namespaced_custom_object_status
            args: tuple[Any, ...] = (model.API_GROUP, "v1alpha1", namespace, plural, name, patch)
        else:
            call = self.custom.patch_cluster_custom_object_status
            args = (model.API_GROUP, "v1alpha1", plural, name, patch)
        await _call(what, call(*args, _content_type=MERGE_PATCH), missing_ok=True)

    async def post_event(
        self, obj: Mapping[str, Any], *, type_: str, reason: str, message: str, home_namespace: str
    ) -> None:
        """A core/v1 Event about ``obj``, for findings outside kopf handlers (which post their own).

        An Event about a cluster-scoped object (a TrustGraph) goes to ``home_namespace``, the
        controller's own, where the chart lets it post them in every mode.
        """
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace") or home_namespace
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "kars-", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kars-controller"},
            "reportingComponent": "kars-controller",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await _call(f"post Event {reason}", self.core.create_namespaced_event(namespace, event))

    async def list_custom(self, plural: str, namespaces: tuple[str, ...]) -> list[Body]:
        """Every object of a kars kind (in ``namespaces``, or everywhere when empty)."""
        group, version = model.API_GROUP, "v1alpha1"
        cluster_scoped = plural == "trustgraphs"
        if cluster_scoped or not namespaces:
            found = await _call(f"list {plural}", self.custom.list_cluster_custom_object(group, version, plural))
            lists = [found]
        else:
            lists = [
                await _call(
                    f"list {plural} in {ns}", self.custom.list_namespaced_custom_object(group, version, ns, plural)
                )
                for ns in namespaces
            ]
        kind = next(k for k, p in projection.PLURALS.items() if p == plural)
        out: list[Body] = []
        for listed in lists:
            for item in (listed or {}).get("items", []):
                item.setdefault("kind", kind)  # list items may omit kind and apiVersion
                item.setdefault("apiVersion", model.API_VERSION)
                out.append(item)
        return out

    async def delete_sandbox(self, namespace: str, name: str) -> None:
        await _call(
            f"delete KarsSandbox {namespace}/{name}",
            self.custom.delete_namespaced_custom_object(model.API_GROUP, "v1alpha1", namespace, "karssandboxes", name),
            missing_ok=True,
        )
