"""The CRDs: generated from the models, committed as generated, structural, valid, CEL == models."""

from __future__ import annotations

import base64
import itertools
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pydantic
import pytest
import yaml

from controller import crds, schema
from router.policy import model

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_VERSION = "1.33.0"


def _committed(kind: crds.Kind) -> str:
    return (ROOT / crds.CRD_DIR / crds.file_name(kind)).read_text(encoding="utf-8")


@pytest.mark.parametrize("kind", crds.KINDS, ids=lambda k: k.kind)
def test_committed_crd_is_what_the_models_generate(kind: crds.Kind) -> None:
    assert _committed(kind) == crds.render(kind), "run `python -m controller.crds` and commit the result"


def test_no_stray_crd_files() -> None:
    present = {p.name for p in (ROOT / crds.CRD_DIR).iterdir()}
    assert present == {crds.file_name(k) for k in crds.KINDS}


def test_write_then_compare(tmp_path: Path) -> None:
    written = crds.write(tmp_path)
    assert [p.name for p in written] == [crds.file_name(k) for k in crds.KINDS]


@pytest.mark.parametrize("kind", crds.KINDS, ids=lambda k: k.kind)
def test_crd_validates_against_the_kubernetes_schema(kind: crds.Kind) -> None:
    doc = yaml.safe_load(_committed(kind))
    # validate() raises on any schema violation; on success it names the schema it checked against.
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kind", crds.KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind: crds.Kind) -> None:
    doc = yaml.safe_load(_committed(kind))
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert schema.problems(version["schema"]["openAPIV3Schema"]) == []
    assert doc["spec"]["scope"] == ("Cluster" if kind.kind == "TrustGraph" else "Namespaced")


def test_problems_finds_what_the_api_server_refuses() -> None:
    bad = {
        "type": "object",
        "properties": {
            "a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "b": {"$ref": "#/$defs/X"},
            "c": {"type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": False},
            "d": {"default": None, "type": "string"},
        },
    }
    found = "\n".join(schema.problems(bad))
    for needle in (".a: anyOf", ".b: $ref", ".b: missing type", ".c: additionalProperties", ".d: default null"):
        assert needle in found


def test_unions_of_two_types_are_refused() -> None:
    class Bad(pydantic.BaseModel):
        x: int | str

    with pytest.raises(schema.SchemaError):
        schema.structural(Bad)


def _spec_schema(kind: str) -> dict[str, Any]:
    doc = crds.crd(crds.BY_KIND[kind])
    result: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return result


def test_schema_keeps_enums_defaults_bounds_and_factories() -> None:
    spec = _spec_schema("InferencePolicy")
    budget = spec["properties"]["tokenBudget"]
    assert budget["properties"]["scope"] == {
        "default": "sandbox",
        "enum": ["sandbox", "namespace", "cluster"],
        "type": "string",
    }
    assert budget["properties"]["hourlyTokens"] == {"minimum": 1, "type": "integer"}
    assert spec["properties"]["appliesTo"]["default"] == {"action": "*"}
    rate = _spec_schema("ToolPolicy")["properties"]["rateLimit"]["properties"]["rps"]
    assert rate == {"minimum": 0, "exclusiveMinimum": True, "type": "number"}
    sandbox = _spec_schema("KarsSandbox")["properties"]
    assert sandbox["replicas"] == {"default": 1, "enum": [0, 1], "type": "integer"}
    assert sandbox["lifecycle"]["properties"]["shutdownTime"]["format"] == "date-time"
    assert _spec_schema("McpServer")["properties"]["allowedTools"]["default"] == ["*"]
    edge = _spec_schema("TrustGraph")["properties"]["edges"]["items"]
    assert set(edge["required"]) == {"from", "to", "score", "issuedAt", "signature"}


# -- the CEL rules agree with the model validators -------------------------------------------


def _rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def _cel_accepts(rules: list[str], obj: dict[str, Any]) -> bool:
    env = celpy.Environment()
    activation = {"self": celpy.json_to_cel(obj)}
    return all(bool(env.program(env.compile(rule)).evaluate(activation)) for rule in rules)


def _model_accepts(cls: type[pydantic.BaseModel], obj: dict[str, Any]) -> bool:
    try:
        cls.model_validate(obj)
    except pydantic.ValidationError:
        return False
    return True


def test_budget_cel_rules_match_the_model_on_every_combination() -> None:
    rules = _rules(_spec_schema("InferencePolicy")["properties"]["tokenBudget"])
    assert len(rules) == 4
    fields = ("perRequestTokens", "hourlyTokens", "dailyTokens", "monthlyTokens")
    values = (None, 10, 100, 1000)
    disagreements = []
    for combo in itertools.product(values, repeat=len(fields)):
        obj = {f: v for f, v in zip(fields, combo, strict=True) if v is not None}
        if _cel_accepts(rules, obj) != _model_accepts(model.TokenBudget, obj):
            disagreements.append(obj)
    assert disagreements == []


def test_signing_key_cel_rules_match_the_model() -> None:
    rules = _rules(_spec_schema("A2AAgent")["properties"]["signingKeys"]["items"])
    ed = base64.urlsafe_b64encode(b"\x01" * 32).rstrip(b"=").decode()
    ec = base64.urlsafe_b64encode(b"\x04" + b"\x02" * 64).rstrip(b"=").decode()
    jwks: list[dict[str, str] | None] = [
        None,
        {"kty": "OKP", "crv": "Ed25519", "x": ed},
        {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"},
        {"kty": "OKP", "crv": "Ed25519", "x": ed, "d": "secret"},
        {"kty": "OKP"},
        {},
    ]
    checked = 0
    for alg, jwk, with_pub in itertools.product(("EdDSA", "ES256"), jwks, (False, True)):
        obj: dict[str, Any] = {"kid": "k1", "alg": alg}
        if with_pub:
            obj["publicKeyB64u"] = ed if alg == "EdDSA" else ec
        if jwk is not None:
            obj["jwk"] = jwk
        assert _cel_accepts(rules, obj) == _model_accepts(model.SigningKey, obj), obj
        checked += 1
    assert checked == 24


def test_sandbox_name_cel_rule_matches_the_model() -> None:
    """A KarsSandbox names its Service: the API server and the router refuse the same names."""
    doc = crds.crd(crds.BY_KIND["KarsSandbox"])
    rules = _rules(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert len(rules) == 2
    names = ["agent-1", "a", "agent.v2", "9agent", "Agent", "agent-", "-agent", "a" * 63, "a" * 64, "a_b", "default"]
    names += ["default-1", "defaults"]
    verdicts = {}
    for name in names:
        obj = {
            "apiVersion": "kars.azure.com/v1alpha1",
            "kind": "KarsSandbox",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"image": "img:1"},
        }
        assert _cel_accepts(rules, obj) == _model_accepts(model.KarsSandbox, obj), name
        verdicts[name] = _model_accepts(model.KarsSandbox, obj)
    assert [n for n, ok in verdicts.items() if ok] == ["agent-1", "a", "a" * 63, "default-1", "defaults"]


def test_quantities_are_int_or_string() -> None:
    limits = _spec_schema("KarsSandbox")["properties"]["resources"]["properties"]["limits"]["properties"]
    assert limits["cpu"] == limits["memory"] == {"x-kubernetes-int-or-string": True}
