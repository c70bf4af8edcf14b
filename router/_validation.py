"""Turning pydantic validation errors into ``field.path: message`` lines people can act on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pydantic


def field_path(loc: Sequence[int | str]) -> str:
    """``("spec", "edges", 0, "score")`` -> ``spec.edges[0].score``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{part}"
        else:
            out = str(part)
    return out or "(document)"


def messages(exc: pydantic.ValidationError, prefix: Iterable[str | int] = ()) -> list[str]:
    """One ``path: message`` line per error, in the order pydantic found them."""
    lines = []
    pre = tuple(prefix)
    for err in exc.errors(include_url=False, include_context=False):
        # Tagged unions and function validators add their own names to loc; drop them.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{field_path(pre + loc)}: {msg}")
    return lines
