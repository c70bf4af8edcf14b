"""The policy in force: hot reload from a directory, per-resource last-good, status report.

``PolicyStore.snapshot`` is the current ``Snapshot``; a reload builds a new one off the event
loop and swaps it in with one assignment, so every request sees one whole snapshot.

A document that fails validation never replaces what was in force: the previous good
version of that resource stays (or the resource stays absent if it never loaded), and its
status entry carries ``lastError``. A file that cannot be parsed keeps every resource that
came from it. One team's broken policy therefore never freezes anyone else's updates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import watchfiles

from router.policy import digest, load, model, snapshot

log = logging.getLogger("kars.policy")

RESYNC_S = 60.0  # a full re-read even when no file event arrived (inotify can miss NFS edits)
WATCH_DEBOUNCE_MS = 100


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(ts: dt.datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True, slots=True)
class _Status:
    digest: str | None
    loaded_at: dt.datetime | None
    last_error: str | None
    source: str | None
    warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ReloadOutcome:
    result: str  # "ok" | "unchanged" | "error"
    generation: int
    errors: tuple[str, ...]


class PolicyStore:
    """Owns the current snapshot and its status; reloads on file changes."""

    def __init__(
        self,
        directory: Path | None,
        floor: model.SafetyFloor,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        on_reload: Callable[[str], None] | None = None,
    ) -> None:
        self.directory = directory
        self.floor = floor
        self._clock = clock
        self._on_reload = on_reload
        self.snapshot = snapshot.Snapshot((), generation=0, now=clock())
        self.loaded = False
        self.loaded_at: dt.datetime | None = None
        self._status: dict[tuple[str, str, str], _Status] = {}
        self._orphan_errors: tuple[str, ...] = ()
        self._lock = asyncio.Lock()
        self._subscribers: list[Callable[[snapshot.Snapshot], None]] = []

    def subscribe(self, callback: Callable[[snapshot.Snapshot], None]) -> None:
        """Call ``callback(new_snapshot)`` on the event loop each time a new snapshot is swapped in."""
        self._subscribers.append(callback)

    # -- reloading ---------------------------------------------------------------------------

    async def reload(self) -> ReloadOutcome:
        """Re-read the directory off the event loop and swap in the result."""
        async with self._lock:
            before = self.snapshot
            outcome = await asyncio.to_thread(self._reload_blocking)
        if self._on_reload is not None:
            self._on_reload(outcome.result)
        if self.snapshot is not before:
            for callback in self._subscribers:
                try:
                    callback(self.snapshot)
                except Exception:  # one subscriber's bug must not stop the others
                    log.exception("policy subscriber failed")
        return outcome

    def _reload_blocking(self) -> ReloadOutcome:
        now = self._clock()
        result = load.LoadResult((), (), ()) if self.directory is None else load.load_dir(self.directory)
        previous = self.snapshot.entries
        entries: dict[tuple[str, str, str], snapshot.Entry] = {}
        errors: dict[tuple[str, str, str], str] = {}
        orphans: list[str] = [line for fe in result.file_errors for line in fe.lines()]

        for loaded in result.resources:
            res = loaded.resource
            problems = snapshot.semantic_errors(res, self.floor)
            if res.key in entries:
                problems.append(f"(document): duplicate of {entries[res.key].source}")
            if problems:
                errors[res.key] = f"{loaded.source}: " + "; ".join(problems)
                continue
            entries[res.key] = snapshot.Entry(res, digest.of_resource(res), loaded.source)

        for err in result.errors:
            if err.key is None:
                orphans.extend(err.lines())
            else:
                errors[err.key] = f"{err.source}: {err.summary()}"

        # Last good: a resource whose new version failed keeps its previous version.
        for key in errors:
            if key in previous:
                entries[key] = previous[key]
        # A file that could not be parsed keeps everything it held before; a directory that could
        # not be listed (gone, unreadable) keeps everything: it says nothing about what changed.
        broken_files = {fe.file: fe.message for fe in result.file_errors}
        unlisted = str(self.directory) if str(self.directory) in broken_files else None
        for key, kept in previous.items():
            broken = unlisted or (kept.source.file if kept.source.file in broken_files else None)
            if broken is not None and key not in entries:
                entries[key] = kept
                errors[key] = f"{broken}: {broken_files[broken]}"

        unchanged = {k: e.digest for k, e in entries.items()} == {k: e.digest for k, e in previous.items()}
        if unchanged and self.loaded:
            new = self.snapshot
        else:
            new = snapshot.Snapshot(entries.values(), generation=self.snapshot.generation + 1, now=now)

        warnings: dict[tuple[str, str, str], list[str]] = {}
        for dropped in new.dropped_edges:
            warnings.setdefault(("TrustGraph", "", dropped.graph), []).append(str(dropped))

        status: dict[tuple[str, str, str], _Status] = {}
        for key in set(entries) | set(errors):
            entry: snapshot.Entry | None = entries.get(key)
            old = self._status.get(key)
            loaded_at: dt.datetime | None = now
            if entry is None:
                loaded_at = None
            elif old is not None and old.digest == entry.digest and old.loaded_at is not None:
                loaded_at = old.loaded_at
            status[key] = _Status(
                digest=entry.digest if entry else None,
                loaded_at=loaded_at,
                last_error=errors.get(key),
                source=str(entry.source) if entry else None,
                warnings=tuple(warnings.get(key, ())),
            )

        # The swap: one assignment each, readers see either the old or the new snapshot.
        self.snapshot = new
        self._status = status
        self._orphan_errors = tuple(orphans)
        self.loaded = True
        self.loaded_at = now

        all_errors = tuple(orphans) + tuple(errors.values())
        for line in all_errors:
            log.warning("policy rejected: %s", line)
        if all_errors:
            kind = "error"
        elif unchanged and new.generation > 0:
            kind = "unchanged"
        else:
            kind = "ok"
        return ReloadOutcome(kind, new.generation, all_errors)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload on every change under the directory until ``stop`` is set; resync periodically."""
        if self.directory is None:
            return
        resync = asyncio.create_task(self._resync(stop), name="kars-policy-resync")
        try:
            async for _changes in watchfiles.awatch(
                self.directory,
                stop_event=stop,
                debounce=WATCH_DEBOUNCE_MS,
                recursive=True,
                ignore_permission_denied=True,
            ):
                await self._safe_reload()
        finally:
            resync.cancel()
            await asyncio.gather(resync, return_exceptions=True)

    async def _resync(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=RESYNC_S)
            except TimeoutError:
                await self._safe_reload()

    async def _safe_reload(self) -> None:
        try:
            await self.reload()
        except Exception:  # a reload bug must never take the watcher down
            log.exception("policy reload failed")

    # -- reporting ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The body of ``GET /internal/policy-status`` (SPEC.md §3)."""
        entries = []
        for (kind, namespace, name), st in sorted(self._status.items()):
            item: dict[str, Any] = {
                "kind": kind,
                "namespace": namespace or None,
                "name": name,
                "digest": st.digest,
                "loadedAt": _iso(st.loaded_at) if st.loaded_at else None,
                "lastError": st.last_error,
                "source": st.source,
            }
            if st.warnings:
                item["warnings"] = list(st.warnings)
            entries.append(item)
        snap = self.snapshot
        return {
            "generation": snap.generation,
            "loadedAt": _iso(self.loaded_at) if self.loaded_at else None,
            "directory": str(self.directory) if self.directory else None,
            "kindDigests": dict(snap.kind_digests),
            "errors": list(self._orphan_errors),
            "entries": entries,
        }
