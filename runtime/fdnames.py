"""The names of passed on-ramp fds: ``onramp:<kind>:<name>``, made and read in one place.

The supervisor names each on-ramp fd it passes a worker by the on-ramp's kind (the config's
``kind``: ``tunnel``, ``gue``) and its name; the worker reads both back with :func:`parse_onramp`
and hands the fd to the on-ramp class registered for that kind. Names and kinds are what the config
allows (``[a-z][a-z0-9_-]{0,31}``), so neither holds a ``:``.
"""

from __future__ import annotations

import re

ONRAMP = "onramp"
_WORD = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class BadFdName(ValueError):
    """An fd name that is not ``onramp:<kind>:<name>``."""


def onramp(kind: str, name: str) -> str:
    """The fd name of on-ramp ``name`` of kind ``kind``."""
    for what, word in (("kind", kind), ("name", name)):
        if not _WORD.fullmatch(word):
            raise BadFdName(f"on-ramp {what} {word!r}: expected [a-z][a-z0-9_-]{{0,31}}")
    return f"{ONRAMP}:{kind}:{name}"


def is_onramp(fdname: str) -> bool:
    """Whether ``fdname`` is meant as an on-ramp's (well formed or not)."""
    return fdname.startswith(ONRAMP + ":")


def parse_onramp(fdname: str) -> tuple[str, str]:
    """``(kind, name)`` of an on-ramp fd name; :class:`BadFdName` if it is not one."""
    parts = fdname.split(":", 2)
    if len(parts) != 3 or parts[0] != ONRAMP:
        raise BadFdName(f"fd {fdname!r}: expected {ONRAMP}:<kind>:<name>")
    _, kind, name = parts
    if not _WORD.fullmatch(kind) or not _WORD.fullmatch(name):
        raise BadFdName(f"fd {fdname!r}: kind and name must match [a-z][a-z0-9_-]{{0,31}}")
    return kind, name
