"""``python -m bench controller [--objects 300]``: how fast the controller reacts, against the emulated API server.

Three measurements, all over loopback HTTP against kmock (tests/controller/kubeapi.py), with
the controller started as ``kars controller --api-server URL`` in its own process:

1. N KarsSandboxes created at once: time from each create request to the controller's Pod
   create request for it, as the API server receives it.
2. N InferencePolicies created at once: time from each create to the first ConfigMap write
   that contains it.
3. The same N policies changed at once (``dailyTokens``): time from each patch to the first
   ConfigMap write carrying the new value.
4. One policy changed while the controller is idle, 20 times: the single-change latency.

Prints a Markdown table (p50/p99/max in ms). Bounded: every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import kmock
from kmock._internal import dsl, rendering

from controller import projection
from tests.controller import kubeapi

NS = "bench"
POLICY_NS = "kars-system"
DEADLINE_S = 120.0
GROUP = "/apis/kars.azure.com/v1alpha1"


HISTORY_KEPT = 64
PROFILE_ARGS: list[str] = []


class TimedAPI(kubeapi.KubeAPI):
    """The emulated API server, stamping the arrival of the writes the controller makes.

    kmock keeps every request and re-scans that history on each new request (for its
    request-count filters), which makes it quadratic in the number of requests; the bench
    keeps only the last ``HISTORY_KEPT`` so that what it measures is the controller.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pod_creates: dict[str, float] = {}
        self.configmap_writes: list[tuple[float, dict[str, int]]] = []  # (arrival, {policy: dailyTokens})
        self.watches: set[str] = set()

    async def _handle(self, request: Any) -> Any:
        now = time.monotonic()
        if len(self._requests) > 4 * HISTORY_KEPT:
            del self._requests[:-HISTORY_KEPT]
        res = request.resource
        if res is not None and request.params.get("watch") == "true":
            self.watches.add(str(res.plural))
        if res is not None and isinstance(request.data, dict):
            if res.plural == "pods" and request.method == "POST":
                self.pod_creates.setdefault(request.data["metadata"]["name"], now)
            elif res.plural == "configmaps" and request.method in ("POST", "PATCH"):
                text = (request.data.get("data") or {}).get(projection.file_name("InferencePolicy"))
                items = json.loads(text)["items"] if text else []
                daily = {i["metadata"]["name"]: i["spec"]["tokenBudget"]["dailyTokens"] for i in items}
                self.configmap_writes.append((now, daily))
        return await super()._handle(request)


def _fast_membership() -> None:
    """kmock answers ``request in view`` by re-filtering its whole request history, once per
    reaction per request: quadratic, and it dominated this bench. A request is in a filter
    view iff it passes the filter and is in the view's source, and in a pass-through view iff
    it is in its source; answer that directly (same result, bench process only)."""
    original = dsl.Filter.__contains__

    def filter_contains(self: Any, item: Any) -> bool:
        if isinstance(item, rendering.Request):
            return bool(self.criteria(item)) and item in self._source
        return bool(original(self, item))

    def passthrough_contains(self: Any, item: Any) -> bool:
        if isinstance(item, rendering.Request):
            return item in self._source
        return bool(dsl.View.__contains__(self, item))

    dsl.Filter.__contains__ = filter_contains  # type: ignore[method-assign]
    for cls in (dsl.Priority, dsl.Reaction, dsl.Stream):
        cls.__contains__ = passthrough_contains  # type: ignore[method-assign]


def _cpu(pid: int) -> dict[str, float]:
    """CPU time used so far by the controller process and by this one (the API server + driver)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    controller_s = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {"controller_s": controller_s, "api_s": me.ru_utime + me.ru_stime}


def _quantiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {"n": len(ms), "p50": cuts[49], "p99": cuts[98], "max": ms[-1]}


async def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: gave up waiting for {what}")
        await asyncio.sleep(0.005)


def _policy(name: str, daily: int) -> dict[str, Any]:
    return {
        "apiVersion": "kars.azure.com/v1alpha1",
        "kind": "InferencePolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"tokenBudget": {"hourlyTokens": 100, "dailyTokens": daily}},
    }


def _first_write(api: TimedAPI, after: float, name: str, daily: int) -> float | None:
    """Arrival of the first ConfigMap write after ``after`` that has policy ``name`` at ``daily``."""
    for ts, policies in api.configmap_writes:
        if ts >= after and policies.get(name) == daily:
            return ts
    return None


async def run(objects: int) -> list[tuple[str, dict[str, float]]]:
    rows: list[tuple[str, dict[str, float]]] = []
    _fast_membership()
    async with TimedAPI() as api, kmock.Server(api):
        kubeapi.declare_resources(api)
        # The real command line, in its own process (its own GIL, as in a cluster).
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *PROFILE_ARGS,
            "-m",
            "router.cli",
            "controller",
            "--all-namespaces",
            f"--api-server={api.url}",
            f"--policy-namespace={POLICY_NS}",
            "--log-level=warning",
            stdin=asyncio.subprocess.DEVNULL,
        )
        limits = httpx.Limits(max_connections=64)
        try:
            async with httpx.AsyncClient(base_url=str(api.url), timeout=DEADLINE_S, limits=limits) as http:
                watched = {"pods", *projection.PLURALS.values()}
                await _wait(lambda: watched <= api.watches, "the controller's watches")

                # 1. sandboxes created at once -> pod create requests
                sent: dict[str, float] = {}

                async def create_sandbox(i: int) -> None:
                    name = f"sb-{i}"
                    body = {
                        "apiVersion": "kars.azure.com/v1alpha1",
                        "kind": "KarsSandbox",
                        "metadata": {"name": name, "namespace": NS},
                        "spec": {"image": "agent:1"},
                    }
                    sent[name] = time.monotonic()
                    (await http.post(f"{GROUP}/namespaces/{NS}/karssandboxes", json=body)).raise_for_status()

                await asyncio.gather(*(create_sandbox(i) for i in range(objects)))
                await _wait(lambda: len(api.pod_creates) >= objects, "every pod")
                rows.append(
                    (
                        f"{objects} KarsSandbox created at once -> Pod create",
                        _quantiles([api.pod_creates[n] - t for n, t in sent.items()]),
                    )
                )

                # 2. policies created at once -> in a ConfigMap write
                created: dict[str, float] = {}

                async def create_policy(i: int) -> None:
                    name = f"p-{i}"
                    created[name] = time.monotonic()
                    r = await http.post(f"{GROUP}/namespaces/{NS}/inferencepolicies", json=_policy(name, 1000))
                    r.raise_for_status()

                await asyncio.gather(*(create_policy(i) for i in range(objects)))
                await _wait(lambda: _first_write(api, created[f"p-{objects - 1}"], f"p-{objects - 1}", 1000), "cm")
                await _wait(lambda: all(_first_write(api, t, n, 1000) for n, t in created.items()), "all created")
                rows.append(
                    (
                        f"{objects} InferencePolicy created at once -> ConfigMap",
                        _quantiles(
                            [_first_write(api, t, n, 1000) - t for n, t in created.items()]  # type: ignore[operator]
                        ),
                    )
                )

                # 3. the same policies changed at once -> ConfigMap carries the change
                changed: dict[str, float] = {}
                merge = {"Content-Type": "application/merge-patch+json"}

                async def change(i: int) -> None:
                    name = f"p-{i}"
                    changed[name] = time.monotonic()
                    patch = {"spec": {"tokenBudget": {"dailyTokens": 2000}}}
                    r = await http.patch(f"{GROUP}/namespaces/{NS}/inferencepolicies/{name}", json=patch, headers=merge)
                    r.raise_for_status()

                writes_before = len(api.configmap_writes)
                await asyncio.gather(*(change(i) for i in range(objects)))
                await _wait(lambda: all(_first_write(api, t, n, 2000) for n, t in changed.items()), "all changed")
                writes = len(api.configmap_writes) - writes_before
                rows.append(
                    (
                        f"{objects} InferencePolicy changed at once -> ConfigMap",
                        _quantiles(
                            [_first_write(api, t, n, 2000) - t for n, t in changed.items()]  # type: ignore[operator]
                        ),
                    )
                )

                # 4. one change at a time, controller idle
                singles: list[float] = []
                for k in range(20):
                    await asyncio.sleep(0.05)
                    t0 = time.monotonic()
                    patch = {"spec": {"tokenBudget": {"dailyTokens": 3000 + k}}}
                    r = await http.patch(f"{GROUP}/namespaces/{NS}/inferencepolicies/p-0", json=patch, headers=merge)
                    r.raise_for_status()
                    await _wait(lambda t0=t0, k=k: _first_write(api, t0, "p-0", 3000 + k), "the single change")
                    singles.append(_first_write(api, t0, "p-0", 3000 + k) - t0)  # type: ignore[operator]
                rows.append(("1 InferencePolicy changed, controller idle -> ConfigMap", _quantiles(singles)))
            rows.append(("CPU seconds: controller process / emulated API server + driver", _cpu(proc.pid)))
            rows.append((f"ConfigMap writes for the {objects} changes", {"writes": float(writes)}))
        finally:
            proc.terminate()  # SIGTERM: kopf stops gracefully
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench controller", description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=300)
    args = p.parse_args(argv)
    rows = asyncio.run(run(args.objects))
    print("| what | n | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for what, q in rows:
        if "controller_s" in q:
            print(f"\n{what}: {q['controller_s']:.1f} / {q['api_s']:.1f}")
            continue
        if "writes" in q:
            print(f"{what}: {q['writes']:.0f}")
            continue
        print(f"| {what} | {q['n']:.0f} | {q['p50']:.1f} | {q['p99']:.1f} | {q['max']:.1f} |")
    return 0
