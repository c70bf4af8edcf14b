"""Turn a pydantic model's JSON schema into a Kubernetes *structural* OpenAPI v3 schema.

The API server accepts only structural schemas in a CRD: every node has a ``type``, no
``$ref``, no ``anyOf`` that widens the type, no ``additionalProperties: false``, and
OpenAPI 3.0 number bounds (``exclusiveMinimum: true`` next to ``minimum``). Pydantic emits
JSON Schema 2020-12, so this module rewrites it:

- ``$ref``/``$defs`` are inlined (the models have no recursive types);
- ``X | None`` (``anyOf: [X, {type: null}]``) becomes plain ``X``, *not* ``nullable``: the API
  server prunes a null value of a non-nullable field before defaulting, so ``null`` means
  "absent" on both sides, which is exactly how the models treat ``None``, and CEL ``has()``
  keeps one meaning;
- ``additionalProperties: false`` (pydantic's ``extra="forbid"``) is dropped: the API server
  prunes unknown fields, and ``kubectl --validate=strict`` reports them;
- titles go, descriptions stay; ``default: null`` goes;
- fields with a ``default_factory`` get the factory's value as ``default`` so the API server
  materialises the same defaults the router applies.

Per-definition extras (CEL rules, formats, patterns, descriptions) are merged in by the
caller, keyed by the pydantic definition name. Pure: no I/O.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

Schema = dict[str, Any]

_DROP_KEYS = frozenset({"title", "$defs", "additionalProperties"})


class SchemaError(ValueError):
    """The model uses a construct this converter cannot express structurally."""


def model_classes(root: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """Every pydantic model reachable from ``root`` through field annotations (root first)."""
    seen: set[type[BaseModel]] = set()
    stack: list[type[BaseModel]] = [root]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        yield cls
        for field in cls.model_fields.values():
            stack.extend(_models_in(field.annotation))


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _factory_defaults(root: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """``{def name: {field alias: default}}`` for fields whose default comes from a factory."""
    out: dict[str, dict[str, Any]] = {}
    for cls in model_classes(root):
        for name, field in cls.model_fields.items():
            factory = field.default_factory
            if factory is None:
                continue
            value = factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
            out.setdefault(cls.__name__, {})[field.alias or name] = copy.deepcopy(value)
    return out


def structural(
    root: type[BaseModel],
    *,
    extras: Mapping[str, Schema] | None = None,
    field_extras: Mapping[tuple[str, str], Schema] | None = None,
) -> Schema:
    """The structural schema of ``root`` (validation mode, camelCase aliases).

    ``extras[def]`` is merged into the object schema of that definition (e.g.
    ``x-kubernetes-validations``); ``field_extras[(def, alias)]`` into one of its properties.
    """
    raw = root.model_json_schema(by_alias=True, mode="validation")
    defs: dict[str, Schema] = raw.get("$defs", {})
    defaults = _factory_defaults(root)
    extras = extras or {}
    field_extras = field_extras or {}

    def convert(node: Schema, def_name: str | None) -> Schema:
        node = dict(node)
        if "$ref" in node:
            ref = node.pop("$ref")
            name = ref.rsplit("/", 1)[-1]
            merged = {**convert(defs[name], name), **{k: v for k, v in node.items() if k not in _DROP_KEYS}}
            return _clean(merged)
        if "allOf" in node:  # pydantic wraps a $ref that has siblings
            (only,) = node.pop("allOf")
            return convert({**only, **node}, None)
        if "anyOf" in node:
            branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
            if len(branches) != 1:
                raise SchemaError(f"union of {len(branches)} non-null types is not structural: {branches}")
            inner = convert(branches[0], None)
            rest = {k: v for k, v in node.items() if k not in _DROP_KEYS}
            return _clean({**inner, **rest})
        out: Schema = {}
        for key, value in node.items():
            if key in _DROP_KEYS and not (key == "additionalProperties" and isinstance(value, dict)):
                continue
            if key == "properties":
                props = {}
                for prop, sub in value.items():
                    converted = convert(sub, None)
                    if def_name is not None:
                        if prop in defaults.get(def_name, {}):
                            converted["default"] = defaults[def_name][prop]
                        converted.update(copy.deepcopy(dict(field_extras.get((def_name, prop), {}))))
                        if converted.get("x-kubernetes-int-or-string"):
                            converted.pop("type", None)  # the API server requires int-or-string untyped
                    props[prop] = converted
                out["properties"] = props
            elif key in ("items", "additionalProperties"):
                out[key] = convert(value, None)
            else:
                out[key] = copy.deepcopy(value)
        if "const" in out:
            out["enum"] = [out.pop("const")]
        if "enum" in out and "type" not in out:
            out["type"] = _enum_type(out["enum"])
        if "exclusiveMinimum" in out and not isinstance(out["exclusiveMinimum"], bool):
            out["minimum"], out["exclusiveMinimum"] = out["exclusiveMinimum"], True
        if "exclusiveMaximum" in out and not isinstance(out["exclusiveMaximum"], bool):
            out["maximum"], out["exclusiveMaximum"] = out["exclusiveMaximum"], True
        if def_name is not None:
            out.update(copy.deepcopy(dict(extras.get(def_name, {}))))
        return _clean(out)

    return convert(raw, raw.get("title", root.__name__))


def _enum_type(values: list[Any]) -> str:
    kinds = {type(v) for v in values}
    if kinds <= {str}:
        return "string"
    if kinds <= {int}:
        return "integer"
    raise SchemaError(f"enum of mixed types: {values}")


def _clean(node: Schema) -> Schema:
    if node.get("default", 0) is None:
        del node["default"]
    node.pop("title", None)
    return node


def problems(node: Any, path: str = "") -> list[str]:
    """Why ``node`` is not a structural schema the API server would accept (empty if it is)."""
    out: list[str] = []
    if not isinstance(node, dict):
        return [f"{path or '.'}: not a schema object"]
    for banned in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const"):
        if banned in node:
            out.append(f"{path or '.'}: {banned} is not allowed here")
    untyped_ok = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if "type" not in node and not untyped_ok:
        out.append(f"{path or '.'}: missing type")
    additional = node.get("additionalProperties")
    if additional is not None:
        if not isinstance(additional, dict):
            out.append(f"{path}: additionalProperties must be a schema")
        elif "properties" in node:
            out.append(f"{path}: properties and additionalProperties are mutually exclusive")
        else:
            out.extend(problems(additional, f"{path}.additionalProperties"))
    if node.get("default", 0) is None:
        out.append(f"{path}: default null")
    for name, sub in node.get("properties", {}).items():
        out.extend(problems(sub, f"{path}.{name}"))
    if "items" in node:
        out.extend(problems(node["items"], f"{path}[]"))
    return out
