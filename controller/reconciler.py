"""What the controller does, behind the thin kopf handlers of ``controller.operator``.

``Controller`` keeps an index of the CRs it has seen (fed by watch events), writes the
projection ConfigMap when the compiled projection changes (debounced, so 300 CRs created
at once give a handful of writes, not 300), reconciles each KarsSandbox into its
ServiceAccount, Service and Pod, and keeps every CR's status current: policy CRs get
``Ready`` from the router's report, sandboxes get phase and conditions from their Pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from controller import builders, conditions, config, kube, projection, routerstatus
from router.policy import load, model

log = logging.getLogger("kars.controller")

STATUS_PATCH_CONCURRENCY = 16
CONFLICT_RETRY_S = 2.0

Body = dict[str, Any]
Key = projection.Key


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _generation(body: Mapping[str, Any]) -> int | None:
    gen = body.get("metadata", {}).get("generation")
    return gen if isinstance(gen, int) else None


class Controller:
    def __init__(
        self,
        settings: config.ControllerSettings,
        api: kube.Kube,
        router: routerstatus.RouterStatusClient | None,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.settings = settings
        self.kube = api
        self.router = router
        self.clock = clock
        self.index: dict[Key, Body] = {}
        self.compiled = projection.compile_resources(())
        self._compile_cache: projection.Cache = {}
        self.router_status: dict[str, Any] | None = None
        self._written: dict[Key, tuple[str, ...]] = {}  # last status we patched, per CR
        self._dirty = asyncio.Event()
        self._deleted: set[Key] = set()  # seen deleted since start: never re-added by the seed
        self._statuses_dirty = asyncio.Event()
        self._invalid_reported: dict[Key, str] = {}
        self.projection_writes = 0

    # -- the index ----------------------------------------------------------------------------

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """Record a watch event; ``True`` when the projection must be rewritten."""
        key = projection.key_of(body)
        if event_type == "DELETED":
            self._deleted.add(key)
            existed = self.index.pop(key, None) is not None
            self._written.pop(key, None)
            self._invalid_reported.pop(key, None)
            if existed:
                self._dirty.set()
            return existed
        previous = self.index.get(key)
        self.index[key] = dict(body)
        if key[0] == "KarsSandbox" and self._policy_digest_due(key, body) is not None:
            # Another writer (the sandbox handler, with the policy it had compiled then) left a
            # digest that is no longer the one in force: the status loop puts it right.
            self._statuses_dirty.set()
        if previous is None or projection.as_written(previous) != projection.as_written(body):
            self._dirty.set()
            return True
        return False

    def mark_dirty(self) -> None:
        self._dirty.set()

    def validation_error(self, body: Mapping[str, Any]) -> str | None:
        """The model's complaint about a CR, reported once per distinct message."""
        key = projection.key_of(body)
        parsed = load.parse_document(projection.as_written(body), load.Source("/".join(k for k in key if k), 1))
        if isinstance(parsed, load.Loaded):
            self._invalid_reported.pop(key, None)
            return None
        message = parsed.summary()
        if self._invalid_reported.get(key) == message:
            return None
        self._invalid_reported[key] = message
        return message

    # -- the projection -----------------------------------------------------------------------

    async def seed_index(self, stop: asyncio.Event) -> None:
        """List every kind once before the first write: a projection written from a half-filled
        index would remove policy that is in force (a deny rule vanishing is a fail-open)."""
        delay = kube.RETRY_DELAY_S
        while not stop.is_set():
            try:
                for plural in projection.PLURALS.values():
                    for body in await self.kube.list_custom(plural, self.settings.namespaces):
                        key = projection.key_of(body)
                        if key not in self.index and key not in self._deleted:
                            self.observe("ADDED", body)
                return
            except Exception as exc:  # keep trying; nothing is written until this succeeds
                log.warning("listing policy failed, retrying in %.0fs: %s", delay, exc, exc_info=_unexpected(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.router_poll_max_s)

    async def run_projection(self, stop: asyncio.Event) -> None:
        """Write the ConfigMap whenever the index changed, debounced; retry with backoff."""
        await self.seed_index(stop)
        self._dirty.set()  # the first write happens even when nothing exists (an empty projection)
        delay = kube.RETRY_DELAY_S
        while not stop.is_set():
            await self._dirty.wait()
            await asyncio.sleep(self.settings.projection_debounce_s)
            self._dirty.clear()
            try:
                await self.write_projection()
                delay = kube.RETRY_DELAY_S
            except Exception as exc:  # this loop must outlive any failure; back off and retry
                log.warning("projection not written, retrying in %.0fs: %s", delay, exc, exc_info=_unexpected(exc))
                self._dirty.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.router_poll_max_s)

    async def write_projection(self) -> None:
        compiled = projection.compile_resources(self.index.values(), self._compile_cache)
        s = self.settings
        annotations = {projection.DIGEST_ANNOTATION: compiled.digest}
        if await self.kube.apply_configmap(s.policy_namespace, s.policy_configmap, compiled.files, annotations):
            self.projection_writes += 1
        self.compiled = compiled
        self._statuses_dirty.set()

    async def run_status_updates(self, stop: asyncio.Event) -> None:
        """Patch statuses after each projection or router report, apart from the projection
        loop, so that patching hundreds of statuses never delays the next ConfigMap write."""
        while not stop.is_set():
            await self._statuses_dirty.wait()
            self._statuses_dirty.clear()
            try:
                await self.update_statuses()
            except Exception as exc:  # this loop must outlive any failure; back off and retry
                log.warning("status update failed, retrying: %s", exc, exc_info=_unexpected(exc))
                self._statuses_dirty.set()
                await asyncio.sleep(kube.RETRY_DELAY_S)

    # -- router readiness ---------------------------------------------------------------------

    async def run_router_poll(self, stop: asyncio.Event) -> None:
        router = self.router
        if router is None:
            return
        while not stop.is_set():
            try:
                self.router_status = await router.fetch()
                self._statuses_dirty.set()
            except routerstatus.RouterUnavailable as exc:
                log.warning("router status unavailable (next try in %.1fs): %s", router.next_delay_s, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=router.next_delay_s)

    async def update_statuses(self) -> None:
        """Patch each policy CR whose Ready condition changed; each sandbox whose policyDigest did."""
        now = self.clock()
        policy_keys = [k for k in self.index if k[0] != "KarsSandbox"]
        judged = projection.readiness(self.compiled, self.router_status or {"entries": []}, policy_keys)
        if self.router_status is None:  # never heard from the router: only what we know ourselves
            judged = {k: r for k, r in judged.items() if r.reason == "Invalid" or self.router is None}
        patches: list[tuple[Key, Body, tuple[str, ...]]] = []
        for key, ready in judged.items():
            body = self.index[key]
            generation = _generation(body)
            # The generation too: a spec edit that leaves the digest as it was (a default written
            # out) must still move observedGeneration on, or the status looks stale for ever.
            fingerprint = (ready.status, ready.reason, ready.message, ready.digest or "", str(generation))
            if self._written.get(key) == fingerprint:
                continue
            conds = conditions.set_condition(
                body.get("status", {}).get("conditions"),
                "Ready",
                ready.status,  # type: ignore[arg-type]
                ready.reason,
                ready.message,
                now=now,
                generation=generation,
            )
            status: Body = {"conditions": conds, "digest": ready.digest, "observedGeneration": generation}
            patches.append((key, status, fingerprint))
        for key in (k for k in self.index if k[0] == "KarsSandbox"):
            # No memo of what was written here: the index holds what the object says now (our own
            # patches and every watch event), and a stale digest must be written again.
            want = self._policy_digest_due(key, self.index[key])
            if want is not None:
                patches.append((key, {"policyDigest": want}, ("policyDigest", want)))
        await self._patch_all(patches)

    def _policy_digest_due(self, key: Key, body: Mapping[str, Any]) -> str | None:
        """The policyDigest a sandbox's status should say, when it says something else."""
        spec = body.get("spec") or {}
        refs = [model.PolicyRef.model_validate(r) for r in spec.get("policyRefs", []) if _valid_ref(r)]
        want = projection.policy_digest(refs, key[1], self.compiled)
        return want if want is not None and (body.get("status") or {}).get("policyDigest") != want else None

    async def _patch_all(self, patches: list[tuple[Key, Body, tuple[str, ...]]]) -> None:
        gate = asyncio.Semaphore(STATUS_PATCH_CONCURRENCY)

        async def one(key: Key, status: Body, fingerprint: tuple[str, ...]) -> None:
            async with gate:
                await self.kube.patch_status(projection.PLURALS[key[0]], key[1], key[2], status)
                ready = conditions.get_condition(status.get("conditions"), "Ready") or {}
                if ready.get("reason") == "RouterRejected" and key in self.index:
                    # A permanent error: say why on the object, once per distinct reason.
                    try:
                        await self.kube.post_event(
                            self.index[key],
                            type_="Warning",
                            reason="RouterRejected",
                            message=ready["message"],
                            home_namespace=self.settings.policy_namespace,
                        )
                    except (kopf.TemporaryError, kopf.PermanentError) as exc:  # the condition says it too
                        log.warning("event not posted for %s: %s", "/".join(key), exc)
            self._written[key] = fingerprint
            if key in self.index:
                self.index[key].setdefault("status", {}).update(status)

        await asyncio.gather(*(one(*p) for p in patches))

    # -- sandboxes ----------------------------------------------------------------------------

    def parse_sandbox(self, body: Mapping[str, Any]) -> model.KarsSandbox:
        parsed = load.parse_document(projection.as_written(body), load.Source("KarsSandbox", 1))
        if isinstance(parsed, load.DocError):
            raise kopf.PermanentError(f"invalid KarsSandbox: {parsed.summary()}")
        assert isinstance(parsed.resource, model.KarsSandbox)
        return parsed.resource

    async def reconcile_sandbox(self, body: Mapping[str, Any]) -> Body | None:
        """Bring the sandbox's children in line with its spec; the new status (None if deleted)."""
        sandbox = self.parse_sandbox(body)
        ns, name = sandbox.namespace, sandbox.name
        owner = builders.owner_reference(dict(body))
        current = await self.kube.get_pod(ns, name)
        if current is not None and not builders.owned_by(current, owner):
            raise kube.NameTaken(f"Pod {ns}/{name}")  # never deleted or replaced: it is someone else's
        decision = builders.lifecycle(sandbox.spec, current, self.clock())
        if decision.delete_sandbox:
            log.info("sandbox %s/%s finished; ttlSecondsAfterFinished passed: deleting it", ns, name)
            await self.kube.delete_sandbox(ns, name)
            return None
        await self.kube.ensure_service_account(builders.service_account(sandbox, owner))
        await self.kube.ensure_service(builders.service(sandbox, owner, self.settings))
        if sandbox.spec.replicas == 0 or decision.expired:
            if current is not None:
                await self.kube.delete_pod(ns, name)
            current = None
        else:
            desired = builders.pod(sandbox, owner, self.settings)
            if current is not None and not builders.pod_is_current(current, desired):
                await self.kube.delete_pod(ns, name)
                current = None
            if current is None:  # a pod still terminating answers 409: a TemporaryError, retried
                current = await self.kube.create_pod(desired)
        return self.status_for(sandbox, body, current, expired=decision.expired)

    async def check_lifecycle(self, body: Mapping[str, Any]) -> Body | None:
        """The periodic check of ``shutdownTime``/``ttlSecondsAfterFinished``: one read of the
        Pod, and a reconcile only when the decision changed something (a new status, or None)."""
        try:
            sandbox = self.parse_sandbox(body)
        except kopf.PermanentError:
            return None  # already reported by the create/update handler; nothing to time
        pod = await self.kube.get_pod(sandbox.namespace, sandbox.name)
        decision = builders.lifecycle(sandbox.spec, pod, self.clock())
        if decision.delete_sandbox:
            return await self.reconcile_sandbox(body)
        expired_already = (body.get("status") or {}).get("phase") == "Expired" and pod is None
        if decision.expired and not expired_already:
            return await self.reconcile_sandbox(body)
        return None

    def status_for(
        self, sandbox: model.KarsSandbox, body: Mapping[str, Any], pod: Body | None, *, expired: bool = False
    ) -> Body:
        return builders.sandbox_status(
            sandbox.spec,
            pod,
            body.get("status"),
            now=self.clock(),
            generation=_generation(body),
            expired=expired,
            policy_digest=projection.policy_digest(sandbox.spec.policy_refs, sandbox.namespace, self.compiled),
        )

    async def on_pod_event(self, event_type: str | None, pod: Mapping[str, Any]) -> None:
        """A sandbox pod changed: refresh the owner's status; recreate a pod deleted under it.

        The label only finds the sandbox; the pod counts only if the sandbox owns it (by uid).
        Anyone who can create pods in the namespace can set the label, and a pod of theirs
        must not make the sandbox look Running and Ready (nor its deletion recreate anything).
        """
        meta = pod.get("metadata", {})
        ns, name = meta.get("namespace", ""), meta.get("labels", {}).get(builders.SANDBOX_LABEL)
        body = self.index.get(("KarsSandbox", ns, name or ""))
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return
        owner = builders.owner_reference(body)
        if not owner["uid"] or not builders.owned_by(dict(pod), owner):
            return
        try:
            sandbox = self.parse_sandbox(body)
        except kopf.PermanentError:
            return
        expired = builders.lifecycle(sandbox.spec, None, self.clock()).expired
        current: Body | None = dict(pod) if event_type != "DELETED" else None
        if current is None and sandbox.spec.replicas == 1 and not expired:
            status = await self.reconcile_sandbox(body)  # deleted under us: recreate
            if status is None:
                return
        else:
            status = self.status_for(sandbox, body, current, expired=expired)
        previous = body.get("status") or {}
        unchanged = conditions.same_conditions(previous.get("conditions"), status.get("conditions")) and all(
            previous.get(k) == status.get(k) for k in ("phase", "podName", "policyDigest")
        )
        if not unchanged:
            await self.kube.patch_status("karssandboxes", ns, str(name), status)
            body.setdefault("status", {}).update(status)


def _unexpected(exc: Exception) -> bool:
    """A failure that is not one of the API errors ``controller.kube`` maps: log its traceback."""
    return not isinstance(exc, (kopf.TemporaryError, kopf.PermanentError))


def _valid_ref(ref: Any) -> bool:
    return isinstance(ref, dict) and ref.get("kind") in ("InferencePolicy", "ToolPolicy", "McpServer", "A2AAgent")
