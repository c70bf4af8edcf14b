"""charts/kars rendered by Helm's own engine (libhelm via helm-python-sdk, no helm binary), then checked:
valid YAML without duplicate keys, valid Kubernetes objects, values against values.schema.json,
least-privilege RBAC, and a router config the router itself accepts."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller import crds
from router import settings as router_settings
from router.policy import model

CHART = Path(__file__).resolve().parents[2] / "charts" / "kars"
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "kars-system"


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dupes)}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def render(values: dict[str, Any] | None = None, *, release: str = "kars") -> list[dict[str, Any]]:
    manifests = helm.Chart.load(CHART).render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in manifests.items():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.load_all(text, Loader=_StrictLoader):  # a SafeLoader subclass
            if doc:
                docs.append(doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def _schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded


VARIANTS = {
    "defaults": {},
    "namespaced-monitored": {
        "controller": {"namespaces": ["team-a", "team-b"], "seccompProfile": "profiles/kars.json"},
        "serviceMonitor": {"enabled": True},
        "router": {
            "workloadIdentity": {"clientId": "11111111-2222-3333-4444-555555555555"},
            "foundry": {"endpoint": "https://example.openai.azure.com"},
            "budgets": {"redisUrlSecret": {"name": "redis", "key": "url"}},
            "a2a": {"publicUrls": ["https://agents.example.com/"]},
        },
    },
    "api-key-sqlite": {
        "router": {"replicas": 1, "foundry": {"apiKeySecret": "foundry-key"}, "budgets": {"store": "sqlite"}}
    },
}


def test_default_values_validate_against_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(_schema())
    jsonschema.validate(_values(), _schema(), cls=jsonschema.Draft7Validator)
    helm.Chart.load(CHART).validate_schema({})


@pytest.mark.parametrize(
    "bad",
    [
        {"router": {"replicas": 0}},
        {"router": {"budgets": {"store": "etcd"}}},
        {"router": {"safety": {"floor": {"hate": "Extreme"}}}},
        {"controller": {"typo": 1}},
        {"router": {"foundry": {"endpoint": "not a url"}}},
        {"router": {"budgets": {"store": "sqlite"}}},  # two replicas would not share per-pod counters
        {"router": {"budgets": {"store": "memory"}, "replicas": 3}},
        {"router": {"a2a": {"publicUrls": ["agents.example.com"]}}},
        {"router": {"podDisruptionBudget": {"maxUnavailable": 0}}},  # would block every node drain
        {"router": {"podDisruptionBudget": {"maxUnavailable": "0%"}}},
    ],
)
def test_bad_values_are_refused_by_the_schema(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError):
        helm.Chart.load(CHART).render(bad, name="kars", namespace=NAMESPACE)


def test_a_redis_store_with_no_redis_is_refused() -> None:
    """redis.deploy false and no URL or Secret would render a router pointed at a Redis that is not there."""
    with pytest.raises(helm.HelmError, match="but no Redis is named"):
        helm.Chart.load(CHART).render({"redis": {"deploy": False}}, name="kars", namespace=NAMESPACE)
    for fine in (
        {"redis": {"deploy": False}, "router": {"budgets": {"redisUrlSecret": {"name": "redis"}}}},
        {"redis": {"deploy": False}, "router": {"replicas": 1, "budgets": {"store": "sqlite"}}},
    ):
        assert not [d for d in render(fine) if "redis" in d["metadata"]["name"]], fine


PROXIES = ["10.0.0.0/8", "10.0.0.1", "::1/128", "fd00::/8", "2001:db8::1", "::", "::ffff:10.0.0.0/104"]
PROXIES += ["1:2:3:4:5:6:7:8/64", "1.2.3.4/33", "256.0.0.0/8", "not-a-cidr", "10.0.0.0/8 ", "fe80::1::2"]
PROXIES += ["1:2:3:4:5:6:7:8:9", "", "10.0.0/8", "2001:db8::/129", "10.0.0.0/8,10.1.0.0/16"]


def test_trusted_proxies_are_addresses_or_cidrs_the_router_takes() -> None:
    """A value the router refuses would render, then crash-loop every router pod."""
    items = _schema()["properties"]["router"]["properties"]["identity"]["properties"]["trustedProxies"]["items"]
    for proxy in PROXIES:
        try:
            model.cidr(proxy)
            router_takes = True
        except ValueError:
            router_takes = False
        schema_takes = jsonschema.Draft7Validator(items).is_valid(proxy)
        assert schema_takes == router_takes, proxy
    with pytest.raises(helm.HelmError, match="trustedProxies"):
        render({"router": {"identity": {"trustedProxies": ["not-a-cidr"]}}})
    (cm,) = [
        d
        for d in by_kind(render({"router": {"identity": {"trustedProxies": ["10.0.0.0/8", "fd00::/8"]}}}), "ConfigMap")
        if d["metadata"]["name"] == "kars-router-config"
    ]
    assert yaml.safe_load(cm["data"]["router.yaml"])["identity"]["trustedProxies"] == ["10.0.0.0/8", "fd00::/8"]


def test_lint_is_clean() -> None:
    report = helm.lint(CHART, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_every_rendered_object_is_a_valid_kubernetes_object(variant: str) -> None:
    docs = render(VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount", "ClusterRole", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["kind"] == "ServiceMonitor"  # a CRD of prometheus-operator, not in the core schemas
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_crds_ship_with_the_chart() -> None:
    chart = helm.Chart.load(CHART)
    names = sorted(c["name"] for c in chart.crds)
    assert names == sorted(f"crds/{crds.file_name(k)}" for k in crds.KINDS)


def test_rbac_is_least_privilege() -> None:
    for variant in VARIANTS.values():
        docs = render(variant)
        for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
                assert "*" not in rule.get("apiGroups", []), rule
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
                if "secrets" in rule["resources"]:
                    pytest.fail(f"the controller never reads secrets: {rule}")
    default = render()
    (cluster_role,) = [r for r in by_kind(default, "ClusterRole")]
    pods = [r for r in cluster_role["rules"] if r["resources"] == ["pods"]]
    assert pods and set(pods[0]["verbs"]) == {"get", "list", "watch", "create", "delete"}
    children = [r for r in cluster_role["rules"] if r["resources"] == ["services", "serviceaccounts"]]
    assert children and set(children[0]["verbs"]) == {"get", "create", "patch"}  # read to check the owner
    (policy_role,) = [r for r in by_kind(default, "Role") if r["metadata"]["name"].endswith("-policy")]
    named = [r for r in policy_role["rules"] if r.get("resourceNames")]
    assert named[0]["resourceNames"] == ["kars-policy"]
    # Events about cluster-scoped objects go to the release namespace, whatever namespaces are watched.
    for variant in (default, render(VARIANTS["namespaced-monitored"])):
        (home,) = [r for r in by_kind(variant, "Role") if r["metadata"]["name"].endswith("-policy")]
        assert any("events" in r["resources"] and "create" in r["verbs"] for r in home["rules"])
    # Watching named namespaces: a Role per namespace, no cluster-wide pod rights.
    scoped = render(VARIANTS["namespaced-monitored"])
    assert {r["metadata"]["namespace"] for r in by_kind(scoped, "Role")} == {"team-a", "team-b", NAMESPACE}
    (cluster_role,) = by_kind(scoped, "ClusterRole")
    assert not [r for r in cluster_role["rules"] if "pods" in r["resources"]]


def test_router_config_is_accepted_by_the_router(tmp_path: Path) -> None:
    """The rendered router.yaml plus the Deployment's env, loaded as the router loads them."""
    for name, variant in VARIANTS.items():
        docs = render(variant)
        (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "kars-router-config"]
        (router,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kars-router"]
        env = {
            e["name"]: "redis://from-a-secret:6379"
            for e in router["spec"]["template"]["spec"]["containers"][0].get("env", [])
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(cm["data"]["router.yaml"])
        assert yaml.safe_load(cm["data"]["router.yaml"])["policy"]["dir"] == "/etc/kars/policy"
        # The ConfigMap volume is not here: point policy.dir at a directory that exists.
        parsed = router_settings.load(path, environ=env, overrides={("policy", "dir"): tmp_path})
        assert parsed.identity.audience == "kars-router"
        assert parsed.admin.token_file == Path("/etc/kars/admin/token")
        public_urls = variant.get("router", {}).get("a2a", {}).get("publicUrls", [])
        assert parsed.a2a.public_urls == [u.rstrip("/") for u in public_urls]


def test_a_default_install_brings_the_redis_its_router_names() -> None:
    """The default budget store is redis: the chart deploys one and the router's URL names its Service.
    A URL (or a Secret) of the operator's own, or another store, deploys none."""
    docs = render()
    (redis,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kars-redis"]
    (service,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "kars-redis"]
    assert service["spec"]["selector"] == redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["port"] == 6379
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "kars-router-config"]
    budgets = yaml.safe_load(cm["data"]["router.yaml"])["budgets"]
    assert budgets == {"store": "redis"}  # the URL carries the password: it comes from the Secret, not here
    (router,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kars-router"]
    env = {e["name"]: e for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KARS_BUDGETS_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@kars-redis:6379/0"
    password_ref = {"secretKeyRef": {"name": "kars-redis", "key": "password"}}
    assert env["REDIS_PASSWORD"]["valueFrom"] == password_ref
    assert list(env).index("REDIS_PASSWORD") < list(env).index(
        "KARS_BUDGETS_REDIS_URL"
    )  # $(VAR) sees only earlier ones


def test_the_charts_redis_wants_a_password_and_admits_only_the_router() -> None:
    """Anyone who reaches the budget counters can wipe them (FLUSHALL): Redis requires a password
    from a Secret, and a NetworkPolicy admits only the router pods to its port."""
    docs = render()
    (redis,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kars-redis"]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)" and "--protected-mode" not in args
    (password,) = container["env"]
    assert password["name"] == "REDIS_PASSWORD"
    assert password["valueFrom"] == {"secretKeyRef": {"name": "kars-redis", "key": "password"}}
    (secret,) = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == "kars-redis"]
    assert len(base64.b64decode(secret["data"]["password"])) >= 32
    (policy,) = by_kind(docs, "NetworkPolicy")
    (router,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kars-router"]
    assert policy["spec"]["podSelector"]["matchLabels"] == redis["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source == {"podSelector": {"matchLabels": router["spec"]["selector"]["matchLabels"]}}
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    for own in ({"router": {"budgets": {"redisUrl": "rediss://cache.example:6380/0"}}}, VARIANTS["api-key-sqlite"]):
        assert not by_kind(render(own), "NetworkPolicy"), own
    for own in (
        {"router": {"budgets": {"redisUrl": "rediss://cache.example:6380/0"}}},
        VARIANTS["namespaced-monitored"],  # a Secret names the URL
        VARIANTS["api-key-sqlite"],
        {"redis": {"deploy": False}, "router": {"budgets": {"redisUrl": "rediss://cache.example:6380/0"}}},
    ):
        names = {d["metadata"]["name"] for d in render(own)}
        assert "kars-redis" not in names, own
    (cm,) = [
        d
        for d in by_kind(render({"router": {"budgets": {"redisUrl": "rediss://cache.example:6380/0"}}}), "ConfigMap")
        if d["metadata"]["name"] == "kars-router-config"
    ]
    assert yaml.safe_load(cm["data"]["router.yaml"])["budgets"]["redisUrl"] == "rediss://cache.example:6380/0"


def test_router_deployment_mounts_policy_and_wires_identity() -> None:
    docs = render(VARIANTS["namespaced-monitored"])
    (router,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kars-router"]
    pod = router["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["policy"] == "/etc/kars/policy"
    (policy,) = [v for v in pod["spec"]["volumes"] if v["name"] == "policy"]
    assert policy["configMap"]["name"] == "kars-policy"
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["KARS_BUDGETS_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "url"}
    (sa,) = [d for d in by_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "kars-router"]
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"].startswith("1111")
    (controller,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "kars-controller"]
    args = controller["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--all-namespaces" not in args
    assert "--seccomp-profile=profiles/kars.json" in args
    assert "--token-audience=kars-router" in args  # the audience the router checks (router.identity.audience)
    # Every router replica is asked what it loaded, through a headless Service on the same pods.
    assert f"--router-replicas-url=http://kars-router-replicas.{NAMESPACE}.svc:8443" in args
    (headless,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "kars-router-replicas"]
    (service,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "kars-router"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == service["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    moved = render({"router": {"identity": {"audience": "my-aud"}}})
    (controller,) = [d for d in by_kind(moved, "Deployment") if d["metadata"]["name"] == "kars-controller"]
    assert "--token-audience=my-aud" in controller["spec"]["template"]["spec"]["containers"][0]["args"]
    (cm,) = [d for d in by_kind(moved, "ConfigMap") if d["metadata"]["name"] == "kars-router-config"]
    assert yaml.safe_load(cm["data"]["router.yaml"])["identity"]["audience"] == "my-aud"
    assert by_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["path"] == "/metrics"


def test_a_long_release_name_still_gives_valid_names() -> None:
    """Service names are DNS-1035 labels (at most 63 characters), and the controller must ask
    the headless Service by the name it really has."""
    release = "team-platform-agents-gateway-production-eastus2-01"  # 50 characters, a legal release name
    docs = render(release=release)
    for doc in docs:
        if doc["kind"] in ("Service", "Deployment", "NetworkPolicy", "PodDisruptionBudget"):
            assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    (headless,) = [d for d in by_kind(docs, "Service") if d["spec"].get("clusterIP") == "None"]
    assert headless["metadata"]["name"].endswith("-router-replicas")
    (controller,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-controller")]
    args = controller["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--router-replicas-url=http://{headless['metadata']['name']}.{NAMESPACE}.svc:8443" in args


def _pdb(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    spec: dict[str, Any] = pdb["spec"]
    return spec


def test_the_router_pdb_never_blocks_a_node_drain() -> None:
    """maxUnavailable: 1 keeps all routers but one through a drain and lets a drain evict the only
    one at replicas: 1 (minAvailable: 1 there made every drain wait for ever)."""
    selector = {"matchLabels": {"app.kubernetes.io/name": "kars-router", "app.kubernetes.io/instance": "kars"}}
    assert _pdb(render()) == {"maxUnavailable": 1, "selector": selector}
    assert _pdb(render(VARIANTS["api-key-sqlite"])) == {"maxUnavailable": 1, "selector": selector}  # replicas: 1
    assert _pdb(render({"router": {"podDisruptionBudget": {"minAvailable": 1}}})) == {
        "minAvailable": 1,
        "selector": selector,
    }
    assert _pdb(render({"router": {"podDisruptionBudget": {"minAvailable": "50%"}}}))["minAvailable"] == "50%"
    with pytest.raises(helm.HelmError, match="would block every node drain"):
        render({"router": {"replicas": 2, "podDisruptionBudget": {"minAvailable": 2}}})
    assert not by_kind(render({"router": {"podDisruptionBudget": {"enabled": False}}}), "PodDisruptionBudget")
