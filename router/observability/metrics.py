"""The router's Prometheus metrics, on a registry owned by one app (so tests can run many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kars_requests",
            "Requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "kars_request_duration_seconds",
            "Time from request start to the last response byte.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge("kars_requests_in_flight", "Requests being served now.", registry=r)
        self.identity_rejections = Counter(
            "kars_identity_rejections",
            "Requests refused by the identity layer, by error code.",
            ["code"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "kars_policy_reloads",
            "Policy reloads, by result (ok, unchanged, error).",
            ["result"],
            registry=r,
        )
        self.policy_generation = Gauge(
            "kars_policy_generation",
            "Generation of the policy snapshot in force.",
            registry=r,
        )
        # Foundry inference transport (router/transports/foundry.py).
        self.tokens = Counter(
            "kars_tokens",
            "Tokens reported by the upstream, by direction (prompt, completion) and deployment.",
            ["direction", "deployment"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "kars_upstream_duration_seconds",
            "Time from sending a request upstream to its response headers, by upstream.",
            ["upstream"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.upstream_errors = Counter(
            "kars_upstream_errors",
            "Upstream failures, by upstream and error code (including 429/5xx replies, as status_NNN).",
            ["upstream", "code"],
            registry=r,
        )
        # -- A2A, TrustGraph, mesh (issue 7) --
        self.trust_admissions = Counter(
            "kars_trust_admissions",
            "TrustGraph admission decisions on /a2a and /mesh, by result (admitted, denied).",
            ["result"],
            registry=r,
        )
        self.mesh_bridges_active = Gauge("kars_mesh_bridges_active", "Mesh bridges open now.", registry=r)
        self.mesh_bridges = Counter(
            "kars_mesh_bridges",
            "Mesh connections by outcome (paired, relayed, pair_timeout, conflict, closed_by_policy).",
            ["outcome"],
            registry=r,
        )
        self.mesh_bytes = Counter("kars_mesh_bytes", "Payload bytes relayed by mesh bridges.", registry=r)
        self.a2a_card_verifications = Counter(
            "kars_a2a_card_verifications",
            "Signed agent card verifications, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.signed_request_rejections = Counter(
            "kars_signed_request_rejections",
            "Signed A2A requests refused (401), by reason.",
            ["reason"],
            registry=r,
        )
        # Token budgets (router/middleware/token_budget.py); window "request" is perRequestTokens.
        self.budget_tokens_reserved = Counter(
            "kars_budget_tokens_reserved",
            "Tokens reserved against budget counters before forwarding, by scope and window.",
            ["scope", "window"],
            registry=r,
        )
        self.budget_tokens_settled = Counter(
            "kars_budget_tokens_settled",
            "Tokens charged to budget counters after the response (actual usage), by scope and window.",
            ["scope", "window"],
            registry=r,
        )
        self.budget_tokens_rejected = Counter(
            "kars_budget_tokens_rejected",
            "Tokens of requests refused with 429, by the scope and window that refused them.",
            ["scope", "window"],
            registry=r,
        )
        self.budget_over_limit_allowed = Counter(
            "kars_budget_over_limit_allowed",
            "Requests forwarded past a full budget because its policy has rejectOnExceed: false.",
            ["scope", "window"],
            registry=r,
        )
        self.budget_rejections = Counter(
            "kars_budget_rejections",
            "Requests refused by token budgets, by error code.",
            ["code"],
            registry=r,
        )
        self.budget_store_errors = Counter(
            "kars_budget_store_errors",
            "Budget store operations that failed (store unreachable), by operation.",
            ["operation"],
            registry=r,
        )
        # Content safety (router/middleware/content_safety.py, router/safety).
        self.safety_blocks = Counter(
            "kars_safety_blocks",
            "Prompts and outputs blocked by content safety, by category, provider (foundry, content_safety, "
            "local) and stage (prompt, output).",
            ["category", "provider", "stage"],
            registry=r,
        )
        self.safety_unavailable = Counter(
            "kars_safety_unavailable",
            "Content-safety checks a provider could not answer, by provider and outcome (fail_open, fail_closed).",
            ["provider", "outcome"],
            registry=r,
        )
        # MCP gateway (router/transports/mcp).
        self.mcp_tool_calls = Counter(
            "kars_mcp_tool_calls",
            "MCP tools/call requests, by server (ns/name), tool, decision (allow, deny, rate_limited) and outcome.",
            ["server", "tool", "decision", "outcome"],
            registry=r,
        )
        self.mcp_tool_call_latency = Histogram(
            "kars_mcp_tool_call_duration_seconds",
            "Time from a tools/call reaching the router to its response, by server and tool.",
            ["server", "tool"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.mcp_sessions = Gauge(
            "kars_mcp_sessions",
            "MCP client sessions open, by client transport (streamable, sse).",
            ["transport"],
            registry=r,
        )
