"""Foundry / Azure OpenAI inline content-filter annotations, read as findings. Pure, no I/O.

Where they are (FACTS.md): ``prompt_filter_results[].content_filter_results`` (a whole reply, or the
first stream chunk, whose ``choices`` is empty), ``choices[].content_filter_results`` (each choice or
chunk), and the upstream's own 400, ``error.innererror.content_filter_result`` (singular; the OpenAPI
spec's ``inner_error.content_filter_results`` is read too). Severities are ``safe|low|medium|high``;
``jailbreak`` / ``indirect_attack`` carry ``detected``. Unknown or malformed entries are skipped:
an annotation we cannot read is no finding (the other providers still run).
"""

from __future__ import annotations

from typing import Any

from router.safety import verdict

PROVIDER = "foundry"
_ATTACKS = (verdict.JAILBREAK, verdict.INDIRECT)
_SAFE = {"filtered": False, "severity": "safe"}  # the common annotation, no finding: one C comparison


def _results(results: Any, out: list[verdict.Finding], *, only_filtered: bool = False) -> None:
    if not isinstance(results, dict):
        return
    for category in verdict.HARM:
        entry = results.get(category)
        if entry == _SAFE or not isinstance(entry, dict):  # nearly every annotation is the first
            continue
        severity = entry.get("severity", "")
        if severity == "safe":  # rank 0, under every ceiling: no finding
            continue
        if entry.get("filtered") is True or not only_filtered:
            rank = verdict.RANK.get(str(severity).lower())
            if rank:
                out.append(verdict.Finding(category, PROVIDER, rank))
    for category in _ATTACKS:
        entry = results.get(category)
        if isinstance(entry, dict) and entry.get("detected") is True and (entry.get("filtered") or not only_filtered):
            out.append(verdict.Finding(category, PROVIDER))


def prompt_findings(doc: Any) -> list[verdict.Finding]:
    """Findings of ``prompt_filter_results`` (``prompt_annotations`` in older API versions)."""
    out: list[verdict.Finding] = []
    if not isinstance(doc, dict):
        return out
    for key in ("prompt_filter_results", "prompt_annotations"):
        entries = doc.get(key)
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict):
                    _results(entry.get("content_filter_results"), out)
    return out


def output_findings(doc: Any) -> list[verdict.Finding]:
    """Findings of every ``choices[].content_filter_results``."""
    out: list[verdict.Finding] = []
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                _results(choice.get("content_filter_results"), out)
    return out


def error_findings(doc: Any) -> list[verdict.Finding] | None:
    """What the upstream filtered in its content-filter error body; None when ``doc`` is not one."""
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or error.get("code") != "content_filter":
        return None
    out: list[verdict.Finding] = []
    for key, inner_key in (("innererror", "content_filter_result"), ("inner_error", "content_filter_results")):
        inner = error.get(key)
        if isinstance(inner, dict):
            _results(inner.get(inner_key), out, only_filtered=True)
    return out
