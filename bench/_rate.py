"""Open-loop load at a fixed rate, and time-to-first-chunk of streams: latency percentiles as JSON.

``python -m bench._rate fixed URL --rate 500 --seconds 8 --body FILE [--header K:V]``: request i is
due at ``start + i / rate`` whatever happened before (no coordinated omission); its latency is
counted from when it was due to its last byte. ``python -m bench._rate ttfc URL --count 200 ...``:
one stream at a time, time from sending to the first SSE event. Runs pinned to the load core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import aiohttp

GRACE_S = 10.0  # after the last request was due


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples.sort()
    if not samples:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": statistics.median(samples) * 1000, "p99_ms": q[98] * 1000}


async def fixed(url: str, rate: float, seconds: float, body: bytes, headers: dict[str, str]) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

        async def one(due: float) -> None:
            nonlocal errors
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append(time.perf_counter() - due)

        for _ in range(50):  # warm the pool and the server
            await one(time.perf_counter())
        latencies.clear()
        tasks = []
        start = time.perf_counter() + 0.05
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        # A server that cannot keep up leaves requests queued: those past the grace period count as errors.
        _, late = await asyncio.wait(tasks, timeout=GRACE_S)
        for task in late:
            task.cancel()
        errors += len(late)
    return {**_percentiles(latencies), "errors": errors, "sent": total}


async def ttfc(url: str, count: int, body: bytes, headers: dict[str, str]) -> dict[str, float]:
    samples: list[float] = []
    errors = 0
    async with aiohttp.ClientSession() as session:
        for i in range(count + 20):
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                first = await resp.content.readany()
                took = time.perf_counter() - started
                await resp.read()
            if resp.status != 200 or not first.startswith(b"data:"):
                errors += 1
            elif i >= 20:  # the first ones warm up
                samples.append(took)
    return {**_percentiles(samples), "errors": errors, "sent": count}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._rate")
    parser.add_argument("mode", choices=["fixed", "ttfc"])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--body", required=True)
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args(argv)
    with open(args.body, "rb") as fh:
        body = fh.read()
    headers = {"content-type": "application/json"}
    headers.update(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    if args.mode == "fixed":
        result = asyncio.run(fixed(args.url, args.rate, args.seconds, body, headers))
    else:
        result = asyncio.run(ttfc(args.url, args.count, body, headers))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
