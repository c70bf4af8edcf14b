"""The local floor: blocklists and prompt-injection patterns, checked with no network.

Everything is compiled once, when the router starts (``safety.localFloor`` is router config): the
terms and regexes of every blocklist into one RE2 set, the injection patterns into another. One
``Match`` call per text then finds every pattern that occurs, in one pass, in time linear in the
text's length. RE2 (``google-re2``) rather than Python's ``re``: ``re`` backtracks, so a user regex
like ``(a+)+b`` takes exponential time on a hostile prompt; RE2 has no backtracking at all and
refuses the constructs that need it (backreferences, lookaround), which ``safety.localFloor`` then
reports at load. Terms match case-insensitively, as whole words where they start / end with a word
character; regexes match as written (``(?i)`` makes one case-insensitive).

Injection patterns run on the caller's own words (a hit is a ``jailbreak``) and on documents
(``indirect_attack``); blocklists run on every text, prompt and output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import re2

from router.safety import texts, verdict
from router.settings import Blocklist, LocalFloor

PROVIDER = "local"
BUILTIN_INJECTION = "builtin:prompt-injection"
OVERLAP_CHARS = 256  # output already checked that is checked again with the next chunk (matches across chunks)
MAX_MEM_BYTES = 64 * 1024 * 1024  # RE2's budget for one set's automata
_JOIN = "\n\n"

# Well-known direct and indirect injection phrasings (case-insensitive). Deliberately narrow: a
# false positive refuses a legitimate request; semantic detection is Prompt Shields' job.
INJECTION_PATTERNS = (
    r"\b(ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}?\b(previous|prior|above|earlier|preceding|all|"
    r"your|system)\b[^.\n]{0,40}?\b(instructions?|prompts?|rules|directions|guidelines|guardrails)\b",
    r"\b(reveal|print|show|repeat|output|leak)\b[^.\n]{0,30}\b(system|hidden|initial|original)\s+"
    r"(prompt|instructions|message)",
    r"\byou\s+are\s+now\s+(dan\b|in\s+developer\s+mode|jailbroken|unfiltered|an?\s+unrestricted)",
    r"\b(do\s+anything\s+now|developer\s+mode\s+(enabled|on)|jailbreak\s+mode)\b",
    r"\bpretend\b[^.\n]{0,40}\b(no|without)\s+(rules|restrictions|limits|guidelines|filters)\b",
    r"<\|(im_start|im_end|endoftext)\|>",
)


def _options(*, case_sensitive: bool = True) -> re2.Options:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = MAX_MEM_BYTES
    options.case_sensitive = case_sensitive
    return options


def term_pattern(term: str) -> str:
    """A blocklist term as an RE2 pattern: literal, case-insensitive, whole words at word edges."""
    start = r"\b" if re.match(r"\w", term[:1], re.ASCII) else ""
    end = r"\b" if re.match(r"\w", term[-1:], re.ASCII) else ""
    return f"(?i){start}{re2.escape(term)}{end}"


class _Patterns:
    """One compiled RE2 set; each pattern reports (kind, name): kind BLOCKLIST or ``_ATTACK``."""

    __slots__ = ("_labels", "_set")

    def __init__(self, patterns: Sequence[tuple[str, str, str]]) -> None:
        self._set = re2.Set.SearchSet(_options())
        self._labels: list[tuple[str, str]] = []
        for pattern, kind, name in patterns:
            self._set.Add(pattern)
            self._labels.append((kind, name))
        self._set.Compile()

    def findings(self, text: str, attack: str) -> list[verdict.Finding]:
        """What matches in ``text``; an injection pattern is reported as category ``attack``."""
        if not text:
            return []
        labels = dict.fromkeys(self._labels[i] for i in self._set.Match(text) or ())
        return [verdict.Finding(attack if kind == _ATTACK else kind, PROVIDER, name=name) for kind, name in labels]


_ATTACK = "attack"


def _blocklist_patterns(blocklists: Sequence[Blocklist]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for bl in blocklists:
        out.extend((term_pattern(t), verdict.BLOCKLIST, bl.name) for t in bl.terms if t)
        out.extend((r, verdict.BLOCKLIST, bl.name) for r in bl.regexes)
    return out


class LocalProvider:
    """The local floor, compiled; shared by every request (it holds no per-request state).

    The caller's words and documents are scanned once each, by one set holding the blocklists and
    the injection patterns together; other turns (system, assistant) by the blocklists alone.
    """

    name = PROVIDER
    stream_batch_chars = 0  # cheap enough to check every stream event as it passes

    def __init__(self, settings: LocalFloor) -> None:
        blocklist = _blocklist_patterns(settings.blocklists)
        injection = [(f"(?i){p}", _ATTACK, BUILTIN_INJECTION) for p in INJECTION_PATTERNS]
        both = blocklist + (injection if settings.prompt_injection else [])
        self._blocklists = _Patterns(blocklist) if blocklist else None
        self._all = _Patterns(both) if both else None
        longest = max((len(t) for bl in settings.blocklists for t in bl.terms), default=0)
        self.overlap_chars = max(OVERLAP_CHARS, longest)
        self.checks_output = self._blocklists is not None  # output is checked for blocklist terms only

    @property
    def active(self) -> bool:
        return self._all is not None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def blocklist_hits(self, text: str) -> list[verdict.Finding]:
        return self._blocklists.findings(text, verdict.BLOCKLIST) if self._blocklists is not None else []

    def scan_prompt(self, prompt: texts.Prompt) -> list[verdict.Finding]:
        found: list[verdict.Finding] = []
        if self._all is not None:
            found += self._all.findings(_JOIN.join(prompt.user), verdict.JAILBREAK)
            found += self._all.findings(_JOIN.join(prompt.documents), verdict.INDIRECT)
        found += self.blocklist_hits(_JOIN.join(prompt.other))
        return list(dict.fromkeys(found))

    async def check_prompt(self, prompt: texts.Prompt, *, shields: bool) -> list[verdict.Finding]:
        return self.scan_prompt(prompt)

    async def check_output(self, text: str) -> list[verdict.Finding]:
        return self.blocklist_hits(text)
