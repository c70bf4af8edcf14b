"""Reading policy files: YAML (one or many documents) and the controller's projected JSON.

``load_dir`` turns a directory into validated resources plus one error per document that
failed, each error naming the file, the document (1-based) and the field path, so that
``kars policy validate`` and ``/internal/policy-status`` can both say exactly what is wrong.
Pure apart from reading the files it is given.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import yaml

from router import _validation
from router.policy import model

POLICY_SUFFIXES = (".yaml", ".yml", ".json")
MAX_POLICY_FILE_BYTES = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """Where a document came from: file and 1-based document index within it."""

    file: str
    document: int

    def __str__(self) -> str:
        return f"{self.file}:{self.document}"


@dataclasses.dataclass(frozen=True, slots=True)
class Loaded:
    resource: model.Resource
    source: Source


@dataclasses.dataclass(frozen=True, slots=True)
class DocError:
    """A document that did not validate; identity fields are filled when they could be read."""

    source: Source
    messages: tuple[str, ...]
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None

    @property
    def key(self) -> tuple[str, str, str] | None:
        if self.kind is None or self.name is None:
            return None
        return (self.kind, self.namespace or "", self.name)

    def lines(self) -> list[str]:
        return [f"{self.source}: {m}" for m in self.messages]

    def summary(self) -> str:
        return "; ".join(self.messages)


@dataclasses.dataclass(frozen=True, slots=True)
class FileError:
    """A file that could not be read or parsed at all: every resource it held is unknown."""

    file: str
    message: str

    def lines(self) -> list[str]:
        return [f"{self.file}: {self.message}"]


@dataclasses.dataclass(frozen=True, slots=True)
class LoadResult:
    resources: tuple[Loaded, ...]
    errors: tuple[DocError, ...]
    file_errors: tuple[FileError, ...]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.file_errors

    def lines(self) -> list[str]:
        out: list[str] = []
        for fe in self.file_errors:
            out.extend(fe.lines())
        for de in self.errors:
            out.extend(de.lines())
        return out


def policy_files(directory: Path) -> list[Path]:
    """Policy files in a directory, sorted. Hidden entries are skipped: a ConfigMap volume
    keeps its real files under ``..data`` and exposes them through top-level symlinks."""
    if not directory.is_dir():
        raise FileNotFoundError(f"policy directory {directory} does not exist")
    return sorted(
        p for p in directory.iterdir() if not p.name.startswith(".") and p.suffix in POLICY_SUFFIXES and p.is_file()
    )


class _KubernetesYaml(yaml.SafeLoader):
    """YAML as it reaches a CRD's schema: an unquoted timestamp stays a string.

    PyYAML would make ``shutdownTime: 2030-01-01T00:00:00Z`` a datetime, which the schema (a
    string, ``format: date-time``) rejects; the API server keeps the text, and so does this loader.
    """


_KubernetesYaml.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _documents(path: Path, text: str) -> Iterator[Any]:
    if path.suffix == ".json":
        data = json.loads(text)
        yield from _unlist(data)
        return
    for data in yaml.load_all(text, Loader=_KubernetesYaml):
        if data is not None:
            yield from _unlist(data)


def _unlist(data: Any) -> Iterator[Any]:
    """A Kubernetes ``List`` (or a bare JSON array) stands for its items."""
    if isinstance(data, list):
        yield from data
    elif isinstance(data, dict) and isinstance(data.get("items"), list) and "spec" not in data:
        yield from data["items"]
    else:
        yield data


def parse_document(data: Any, source: Source) -> Loaded | DocError:
    """Validate one decoded document against the model of its ``kind``."""
    if not isinstance(data, dict):
        return DocError(source, (f"(document): expected a mapping, got {type(data).__name__}",))
    kind = data.get("kind")
    raw_meta = data.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) else None
    namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else None
    cls = model.KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(model.KINDS)
        return DocError(source, (f"kind: unknown kind {kind!r} (expected one of {known})",), None, namespace, name)
    if not cls.cluster_scoped and namespace is None:
        namespace = "default"
    try:
        resource = cls.model_validate(data)
    except pydantic.ValidationError as exc:
        return DocError(source, tuple(_validation.messages(exc)), kind, namespace, name)
    return Loaded(resource, source)


def load_file(path: Path, label: str | None = None) -> tuple[list[Loaded], list[DocError], FileError | None]:
    label = label or str(path)
    try:
        if path.stat().st_size > MAX_POLICY_FILE_BYTES:
            return [], [], FileError(label, f"larger than {MAX_POLICY_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
        docs = list(_documents(path, text))
    except (OSError, UnicodeDecodeError) as exc:
        return [], [], FileError(label, f"cannot read: {exc}")
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        return [], [], FileError(label, f"cannot parse: {' '.join(str(exc).split())}")
    loaded: list[Loaded] = []
    errors: list[DocError] = []
    for index, data in enumerate(docs, start=1):
        result = parse_document(data, Source(label, index))
        (loaded if isinstance(result, Loaded) else errors).append(result)  # type: ignore[arg-type]
    return loaded, errors, None


def load_dir(directory: Path) -> LoadResult:
    """Every policy document under ``directory`` (not recursive), validated."""
    resources: list[Loaded] = []
    errors: list[DocError] = []
    file_errors: list[FileError] = []
    try:
        files = policy_files(directory)
    except OSError as exc:
        return LoadResult((), (), (FileError(str(directory), str(exc)),))
    for path in files:
        loaded, errs, ferr = load_file(path)
        resources.extend(loaded)
        errors.extend(errs)
        if ferr is not None:
            file_errors.append(ferr)
    return LoadResult(tuple(resources), tuple(errors), tuple(file_errors))
