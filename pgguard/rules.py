"""The fault-rule language (pure): parse, validate and describe REJECT/DELAY/DROP/TERMINATE rules.

A rule is one line of a small language, the same in ``[faults] rules``, in the admin
console's ``INJECT`` and (as keyword arguments) in ``pgguard.testing``::

    REJECT    [NEXT n] [FRACTION p] [ROLE r] [DATABASE d] [SQLSTATE s] [MESSAGE m] [SEED k]
    DELAY t | a..b   [NEXT n] [FRACTION p] [ROLE r] [DATABASE d] [SEED k]
    DROP      [NEXT n] [FRACTION p] [ROLE r] [DATABASE d] [SEED k]
    TERMINATE [ROLE r] [DATABASE d] [AFTER t] [SQLSTATE s] [MESSAGE m]

Keywords are case-insensitive; values with spaces are quoted ('...' or "..."). This module
has no asyncio and no clock: ``config`` validates ``[faults] rules`` with it at load time,
and the engine that acts on rules (``faults.Faults``) lives in the control layer. What each
kind does is described there.
"""

from __future__ import annotations

import random
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from .errors import PgGuardError

__all__ = [
    "ADMISSION_KINDS",
    "FaultKind",
    "FaultRule",
    "FaultSpecError",
    "InjectedFault",
    "parse_rule",
    "rule_from_kwargs",
    "default_message",
]

FaultKind = Literal["reject", "delay", "drop", "terminate"]
ADMISSION_KINDS: Final = ("reject", "delay", "drop")

# What a real PostgreSQL (or pgguard) says with these SQLSTATEs, so an injected error reads
# like the one production would send. {role} and {database} are filled in.
_DEFAULT_MESSAGES: Final = {
    "53300": 'too many connections for role "{role}"',
    "57P01": "terminating connection due to administrator command",
    "57P03": "the database system is shutting down",
    "57P05": "terminating connection due to idle-session timeout",
    "28P01": 'password authentication failed for user "{role}"',
    "28000": 'role "{role}" does not exist',
    "3D000": 'database "{database}" does not exist',
    "08006": "pgguard could not connect to the server: injected fault",
    "53200": "out of memory",
}
_SQLSTATE: Final = re.compile(r"[0-9A-Z]{5}")
# Options each kind accepts (the keyword after the kind's own argument).
_OPTIONS: Final[dict[str, frozenset[str]]] = {
    "reject": frozenset({"next", "fraction", "role", "database", "sqlstate", "message", "seed"}),
    "delay": frozenset({"next", "fraction", "role", "database", "seed"}),
    "drop": frozenset({"next", "fraction", "role", "database", "seed"}),
    "terminate": frozenset({"role", "database", "after", "sqlstate", "message"}),
}


class FaultSpecError(ValueError):
    """A fault rule's text or arguments are invalid; the message says which part and why."""


class InjectedFault(PgGuardError):
    """The error a fault rule sends: the rule's SQLSTATE and message, severity FATAL."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def default_message(sqlstate: str) -> str:
    """The message sent with ``sqlstate`` when a rule gives none (a template with {role})."""
    return _DEFAULT_MESSAGES.get(sqlstate, f"pgguard injected fault (SQLSTATE {sqlstate})")


@dataclass(slots=True, kw_only=True, eq=False)
class FaultRule:
    """One rule: what it matches, what it does, and how often it has fired."""

    kind: FaultKind
    role: str | None = None
    database: str | None = None
    count: int | None = None  # NEXT n: fire at most n times; None: no bound
    fraction: float = 1.0  # FRACTION p: fire for this share of matching clients
    sqlstate: str | None = None
    message: str | None = None
    delay: tuple[float, float] = (0.0, 0.0)  # DELAY a..b (a == b: fixed)
    after: float = 0.0  # TERMINATE ... AFTER t
    seed: int | None = None
    # Run-time state, set by Faults.
    id: int = 0
    source: str = "runtime"  # "config", "console", "api", "runtime"
    fired: int = 0
    state: str = "live"  # "live", "spent", "pending" (terminate before it fires), "done"
    _rng: random.Random | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def live(self) -> bool:
        return self.state == "live"

    def matches(self, role: str, database: str) -> bool:
        return (self.role is None or self.role == role) and (
            self.database is None or self.database == database
        )

    def error(self, role: str, database: str, default_sqlstate: str) -> InjectedFault:
        sqlstate = self.sqlstate or default_sqlstate
        template = self.message if self.message is not None else default_message(sqlstate)
        text = template.replace("{role}", role).replace("{database}", database)
        return InjectedFault(sqlstate, text)

    def describe(self) -> str:
        """The rule's canonical text (parse_rule(describe()) gives the same rule)."""
        parts = [self.kind.upper()]
        if self.kind == "delay":
            a, b = self.delay
            parts.append(_num(a) if a == b else f"{_num(a)}..{_num(b)}")
        if self.count is not None:
            parts += ["NEXT", str(self.count)]
        if self.fraction != 1.0:
            parts += ["FRACTION", _num(self.fraction)]
        if self.role is not None:
            parts += ["ROLE", _quote(self.role)]
        if self.database is not None:
            parts += ["DATABASE", _quote(self.database)]
        if self.kind == "terminate" and self.after:
            parts += ["AFTER", _num(self.after)]
        if self.sqlstate is not None:
            parts += ["SQLSTATE", self.sqlstate]
        if self.message is not None:
            parts += ["MESSAGE", _quote(self.message)]
        if self.seed is not None:
            parts += ["SEED", str(self.seed)]
        return " ".join(parts)


def _num(value: float) -> str:
    text = f"{value:g}"
    return text if float(text) == value else repr(value)  # short, and exact when it must be


def _quote(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z0-9_.\-]+", text) else shlex.quote(text)


def _validate(rule: FaultRule) -> None:
    if rule.kind not in _OPTIONS:
        raise FaultSpecError(
            f"unknown fault kind {rule.kind!r} (known: REJECT, DELAY, DROP, TERMINATE)"
        )
    if rule.count is not None and rule.count < 1:
        raise FaultSpecError(f"NEXT must be 1 or more (got {rule.count})")
    if not 0.0 < rule.fraction <= 1.0:
        raise FaultSpecError(f"FRACTION must be in (0, 1] (got {rule.fraction:g})")
    if rule.sqlstate is not None and not _SQLSTATE.fullmatch(rule.sqlstate):
        raise FaultSpecError(
            f"SQLSTATE must be five digits or capital letters (got {rule.sqlstate!r})"
        )
    a, b = rule.delay
    if a < 0 or b < a:
        raise FaultSpecError(f"DELAY must be t >= 0 or a..b with 0 <= a <= b (got {a:g}..{b:g})")
    if rule.kind == "delay" and b == 0:
        raise FaultSpecError("DELAY needs a time in seconds: DELAY 0.5 or DELAY 0.1..2")
    if rule.after < 0:
        raise FaultSpecError(f"AFTER must be 0 or more seconds (got {rule.after:g})")
    allowed = _OPTIONS[rule.kind]
    given = {
        "next": rule.count is not None,
        "fraction": rule.fraction != 1.0,
        "sqlstate": rule.sqlstate is not None,
        "message": rule.message is not None,
        "after": rule.after != 0.0,
        "seed": rule.seed is not None,
    }
    for name, present in given.items():
        if present and name not in allowed:
            raise FaultSpecError(f"{rule.kind.upper()} does not take {name.upper()}")


def parse_rule(text: str) -> FaultRule:
    """Parse one rule (``REJECT NEXT 3 ROLE app``); raises FaultSpecError naming the problem."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise FaultSpecError(f"{text!r}: {exc}") from None
    if not tokens:
        raise FaultSpecError("empty fault rule")
    kind = tokens[0].lower()
    if kind not in _OPTIONS:
        raise FaultSpecError(
            f"{text!r}: unknown fault kind {tokens[0]!r} (known: REJECT, DELAY, DROP, TERMINATE)"
        )
    args: dict[str, Any] = {"kind": kind}
    rest = tokens[1:]
    if kind == "delay":
        if not rest:
            raise FaultSpecError(
                f"{text!r}: DELAY needs a time in seconds: DELAY 0.5 or DELAY 0.1..2"
            )
        args["delay"] = _parse_delay(rest.pop(0), text)
    while rest:
        key = rest.pop(0).lower()
        if key not in _OPTIONS[kind]:
            raise FaultSpecError(
                f"{text!r}: {kind.upper()} does not take {key.upper()} "
                f"(it takes {', '.join(sorted(o.upper() for o in _OPTIONS[kind]))})"
            )
        if not rest:
            raise FaultSpecError(f"{text!r}: {key.upper()} needs a value")
        value = rest.pop(0)
        try:
            if key == "next":
                args["count"] = int(value)
            elif key == "seed":
                args["seed"] = int(value)
            elif key in ("fraction", "after"):
                args[key] = float(value)
            elif key == "sqlstate":
                args["sqlstate"] = value.upper()
            else:
                args[key] = value
        except ValueError:
            raise FaultSpecError(
                f"{text!r}: {key.upper()} needs a number (got {value!r})"
            ) from None
    try:
        return FaultRule(**args)
    except FaultSpecError as exc:
        raise FaultSpecError(f"{text!r}: {exc}") from None


def _parse_delay(value: str, text: str) -> tuple[float, float]:
    low, sep, high = value.partition("..")
    try:
        a = float(low)
        b = float(high) if sep else a
    except ValueError:
        raise FaultSpecError(f"{text!r}: DELAY needs seconds or a..b (got {value!r})") from None
    return (a, b)


def rule_from_kwargs(
    *,
    reject_next: int | None = None,
    reject_fraction: float | None = None,
    delay: float | tuple[float, float] | None = None,
    drop_next: int | None = None,
    drop_fraction: float | None = None,
    terminate: bool = False,
    count: int | None = None,
    fraction: float | None = None,
    role: str | None = None,
    database: str | None = None,
    sqlstate: str | None = None,
    message: str | None = None,
    after: float = 0.0,
    seed: int | None = None,
) -> FaultRule:
    """The Python API's form of a rule: ``reject_next=3``, ``delay=(0.1, 0.5)``, ``terminate=True``.

    Exactly one kind must be asked for. ``count``/``fraction`` are NEXT/FRACTION for
    DELAY (and may be given instead of the ``reject_``/``drop_`` forms). Raises FaultSpecError.
    """
    kinds: list[FaultKind] = []
    if reject_next is not None or reject_fraction is not None:
        kinds.append("reject")
    if delay is not None:
        kinds.append("delay")
    if drop_next is not None or drop_fraction is not None:
        kinds.append("drop")
    if terminate:
        kinds.append("terminate")
    if len(kinds) != 1:
        raise FaultSpecError(
            "give exactly one of reject_next/reject_fraction, delay, drop_next/drop_fraction, terminate"
            f" (got {', '.join(kinds) or 'none'})"
        )
    kind = kinds[0]
    count = count if count is not None else (reject_next if kind == "reject" else drop_next)
    if fraction is None:
        fraction = reject_fraction if kind == "reject" else drop_fraction
    if isinstance(delay, int | float):
        delay = (float(delay), float(delay))
    return FaultRule(
        kind=kind,
        role=role,
        database=database,
        count=count,
        fraction=1.0 if fraction is None else float(fraction),
        sqlstate=None if sqlstate is None else sqlstate.upper(),
        message=message,
        delay=(0.0, 0.0) if delay is None else (float(delay[0]), float(delay[1])),
        after=float(after),
        seed=seed,
    )
