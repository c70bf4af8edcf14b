"""The inference hot path: the kars router against a bare pass-through and LiteLLM, in one run.

``python -m bench inference [--seconds N] [--rate R] [--rounds N] [--layers] [--no-litellm]``. Non-streaming ~1 KB chat
completions through (a) the fake upstream directly, (b) a bare pass-through on aiohttp (the
router's client library) and, for the record, on httpx's default transport, (c) ``kars router``
with its default stack (identity with a router token, token budget on SQLite, whatever else
``build_app`` wires; the table says which layers), (d) LiteLLM proxy, one worker, in its own venv
under ``.bench/`` (created on first use). Each server runs pinned to core 0; the fake upstream
and the load generators (wrk, and ``bench._rate`` for fixed-rate latency and time to first chunk)
run on core 1. Everything is loopback and bounded in time. Every server stays up for the whole
run, and each measurement is taken ``--rounds`` times with the servers interleaved in each round;
the table shows medians (and, for added latency, each round's value): on this shared machine one
run of one server says little.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench import _load

LITELLM_VENV = _load.ROOT / ".bench" / "litellm"
LITELLM_START_S = 120.0
AZURE_PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
SANDBOX = "bench/agent"
POLICY = """\
apiVersion: kars.azure.com/v1alpha1
kind: InferencePolicy
metadata: {name: bench, namespace: bench}
spec:
  appliesTo: {action: "*"}
  tokenBudget: {perRequestTokens: 100000, dailyTokens: 1000000000000}
"""


LAYER_VARIANTS = (
    ("ALL", "(c0) router: Starlette + Foundry transport, no middleware"),
    (
        "JwsMiddleware,TrustGraphMiddleware,TokenBudgetMiddleware,ContentSafetyMiddleware",
        "(c1) (c0) + observe, errors, body limit, identity",
    ),
    ("ContentSafetyMiddleware", "(c2) (c1) + jws, trust graph, token budget"),
)


def write_router_files(work: Path) -> None:
    """The policy directory and the upstream key file the router gets on the inference benches."""
    (work / "policy").mkdir()
    (work / "policy" / "bench.yaml").write_text(POLICY)
    (work / "foundry-key").write_text("bench-key")


def request_body(*, stream: bool) -> bytes:
    """A ~1 KB chat request (what an agent sends with a short system prompt and a question)."""
    doc: dict[str, object] = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a careful assistant for a Kubernetes platform team. " * 6},
            {"role": "user", "content": "Summarise the failure modes of a rolling update in a few lines. " * 6},
        ],
        "max_tokens": 256,
    }
    if stream:
        doc["stream"] = True
    return json.dumps(doc).encode()


@dataclasses.dataclass
class Row:
    name: str
    pid: int = 0
    url: str = ""
    headers: list[str] = dataclasses.field(default_factory=list)
    stream: bool = False  # also measure time to first chunk
    cpu_us: float = 0.0  # server CPU time per request during the saturation run (robust to a busy machine)
    saturation: _load.WrkResult | None = None
    fixed_runs: list[dict[str, float]] = dataclasses.field(default_factory=list)  # one per round
    ttfc_runs: list[dict[str, float]] = dataclasses.field(default_factory=list)

    @property
    def fixed(self) -> dict[str, float] | None:
        return _median(self.fixed_runs)

    @property
    def ttfc(self) -> dict[str, float] | None:
        return _median(self.ttfc_runs)


def _median(runs: list[dict[str, float]]) -> dict[str, float] | None:
    """Each percentile's median over the rounds; errors summed."""
    if not runs:
        return None
    out = {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms")}
    out["errors"] = sum(r.get("errors", 0) for r in runs)
    return out


def _uvicorn(module: str, port: int) -> list[str]:
    argv = [sys.executable, "-m", "uvicorn", module, "--port", str(port), "--loop", "uvloop", "--http", "httptools"]
    return [*argv, "--no-access-log", "--log-level", "warning", "--workers", "1"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants (Linux /proc), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / tick
        todo.extend(children.get(p, []))
    return total


@contextlib.contextmanager
def _server(
    core: str, argv: list[str], ready: str, env: dict[str, str], cwd: Path, wait_s: float = _load.READY_TIMEOUT_S
) -> Iterator[int]:
    with _load.process(_load.pinned(core, argv), ready_url=ready, env=env, cwd=cwd, ready_timeout_s=wait_s) as proc:
        yield proc.pid


def _rate(mode: str, url: str, body: Path, headers: list[str], args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, "-m", "bench._rate", mode, url, "--body", str(body)]
    argv += ["--rate", str(args.rate), "--seconds", str(args.seconds), "--count", str(args.ttfc_count)]
    for h in headers:
        argv += ["--header", h]
    out = subprocess.run(
        _load.pinned(_load.LOAD_CORE, argv), capture_output=True, text=True, timeout=120, cwd=_load.ROOT
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result: dict[str, float] = json.loads(out.stdout)
    return result


def _ensure_litellm() -> Path | None:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print("creating .bench/litellm (pip install 'litellm[proxy]', a few minutes) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"]
    done = subprocess.run(pip, timeout=1800)
    return exe if done.returncode == 0 and exe.exists() else None


def _router_layers(env: dict[str, str], work: Path) -> list[str]:
    probe = (
        "from router import settings; from router.app import build_app; import os; "
        "app = build_app(settings.load()); print(','.join(m.cls.__name__ for m in app.user_middleware))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, **env}, cwd=work, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().split(",")


def saturate(rows: list[Row], lua: Path, args: argparse.Namespace) -> None:
    """Requests/s under wrk (32 connections) and each server's CPU per request meanwhile: the median
    of ``--rounds`` runs, the rows interleaved in each round (this machine's speed drifts)."""
    runs: dict[str, list[tuple[_load.WrkResult, float]]] = {row.name: [] for row in rows}
    for _ in range(args.rounds):
        for row in rows:
            before = cpu_seconds(row.pid) if row.pid else 0.0
            result = _load.wrk(row.url, seconds=args.seconds, headers=row.headers, script=lua)
            cpu_us = 0.0
            if row.pid:
                cpu_us = (cpu_seconds(row.pid) - before) / (max(result.requests_per_s, 1e-9) * args.seconds) * 1e6
            runs[row.name].append((result, cpu_us))
    for row in rows:
        by_rate = sorted(runs[row.name], key=lambda r: r[0].requests_per_s)
        row.saturation = by_rate[len(by_rate) // 2][0]  # the median run, whole (its latency and failures)
        row.cpu_us = statistics.median(cpu for _, cpu in runs[row.name])


def latency_rounds(rows: list[Row], body: Path, stream_body: Path, args: argparse.Namespace) -> None:
    """Fixed-rate latency and time to first chunk, ``--rounds`` times, the rows interleaved in each
    round: this machine's speed drifts over minutes, so each round compares the rows at one time
    (a row that cannot hold the rate is left out: its queue would grow for the whole run)."""
    for _ in range(args.rounds):
        for row in rows:
            if row.saturation is not None and row.saturation.requests_per_s >= args.rate * 1.2:
                row.fixed_runs.append(_rate("fixed", row.url, body, row.headers, args))
            if row.stream:
                row.ttfc_runs.append(_rate("ttfc", row.url, stream_body, row.headers, args))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench inference")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement (medians)")
    parser.add_argument("--ttfc-count", type=int, default=200)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--layers", action="store_true", help="also price each router layer (c0, c1, c2)")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    layers: list[str] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        work = Path(tmp)
        body, stream_body = work / "body.json", work / "stream.json"
        body.write_bytes(request_body(stream=False))
        stream_body.write_bytes(request_body(stream=True))
        lua = work / "post.lua"
        payload = json.dumps(body.read_text())
        lua.write_text(f'wrk.method = "POST"\nwrk.body = {payload}\nwrk.headers["Content-Type"] = "application/json"\n')
        up_port = _load.free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        env = {"PYTHONPATH": str(_load.ROOT)}
        servers.enter_context(
            _server(_load.LOAD_CORE, _uvicorn("bench._upstream:app", up_port), upstream + "/", env, _load.ROOT)
        )
        rows.append(Row("(a) direct to the fake upstream", 0, upstream + AZURE_PATH, stream=True))

        # Every server stays up (idle when not measured) so the latency rounds can interleave them.
        for client, label in (
            ("aiohttp", "(b) bare pass-through, aiohttp"),
            ("httpx", "(b') bare pass-through, httpx"),
        ):
            port = _load.free_port()
            penv = {**env, "BENCH_UPSTREAM": upstream, "BENCH_CLIENT": client}
            url = f"http://127.0.0.1:{port}"
            pid = servers.enter_context(
                _server(_load.SERVER_CORE, _uvicorn("bench._passthrough:app", port), url + "/", penv, _load.ROOT)
            )
            rows.append(Row(label, pid, url + AZURE_PATH, stream=client == "aiohttp"))

        write_router_files(work)
        renv = {
            "KARS_FOUNDRY_ENDPOINT": upstream,
            "KARS_FOUNDRY_API_KEY_FILE": str(work / "foundry-key"),
            "KARS_BUDGETS_SQLITE_PATH": str(work / "budgets.db"),
        }
        layers = _router_layers(renv, work)
        token = subprocess.run(
            [sys.executable, "-m", "router", "token", "issue", "--sandbox", SANDBOX, "--ttl", "1h"],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        auth = [f"Authorization: Bearer {token}"]
        port = _load.free_port()
        rargv = [sys.executable, "-m", "router", "router", "--policy-dir", str(work / "policy"), "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        pid = servers.enter_context(_server(_load.SERVER_CORE, rargv, url + "/healthz", renv, work))
        rows.append(Row("(c) kars router", pid, url + AZURE_PATH, auth, stream=True))
        if args.layers:
            # The same router with layers left out: what each one costs.
            for i, (drop, label) in enumerate(LAYER_VARIANTS):
                port = _load.free_port()
                vargv = [sys.executable, "-m", "bench._router_variant", str(port)]
                venv = {**renv, "BENCH_DROP": drop, "KARS_POLICY_DIR": str(work / "policy"), **env}
                venv["KARS_BUDGETS_SQLITE_PATH"] = str(work / f"budgets-{i}.db")  # one owner per file
                url = f"http://127.0.0.1:{port}"
                pid = servers.enter_context(_server(_load.SERVER_CORE, vargv, url + "/healthz", venv, work))
                rows.append(Row(label, pid, url + AZURE_PATH, auth))

        saturate(rows, lua, args)
        latency_rounds(rows, body, stream_body, args)

        exe = None if args.no_litellm else _ensure_litellm()
        if exe is not None:
            cfg = work / "litellm.yaml"
            cfg.write_text(
                "model_list:\n  - model_name: gpt-4o\n    litellm_params:\n      model: azure/gpt-4o\n"
                f"      api_base: {upstream}\n      api_key: bench-key\n      api_version: '2024-10-21'\n"
            )
            port = _load.free_port()
            master = "sk-bench-" + secrets.token_hex(16)  # LiteLLM refuses to start without one
            lenv = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
            lenv["LITELLM_MASTER_KEY"] = master
            largv = [str(exe), "--config", str(cfg), "--port", str(port), "--num_workers", "1"]
            url = f"http://127.0.0.1:{port}"
            # LiteLLM's imports are slow: a longer wait for it to answer.
            with _server(_load.SERVER_CORE, largv, url + "/health/liveliness", lenv, work, LITELLM_START_S) as pid:
                row = Row("(d) LiteLLM proxy", pid, url + "/chat/completions", [f"Authorization: Bearer {master}"])
                row.stream = True
                saturate([row], lua, args)
                latency_rounds([row], body, stream_body, args)
                rows.append(row)

    print(report(rows, layers, args))
    print(
        f"\nload average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    return 0


def _added(row: Row, direct: Row, key: str) -> str:
    """Median of the per-round differences to (a), and each round's: ``0.71 (0.65, 0.71, 0.90)``."""
    runs = row.fixed_runs if key == "fixed" else row.ttfc_runs
    base = direct.fixed_runs if key == "fixed" else direct.ttfc_runs
    if not runs or len(runs) != len(base):
        return "-"
    diffs = [r["p50_ms"] - d["p50_ms"] for r, d in zip(runs, base, strict=True)]
    each = ", ".join(f"{x:.2f}" for x in diffs)
    return f"{statistics.median(diffs):.2f}" + (f" ({each})" if len(diffs) > 1 else "")


def report(rows: list[Row], layers: list[str], args: argparse.Namespace) -> str:
    by = {r.name[:3]: r for r in rows}
    base = by["(b)"].saturation
    direct = by["(a)"]
    lines = [
        f"kars router middleware (outermost first): {', '.join(layers)}",
        "",
        f"| what | requests/s (32 conns) | vs (b) | p50 / p99 ms at {args.rate:.0f} req/s | added p50 ms (rounds) | "
        "first chunk p50 / p99 ms | added first-chunk p50 ms (rounds) | server CPU us/request | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, f, t = r.saturation, r.fixed, r.ttfc
        assert s is not None and base is not None
        fixed = f"{f['p50_ms']:.2f} / {f['p99_ms']:.2f}" if f else f"cannot hold {args.rate:.0f} req/s"
        ttfc = f"{t['p50_ms']:.2f} / {t['p99_ms']:.2f}" if t else "-"
        fails = s.non_2xx + s.errors + int(f["errors"] if f else 0) + int(t["errors"] if t else 0)
        lines.append(
            f"| {r.name} | {s.requests_per_s:,.0f} | {s.requests_per_s / base.requests_per_s:.2f}x | "
            f"{fixed} | {_added(r, direct, 'fixed')} | {ttfc} | {_added(r, direct, 'ttfc')} | "
            f"{f'{r.cpu_us:.0f}' if r.pid else '-'} | {fails} |"
        )
    if "(c)" in by and "(d)" in by:
        c, d = by["(c)"].saturation, by["(d)"].saturation
        assert c is not None and d is not None
        lines.append(f"\n(c) / (d) requests/s: {c.requests_per_s / d.requests_per_s:.1f}x")
    lines.append(
        f"\nEach cell: the median of {args.rounds} interleaved rounds; added = the row minus (a) in the same round."
    )
    return "\n".join(lines)
