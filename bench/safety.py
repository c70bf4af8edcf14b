"""The local content-safety floor's cost: router requests/s with it on vs off, 1 KB and 32 KB prompts.

``python -m bench safety [--seconds N]``. ``kars router`` (one worker, uvloop + httptools) runs
pinned to core 0 in front of a minimal fake Foundry (a fixed ~1 KB chat completion); the fake and
wrk (32 connections, non-streaming chat completions with a router token) share core 1. "off" is
``safety.localFloor: {promptInjection: false, blocklists: []}`` (the content-safety layer still runs:
it parses the reply for Foundry's annotations); "on" is the built-in injection patterns plus
``BLOCKLIST_TERMS`` terms and ``BLOCKLIST_REGEXES`` regexes, all compiled into RE2 sets. No Content
Safety endpoint: this measures the router alone. Prompts never trip the floor (every answer is a
200, counted in the table). The last column ("floor check") is the floor's own cost per prompt, measured in
process (best of five runs), which stays readable when other load makes requests/s noisy.
Loopback only; every run bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench import _load

PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
SANDBOX = "bench/agent"
BLOCKLIST_TERMS = 200
BLOCKLIST_REGEXES = 10
SIZES_BYTES = (1024, 32 * 1024)

UPSTREAM = """
import json
TEXT = "The quick brown fox jumps over the lazy dog. " * 12
FILTER = {k: {"filtered": False, "severity": "safe"} for k in ("hate", "self_harm", "sexual", "violence")}
BODY = json.dumps({
    "choices": [{"content_filter_results": FILTER, "finish_reason": "stop", "index": 0,
                 "message": {"content": TEXT, "role": "assistant"}}],
    "created": 1700000000, "id": "chatcmpl-bench", "model": "gpt-4o", "object": "chat.completion",
    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTER}],
    "usage": {"prompt_tokens": 240, "completion_tokens": 120, "total_tokens": 360},
}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"]
            await send({"type": kind + ".complete"})
            if kind == "lifespan.shutdown":
                return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
"""


def prompt_body(size: int) -> bytes:
    """A chat request of about ``size`` bytes: a system prompt and a long user question (benign)."""
    sentence = "Summarise the failure modes of a rolling update and how to detect each one early. "
    user = (sentence * (size // len(sentence) + 1))[: max(0, size - 200)]
    doc = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a careful assistant for a platform team."},
            {"role": "user", "content": user},
        ],
        "max_tokens": 256,
    }
    return json.dumps(doc).encode()


def floor(on: bool) -> dict[str, Any]:
    if not on:
        return {"promptInjection": False, "blocklists": []}
    terms = [f"codename-{i:04d}" for i in range(BLOCKLIST_TERMS)]
    regexes = [rf"\bsecret-{i}-[0-9a-f]{{32}}\b" for i in range(BLOCKLIST_REGEXES)]
    return {"promptInjection": True, "blocklists": [{"name": "bench", "terms": terms, "regexes": regexes}]}


@contextlib.contextmanager
def router(work: Path, upstream: str, *, on: bool) -> Iterator[tuple[str, str]]:
    """A pinned ``kars router`` with the local floor on or off; yields (base URL, bearer token)."""
    config = work / f"config-{'on' if on else 'off'}.yaml"
    tree = {
        "foundry": {"endpoint": upstream, "credential": "none"},
        "budgets": {"store": "memory"},
        "log": {"access": False, "level": "warning"},
        "identity": {"devKeyFile": str(work / "dev-key.pem")},
        "safety": {"localFloor": floor(on)},
    }
    config.write_text(yaml.safe_dump(tree))
    policy = work / "policy"
    policy.mkdir(exist_ok=True)
    port = _load.free_port()
    argv = [sys.executable, "-m", "router", "router", "--config", str(config), "--policy-dir", str(policy)]
    argv += ["--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    env = {"PYTHONPATH": str(_load.ROOT)}  # this checkout's router, whatever the venv has installed
    with _load.process(_load.pinned(_load.SERVER_CORE, argv), ready_url=f"{url}/readyz", env=env, cwd=work):
        token = subprocess.run(
            [sys.executable, "-m", "router", "token", "issue", "--sandbox", SANDBOX, "--config", str(config)],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
        ).stdout.strip()
        yield url, token


def scan_cost_us(size: int, *, repeats: int = 5, n: int = 300) -> float:
    """In-process time of one prompt check by the local floor (gathering the text and scanning it);
    the best of ``repeats`` runs, which is robust to other load on the machine."""
    from router import settings
    from router.safety import local, texts

    provider = local.LocalProvider(settings.LocalFloor.model_validate(floor(True)))
    doc = json.loads(prompt_body(size))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(n):
            provider.scan_prompt(texts.prompt_of("chat", doc))
        best = min(best, (time.perf_counter() - started) / n)
    return best * 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench safety")
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args(argv)
    results: dict[tuple[int, bool], _load.WrkResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "bench_upstream.py").write_text(UPSTREAM)
        scripts = {}
        for size in SIZES_BYTES:
            body = prompt_body(size)
            lua = work / f"post-{size}.lua"
            lua.write_text(
                f'wrk.method = "POST"\nwrk.body = {json.dumps(body.decode())}\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
            scripts[size] = lua
        port = _load.free_port()
        upstream_argv = [sys.executable, "-m", "uvicorn", "bench_upstream:app", "--port", str(port)]
        upstream_argv += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
        upstream = f"http://127.0.0.1:{port}"
        with _load.process(_load.pinned(_load.LOAD_CORE, upstream_argv), ready_url=upstream + "/", cwd=work):
            for on in (False, True):
                with router(work, upstream, on=on) as (url, token):
                    for size in SIZES_BYTES:
                        results[(size, on)] = _load.wrk(
                            url + PATH,
                            seconds=args.seconds,
                            headers=(f"Authorization: Bearer {token}",),
                            script=scripts[size],
                        )
    print("| prompt | local floor | requests/s | vs off | p50 ms | p99 ms | non-2xx + errors | floor check |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size in SIZES_BYTES:
        base = results[(size, False)].requests_per_s
        for on in (False, True):
            r = results[(size, on)]
            cost = f"{scan_cost_us(size):.0f} us" if on else "-"
            print(
                f"| {size // 1024} KB | {'on' if on else 'off'} | {r.requests_per_s:,.0f} | "
                f"{r.requests_per_s / base:.2f}x | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.non_2xx + r.errors} | {cost} |"
            )
    return 0
