"""Fault rules for app testing: reject, delay or drop connections at admission; terminate live sessions.

Theory
------
A rule is one line of a small language, the same in ``[faults] rules``, in the admin
console's ``INJECT`` and (as keyword arguments) in ``pgguard.testing``::

    REJECT    [NEXT n] [FRACTION p] [ROLE r] [DATABASE d] [SQLSTATE s] [MESSAGE m] [SEED k]
    DELAY t | a..b   [NEXT n] [FRACTION p] [ROLE r] [DATABASE d] [SEED k]
    DROP      [NEXT n] [FRACTION p] [ROLE r] [DATABASE d] [SEED k]
    TERMINATE [ROLE r] [DATABASE d] [AFTER t] [SQLSTATE s] [MESSAGE m]

Keywords are case-insensitive; values with spaces are quoted ('...' or "...").

REJECT, DELAY and DROP are *admission* rules. When a client's StartupMessage arrives and
at least one is live, ``Control.admit`` asks ``Faults.intercept``: the first live rule whose
ROLE/DATABASE match (absent: any) and whose FRACTION draw succeeds fires, and only that one.
REJECT answers a FATAL ErrorResponse (default 53300 ``too many connections for role "r"``,
or the SQLSTATE and MESSAGE given; ``{role}`` and ``{database}`` in a message are filled
in). DELAY holds the client for ``t`` seconds (or uniform in ``a..b``) and then admits it
through the normal gate. DROP closes the TCP connection without a reply, mid-startup.
``NEXT n`` makes a rule fire at most ``n`` times; after that it is spent (shown, no longer
matched). Without NEXT a rule fires for as long as it exists.

TERMINATE is an *action*: ``AFTER t`` seconds from now (default at once) every live
session matching ROLE/DATABASE gets a FATAL ErrorResponse (default 57P01 ``terminating
connection due to administrator command``, what ``pg_terminate_backend`` sends) and is
closed; its slot is freed once the server has closed the backend, as for any client.
The error is written between two relayed chunks: for an idle session (the usual case in
a test) that is a message boundary; a session in the middle of a large result may see a
protocol error instead.

Randomness is reproducible: each rule draws from its own ``random.Random`` seeded with
``SEED k`` or, without one, with ``[faults] seed`` and the rule's canonical text. The same
seed and the same sequence of matching arrivals give the same decisions.

Every firing is counted on its rule (``fired``) and in ``Faults.totals`` by kind, shown by
``SHOW FAULTS``. When no admission rule is live, ``active`` is False and the hot path pays
one attribute test.

The language itself is pure and lives in the core (``rules.py``, which ``config`` uses to
validate ``[faults] rules``); this engine lives in the control layer, which owns it and
hands it its loop and clients (``FaultHost``). The console commands (``INJECT rule``,
``SHOW FAULTS``, ``CLEAR FAULTS``, ``CLEAR FAULT id``) are in ``console.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import PgGuardError
from .log import log_event
from .proxy import ClientConnection, State
from .rules import (
    ADMISSION_KINDS,
    FaultRule,
    FaultSpecError,
    InjectedFault,
    default_message,
    parse_rule,
    rule_from_kwargs,
)

if TYPE_CHECKING:
    from .config import FaultsConfig

__all__ = [
    "FaultRule",
    "FaultSpecError",
    "Faults",
    "InjectedFault",
    "parse_rule",
    "rule_from_kwargs",
    "default_message",
]


class FaultHost(Protocol):
    """What the engine needs from the control layer that owns it."""

    loop: asyncio.AbstractEventLoop

    def live_clients(self) -> Iterable[ClientConnection]: ...

    def admit_now(self, client: ClientConnection) -> None: ...

    def terminate(self, client: ClientConnection, exc: PgGuardError) -> None: ...

    def count_rejection(self, reason: str) -> None: ...


class Faults:
    """The fault rules of one pgguard, and the counts of what they did."""

    def __init__(self, host: FaultHost, config: FaultsConfig) -> None:
        self.host = host
        self.seed = config.seed
        self.rules: list[FaultRule] = []
        self.totals: Counter[str] = Counter()  # firings by kind since start
        self.active = False  # True while an admission rule is live: Control.admit's cheap test
        self._next_id = 1
        self._timers: dict[int, Any] = {}  # rule id -> asyncio.TimerHandle (terminate)
        self._config_rules: tuple[str, ...] = ()
        self.configure(config)

    # ---------------------------------------------------------------- rules

    def configure(self, config: FaultsConfig) -> None:
        """Apply ``[faults]`` (start and reload): config rules are replaced, others kept."""
        self.seed = config.seed
        if config.rules == self._config_rules:
            return
        self._config_rules = config.rules
        for rule in [r for r in self.rules if r.source == "config"]:
            self.remove(rule.id)
        for text in config.rules:
            self.add(parse_rule(text), source="config")

    def add(self, rule: FaultRule, *, source: str = "runtime") -> FaultRule:
        """Install ``rule``; a TERMINATE with no AFTER fires now. Returns the rule (with its id)."""
        rule.id, self._next_id = self._next_id, self._next_id + 1
        rule.source = source
        rule.fired = 0
        self._seed(rule)
        self.rules.append(rule)
        _log("fault_added", id=rule.id, rule=rule.describe(), source=source)
        if rule.kind == "terminate":
            rule.state = "pending"
            if rule.after > 0:
                loop = self.host.loop
                self._timers[rule.id] = loop.call_later(rule.after, self._terminate, rule)
            else:
                self._terminate(rule)
        else:
            rule.state = "live"
        self._update()
        return rule

    def remove(self, rule_id: int) -> bool:
        """Forget one rule (a pending TERMINATE never fires). Returns False if there is none."""
        for i, rule in enumerate(self.rules):
            if rule.id == rule_id:
                del self.rules[i]
                timer = self._timers.pop(rule_id, None)
                if timer is not None:
                    timer.cancel()
                self._update()
                return True
        return False

    def clear(self) -> int:
        """Forget every rule (pending TERMINATEs never fire); totals are kept. Returns how many."""
        count = len(self.rules)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.rules.clear()
        self._config_rules = ()
        self._update()
        if count:
            _log("faults_cleared", rules=count)
        return count

    def _seed(self, rule: FaultRule) -> None:
        """The rule's own draws: from ``SEED k``, else from ``[faults] seed`` and its text."""
        rule._rng = random.Random(rule.seed if rule.seed is not None else f"{self.seed}/{rule.describe()}")

    def snapshot(self) -> dict[str, Any]:
        """The rules as they stand, for a restarted worker to copy (``restore``). TERMINATE
        rules are left out: they act on the sessions of the moment, which the copy has none of."""
        rules = [
            {"id": r.id, "rule": r.describe(), "source": r.source, "fired": r.fired, "state": r.state}
            for r in self.rules
            if r.kind != "terminate"
        ]
        return {"rules": rules, "next_id": self._next_id, "config_rules": list(self._config_rules)}

    def restore(self, snapshot: dict[str, Any]) -> int:
        """Take another worker's rules (``snapshot``) in place of these: same ids, sources,
        firings and states, so ``CLEAR FAULT id`` means the same rule on every worker.
        Returns how many rules were taken. Raises ValueError or FaultSpecError on a bad one."""
        rules = []
        for item in snapshot["rules"]:
            rule = parse_rule(str(item["rule"]))
            rule.id, rule.source, rule.fired = int(item["id"]), str(item["source"]), int(item["fired"])
            rule.state = "spent" if item["state"] == "spent" else "live"
            self._seed(rule)
            rules.append(rule)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.rules = rules
        self._config_rules = tuple(str(t) for t in snapshot["config_rules"])
        self._next_id = max([int(snapshot["next_id"]), *(r.id + 1 for r in rules)])
        self._update()
        return len(rules)

    def _update(self) -> None:
        self.active = any(r.live and r.kind in ADMISSION_KINDS for r in self.rules)

    def rows(self) -> list[tuple[int, str, str, str, str, int, str, str]]:
        """One row per rule: id, kind, role, database, remaining, fired, state, rule."""
        return [row[:7] + (row[8],) for row in self.table()]

    def table(self) -> list[tuple[int, str, str, str, str, int, str, str, str]]:
        """SHOW FAULTS: ``rows()`` with the rule's source before its text."""
        out: list[tuple[int, str, str, str, str, int, str, str, str]] = []
        for r in self.rules:
            if r.kind == "terminate" or r.count is None:
                remaining = ""
            else:
                remaining = str(max(0, r.count - r.fired))
            out.append(
                (
                    r.id,
                    r.kind,
                    r.role or "",
                    r.database or "",
                    remaining,
                    r.fired,
                    r.state,
                    r.source,
                    r.describe(),
                )
            )
        return out

    # ------------------------------------------------------------ admission

    def intercept(self, client: ClientConnection) -> bool:
        """Let the first matching live admission rule act on ``client``; True if one did."""
        role, database = client.role, client.database
        for rule in self.rules:
            if (
                not rule.live
                or rule.kind not in ADMISSION_KINDS
                or not rule.matches(role, database)
            ):
                continue
            rng = rule._rng
            assert rng is not None
            if rule.fraction < 1.0 and rng.random() >= rule.fraction:
                continue
            self._fired(rule, role=role, database=database, client=client.peer)
            if rule.kind == "reject":
                self.host.count_rejection("fault")
                client.reject(rule.error(role, database, "53300"))
            elif rule.kind == "drop":
                if client.transport is not None:
                    client.transport.abort()
            else:
                a, b = rule.delay
                seconds = a if a == b else rng.uniform(a, b)
                self.host.loop.call_later(seconds, self._delayed, client)
            return True
        return False

    def _delayed(self, client: ClientConnection) -> None:
        if client.state is State.ADMITTING:  # not gone (or answered) while it waited
            self.host.admit_now(client)

    def _fired(self, rule: FaultRule, **fields: object) -> None:
        rule.fired += 1
        self.totals[rule.kind] += 1
        if rule.count is not None and rule.fired >= rule.count:
            rule.state = "spent"
            self._update()
        _log("fault", id=rule.id, kind=rule.kind, **fields)

    # -------------------------------------------------------------- actions

    def _terminate(self, rule: FaultRule) -> None:
        self._timers.pop(rule.id, None)
        victims = [
            c
            for c in list(self.host.live_clients())
            if c.state is State.ACTIVE and rule.matches(c.role, c.database)
        ]
        for client in victims:
            self._fired(rule, role=client.role, database=client.database, client=client.peer)
            self.host.terminate(client, rule.error(client.role, client.database, "57P01"))
        rule.state = "done"


def _log(event: str, **fields: object) -> None:
    log_event(logging.INFO, event, **fields)
