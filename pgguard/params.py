"""Sans-IO session parameters for reused server sessions: which startup parameters a client asks
for, which of them its server session's own StartupMessage carries, and the one statement that
sets the rest.

Theory
------
A reused server session is logged in with the startup settings of the client it was made for
(``startup_settings``: every parameter but ``user``, ``database`` and ``application_name``,
``options`` as sent), and warm sessions are kept per set of such settings (``pool.pool_key``):
a client only ever gets a session started with exactly its own. So ``RESET x``, ``RESET ALL``,
``SET x TO DEFAULT`` and ``DISCARD ALL`` (also the reset between clients) return to the
client's startup values, as on a session of its own: PostgreSQL takes them as the session's
reset values.

``application_name`` alone is not part of the session's StartupMessage (clients differ in it
more than in anything else, and a key per name would split the pool): it is applied with
``set_config(name, value, false)`` before the hand-over (``later`` / ``set_query``), skipping
it when the session already has it (its ParameterStatus, or what pgguard applied for the
previous client and applies again right after the reset, in the same round trip). What differs
from a direct session: ``RESET application_name`` returns to the server's default (empty),
not to the startup value.

A client whose startup cannot be reproduced this way (replication, a protocol extension
``_pq_.*``, an ``options`` switch other than ``-c``/``--``) is not pooled: ``wanted`` says None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = [
    "wanted", "parse_options", "set_query", "quote_literal", "quote_ident", "RESERVED",
    "startup_settings", "later", "LATER",
]  # fmt: skip

# Startup keys that are not settings: who and where, handled by the login itself.
RESERVED: Final = frozenset({"user", "database", "options", "replication"})
# The one startup setting applied with set_config rather than carried by the server session's
# StartupMessage (see the module's theory).
LATER: Final = "application_name"


def parse_options(options: str) -> dict[str, str] | None:
    """The settings of a startup ``options`` string, or None when it holds anything else.

    PostgreSQL splits ``options`` on unescaped white space (a backslash escapes the next
    character, pg_split_opts) and reads each word as a command-line switch; only ``-c
    name=value`` (also ``-cname=value``) and ``--name=value`` set a GUC.
    """
    words: list[str] = []
    current: list[str] = []
    escaped = False
    in_word = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
            in_word = True
        elif ch == "\\":
            escaped = True
            in_word = True
        elif ch.isspace():
            if in_word:
                words.append("".join(current))
                current = []
                in_word = False
        else:
            current.append(ch)
            in_word = True
    if in_word:
        words.append("".join(current))
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c":
            if i + 1 >= len(words):
                return None
            item = words[i + 1]
            i += 2
        elif word.startswith("--"):
            item = word[2:]
            i += 1
        elif word.startswith("-c"):
            item = word[2:]
            i += 1
        else:
            return None
        name, sep, value = item.partition("=")
        if not sep or not name:
            return None
        out[name.replace("-", "_")] = value
    return out


def wanted(params: Mapping[str, str]) -> dict[str, str] | None:
    """The settings a client's StartupMessage asks for (keys lower-cased), or None: not poolable."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if key == "replication" or key.startswith("_pq_."):
            return None
        if key not in RESERVED:
            out[key.lower()] = value
    options = params.get("options")
    if options:
        parsed = parse_options(options)
        if parsed is None:
            return None
        for key, value in parsed.items():
            out[key.lower()] = value
    return out


def startup_settings(params: Mapping[str, str]) -> dict[str, str]:
    """What the StartupMessage of a poolable client's server session carries besides ``user``
    and ``database``: the client's parameters as sent (``options`` included), except
    ``application_name`` (``later``)."""
    return {k: v for k, v in params.items() if k not in ("user", "database") and k.lower() != LATER}


def later(params: Mapping[str, str]) -> dict[str, str]:
    """The settings applied with ``set_config`` after the login: the client's
    ``application_name``, if it sent one as a parameter of its own."""
    for key, value in params.items():
        if key.lower() == LATER:
            return {LATER: value}
    return {}


def quote_literal(value: str) -> str:
    """A SQL string literal for ``value``, right whatever standard_conforming_strings is."""
    body = value.replace("'", "''")
    if "\\" in value:
        return "E'" + body.replace("\\", "\\\\") + "'"
    return "'" + body + "'"


def quote_ident(name: str) -> str:
    """A SQL identifier for ``name`` (double-quoted; a GUC name keeps its dots inside)."""
    return '"' + name.replace('"', '""') + '"'


def set_query(
    want: Mapping[str, str], reported: Mapping[str, str], applied: Mapping[str, str] | None = None
) -> str | None:
    """The statement that makes a session match ``want``, or None (nothing to do).

    ``reported`` holds the session's ParameterStatus values (names compare without case: the
    server reports ``DateStyle``, a client may send ``datestyle``); ``applied`` what pgguard
    set on it for the previous client (``pool.py`` sets it again after the reset, so a run of
    similar clients needs no statement at all). Settings ``applied`` holds that ``want``
    does not are RESET (the login carried none: back to the server's default); a setting
    neither reported nor applied is at its default after the reset and is always set.
    """
    applied = applied or {}
    current = {k.lower(): v for k, v in reported.items()}
    current.update(applied)
    resets = [f"RESET {quote_ident(name)}" for name in sorted(applied) if name not in want]
    calls = [
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
        for name, value in sorted(want.items())
        if current.get(name) != value
    ]
    if calls:
        resets.append("SELECT " + ", ".join(calls))
    return "; ".join(resets) or None
