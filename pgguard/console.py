"""The console's commands: SHOW / SET / PAUSE / RESUME / RELOAD / KILL / INJECT, each a call into the control layer.

Commands are a list of ``Command`` entries, tried in order against each statement with its
surrounding blanks and trailing semicolons removed; every command of the console is defined
in this module, with the decorator::

    @command(r"SHOW\\s+FAULTS", columns=("id", "rule"), syntax="SHOW FAULTS",
             help="active fault rules")
    def _show_faults(session: Session, m: re.Match[str]) -> Result:
        return Result("SHOW", rows=[...])

The pattern is matched case-insensitively against the whole statement (``re.fullmatch``);
named groups reach the handler through ``m``; ``session.host`` is the running pgguard
(``Host``: its ``control``, its ``config``, ``reload``). ``columns`` is fixed per command (the
extended protocol describes a statement before running it); a command without rows leaves it
empty. ``syntax`` and ``help`` are what SHOW HELP lists. A command that changes something calls
``session.audit(action, **fields)``. A handler returns a ``Result`` (its command tag and rows)
or raises ``AdminCommandError``. Use ``parse_name`` for role and database names: SQL rules, so
``App`` means ``app`` and ``"App"`` means ``App``.

Changes made with ``SET`` live in the gate's run-time layer: they apply at once and last
until the next reload (SIGHUP or ``RELOAD``) or restart, which go back to the file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from . import scram
from .config import Config
from .control import Control
from .errors import AdminCommandError, AdminShutdown
from .limits import UNLIMITED, Policy
from .log import display
from .rules import FaultSpecError, parse_rule

__all__ = [
    "COMMANDS",
    "Command",
    "Host",
    "Result",
    "Session",
    "command",
    "config_rows",
    "find",
    "parse_name",
    "split_statements",
]

_ID: Final = r'(?:"(?:[^"]|"")+"|[^\s=;"]+)'  # an identifier, plain or double-quoted
_INT: Final = r"[+-]?\d+"


class Host(Protocol):
    """The running pgguard as the console sees it."""

    control: Control
    config: Config
    reload_error: str | None

    def reload(self) -> bool: ...


class Session(Protocol):
    """A logged-in console session, as a command sees it."""

    host: Host

    def audit(self, action: str, **fields: object) -> None: ...


# ------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class Result:
    """What a command returns: its CommandComplete tag and its rows (text or NULL)."""

    tag: str
    rows: Sequence[Sequence[str | None]] = ()


Handler = Callable[[Session, "re.Match[str]"], Result]


@dataclass(frozen=True, slots=True)
class Command:
    pattern: re.Pattern[str]
    columns: tuple[str, ...]
    handler: Handler
    syntax: str  # as SHOW HELP prints it; empty: not listed
    help: str


COMMANDS: list[Command] = []


def command(
    pattern: str, *, columns: Sequence[str] = (), syntax: str = "", help: str = ""
) -> Callable[[Handler], Handler]:
    """Register a console command (see the module docstring); ``syntax`` and ``help`` feed SHOW HELP."""

    def register(handler: Handler) -> Handler:
        compiled = re.compile(pattern, re.IGNORECASE | re.DOTALL)
        COMMANDS.append(Command(compiled, tuple(columns), handler, syntax, help))
        return handler

    return register


def parse_name(text: str) -> str:
    """An identifier as SQL reads it: ``"Quoted"`` kept exactly, anything else lower-cased."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text.lower()


def _limit_value(text: str) -> int:
    value = int(text)
    if value < UNLIMITED:
        raise AdminCommandError("22023", f"invalid limit {value}: use -1 (unlimited), 0 or more")
    return value


def find(statement: str) -> tuple[Command, re.Match[str]]:
    for cmd in COMMANDS:
        m = cmd.pattern.fullmatch(statement)
        if m is not None:
            return cmd, m
    word = statement.split(None, 1)[0] if statement.split() else statement
    raise AdminCommandError(
        "42601",
        f'syntax error at or near "{word}"',
        detail="pgguard admin console: SHOW HELP lists the commands",
    )


def split_statements(text: str) -> list[str]:
    """Split a query string on semicolons outside quotes; drop ``--`` comments and blanks."""
    out: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif ch == ";":
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    out.append("".join(current))
    return [s.strip() for s in out if s.strip()]


# ------------------------------------------------------------------ commands


def _fmt_seconds(seconds: float) -> str:
    return f"{max(seconds, 0.0):.1f}"


def _limit_text(value: int) -> str:
    return str(value)


@command(
    r"SHOW\s+LIMITS",
    syntax="SHOW LIMITS",
    columns=("kind", "name", "limit", "active", "waiting", "policy", "source"),
    help="every limit: its value (-1 unlimited), sessions active and waiting, policy, "
    "source (default, config, runtime, catalog)",
)
def _show_limits(session: Session, m: re.Match[str]) -> Result:
    rows = [
        (r.kind, display(r.name), _limit_text(r.limit), str(r.active), str(r.waiting), r.policy, r.source)
        for r in session.host.control.limit_rows()
    ]
    return Result("SHOW", rows)


@command(
    r"SHOW\s+CLIENTS",
    syntax="SHOW CLIENTS",
    columns=(
        "id", "address", "role", "database", "application_name", "state", "activity",
        "connected_for", "idle_for", "bytes_in", "bytes_out", "address_sessions",
    ),  # fmt: skip
    help="every client connection, longest idle first; activity as pg_stat_activity.state "
    "(idle, idle in transaction, active); seconds; bytes from/to the client; sessions the "
    "client's address holds now (client_address_max_connections; empty on the Unix socket)",
)
def _show_clients(session: Session, m: re.Match[str]) -> Result:
    return Result("SHOW", session.host.control.client_rows())


@command(
    r"SHOW\s+QUEUES",
    syntax="SHOW QUEUES",
    columns=("role", "database", "waiting", "oldest_wait", "next_timeout", "policy", "cluster_waiting"),
    help="one row per (role, database) wait queue: waiters, the oldest one's wait, the "
    "seconds until the next queue_timeout, policy; cluster_waiting: of the waiters, those "
    "waiting for a slot in the shared store ([cluster])",
)
def _show_queues(session: Session, m: re.Match[str]) -> Result:
    return Result("SHOW", session.host.control.queue_rows())


@command(
    r"SHOW\s+STATS",
    syntax="SHOW STATS",
    columns=("stat", "value"),
    help="counters since start: admissions, rejections by reason, queue timeouts, dial "
    "failures, idle timeouts, bytes, admission wait percentiles",
)
def _show_stats(session: Session, m: re.Match[str]) -> Result:
    return Result("SHOW", session.host.control.stats_rows())


@command(
    r"SHOW\s+CLUSTER",
    syntax="SHOW CLUSTER",
    columns=("instance", "last_heartbeat", "leases", "state"),
    help="[cluster]: every pgguard sharing the limits: seconds since its last heartbeat, "
    "sessions holding leases, state (self, live, expired; fallback while Redis is away)",
)
def _show_cluster(session: Session, m: re.Match[str]) -> Result:
    cluster = session.host.control.cluster
    if cluster is None:
        raise AdminCommandError("55000", "SHOW CLUSTER: [cluster] is not configured")
    return Result("SHOW", cluster.rows())


@command(
    r"SHOW\s+POOLS",
    syntax="SHOW POOLS",
    columns=("role", "database", "protocol", "warm", "in_use", "created", "reused", "reset_failures", "closed"),
    help="[pool]: per (role, database, protocol): warm idle server sessions, sessions in use, "
    "sessions created, hand-overs of a warm session, failed resets, sessions closed",
)
def _show_pools(session: Session, m: re.Match[str]) -> Result:
    pool = session.host.control.pool
    return Result("SHOW", [] if pool is None else pool.rows())


@command(
    r"SHOW\s+CONFIG",
    syntax="SHOW CONFIG",
    columns=("key", "value"),
    help="the configuration in force (from the file; SET changes show in SHOW LIMITS)",
)
def _show_config(session: Session, m: re.Match[str]) -> Result:
    return Result("SHOW", config_rows(session.host.config))


@command(
    r"SHOW\s+(?:HELP|COMMANDS)",
    columns=("command", "description"),
    syntax="SHOW HELP",
    help="this list",
)
def _show_help(session: Session, m: re.Match[str]) -> Result:
    return Result("SHOW", [(c.syntax, c.help) for c in COMMANDS if c.syntax])


@command(
    rf"SET\s+LIMIT\s+ROLE\s+(?P<name>{_ID})\s*=\s*(?P<value>{_INT})",
    syntax="SET LIMIT ROLE name = n",
    help="the role's limit until the next reload (-1 unlimited)",
)
def _set_role_limit(session: Session, m: re.Match[str]) -> Result:
    name, value = parse_name(m["name"]), _limit_value(m["value"])
    session.host.control.set_limit("role", name, value)
    session.audit("set_limit", role=name, value=value)
    return Result("SET")


@command(
    rf"SET\s+LIMIT\s+DATABASE\s+(?P<name>{_ID})\s*=\s*(?P<value>{_INT})",
    syntax="SET LIMIT DATABASE name = n",
    help="the database's limit until the next reload",
)
def _set_database_limit(session: Session, m: re.Match[str]) -> Result:
    name, value = parse_name(m["name"]), _limit_value(m["value"])
    session.host.control.set_limit("database", name, value)
    session.audit("set_limit", database=name, value=value)
    return Result("SET")


@command(
    rf"SET\s+LIMIT\s+TOTAL\s*=\s*(?P<value>{_INT})",
    syntax="SET LIMIT TOTAL = n",
    help="the total limit until the next reload",
)
def _set_total_limit(session: Session, m: re.Match[str]) -> Result:
    value = _limit_value(m["value"])
    session.host.control.set_limit("total", "", value)
    session.audit("set_limit", total=value)
    return Result("SET")


@command(
    rf"RESET\s+LIMIT\s+(?:(?P<kind>ROLE|DATABASE)\s+(?P<name>{_ID})|TOTAL)",
    syntax="RESET LIMIT ROLE name | DATABASE name | TOTAL",
    help="remove a SET LIMIT: the configured value applies again ([cluster]: on every pgguard)",
)
def _reset_limit(session: Session, m: re.Match[str]) -> Result:
    kind = (m["kind"] or "total").lower()
    name = parse_name(m["name"]) if m["name"] else ""
    session.host.control.reset_limit(kind, name)  # type: ignore[arg-type]
    session.audit("reset_limit", limit=kind, name=name)
    return Result("RESET")


@command(
    rf"SET\s+POLICY\s+ROLE\s+(?P<name>{_ID})\s*=\s*(?P<value>\w+)",
    syntax="SET POLICY ROLE name = queue|reject",
    help="the role's policy until the next reload",
)
def _set_role_policy(session: Session, m: re.Match[str]) -> Result:
    name, text = parse_name(m["name"]), m["value"].lower()
    try:
        policy = Policy(text)
    except ValueError:
        raise AdminCommandError("22023", f'invalid policy "{text}": use queue or reject') from None
    session.host.control.set_policy(name, policy)
    session.audit("set_policy", role=name, policy=policy.value)
    return Result("SET")


@command(
    r"RELOAD",
    syntax="RELOAD",
    help="re-read the config file (drops SET changes; [cluster]: the stored run-time limits "
    "too, on every pgguard); a bad file changes nothing",
)
def _reload(session: Session, m: re.Match[str]) -> Result:
    session.audit("reload")
    host = session.host
    if not host.reload():
        raise AdminCommandError(
            "F0000", f"reload failed, old configuration kept: {host.reload_error}"
        )
    return Result("RELOAD")


@command(r"PAUSE", syntax="PAUSE", help="admit nobody new (exempt roles excepted); arrivals queue")
def _pause(session: Session, m: re.Match[str]) -> Result:
    session.host.control.pause()
    session.audit("pause")
    return Result("PAUSE")


@command(r"RESUME", syntax="RESUME", help="admit again; waiters that fit are admitted at once")
def _resume(session: Session, m: re.Match[str]) -> Result:
    session.host.control.resume()
    session.audit("resume")
    return Result("RESUME")


@command(
    r"KILL\s+CLIENT\s+(?P<id>\d+)",
    syntax="KILL CLIENT id",
    help="close that client (FATAL 57P01); its slot frees when the server "
    "has closed the session",
)
def _kill_client(session: Session, m: re.Match[str]) -> Result:
    client_id = int(m["id"])
    session.audit("kill", id=client_id)
    if not session.host.control.kill(client_id, AdminShutdown()):
        raise AdminCommandError("42704", f"no client with id {client_id}")
    return Result("KILL")


@command(
    r"INJECT\s+(?P<rule>.+)",
    syntax="INJECT rule",
    columns=("id", "rule", "state", "fired"),
    help="add a fault rule: REJECT | DELAY t[..t2] | DROP [NEXT n] [FRACTION p] [ROLE r] "
    "[DATABASE d] [SQLSTATE s] [MESSAGE m] [SEED k]; TERMINATE [ROLE r] [AFTER t]",
)
def _inject(session: Session, m: re.Match[str]) -> Result:
    try:
        spec = parse_rule(m["rule"])
    except FaultSpecError as exc:
        raise AdminCommandError("42601", str(exc)) from None
    rule = session.host.control.inject(spec, source="console")
    session.audit("inject", id=rule.id, rule=rule.describe())
    return Result("INJECT", rows=[(str(rule.id), rule.describe(), rule.state, str(rule.fired))])


@command(
    r"SHOW\s+FAULTS",
    syntax="SHOW FAULTS",
    columns=("id", "kind", "role", "database", "remaining", "fired", "state", "source", "rule"),
    help="fault rules (until CLEAR FAULTS): what each matches, how often it fired, live or spent",
)
def _show_faults(session: Session, m: re.Match[str]) -> Result:
    rows = [tuple(str(v) for v in row) for row in session.host.control.fault_rows()]
    return Result("SHOW", rows=rows)


@command(r"CLEAR\s+FAULTS", syntax="CLEAR FAULTS", help="remove every fault rule")
def _clear_faults(session: Session, m: re.Match[str]) -> Result:
    count = session.host.control.clear_faults()
    session.audit("clear_faults", rules=count)
    return Result("CLEAR")


@command(r"CLEAR\s+FAULT\s+(?P<id>\d+)", syntax="CLEAR FAULT id", help="remove one fault rule")
def _clear_fault(session: Session, m: re.Match[str]) -> Result:
    rule_id = int(m["id"])
    if not session.host.control.remove_fault(rule_id):
        raise AdminCommandError("42704", f"no fault rule {rule_id}")
    session.audit("clear_fault", id=rule_id)
    return Result("CLEAR")


# Drivers wrap statements in transactions (psycopg without autocommit); the console has none.
@command(r"(?P<word>BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT)(?:\s+\w+)?")
def _transaction(session: Session, m: re.Match[str]) -> Result:
    word = m["word"].split()[0].upper()
    tag = {"START": "BEGIN", "END": "COMMIT", "ABORT": "ROLLBACK"}.get(word, word)
    return Result(tag)


# --------------------------------------------------------------- SHOW CONFIG


def config_rows(cfg: Config) -> list[tuple[str, str]]:
    """Every key in force as (dotted key, value); secrets masked."""
    rows: list[tuple[str, str]] = [("file", cfg.path)]
    for section in ("server", "backend", "limits", "admin", "metrics", "errors", "log", "tls"):
        obj = getattr(cfg, section, None)
        if obj is not None and dataclasses.is_dataclass(obj):
            rows += _dataclass_rows(section, obj)
    for name, role in sorted(cfg.roles.items()):
        rows += _dataclass_rows(f"roles.{name}", role, skip_unset=True)
    for name, db in sorted(cfg.databases.items()):
        rows += _dataclass_rows(f"databases.{name}", db)
    return rows


def _dataclass_rows(prefix: str, obj: object, *, skip_unset: bool = False) -> list[tuple[str, str]]:
    rows = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if skip_unset and value is None:
            continue
        key = f"{prefix}.{f.name}"
        rows.append((key, _config_value(key, value)))
    return rows


def _config_value(key: str, value: object) -> str:
    if value is None:
        return ""
    if key == "admin.password":
        return "(SCRAM-SHA-256 verifier)" if scram.is_verifier(str(value)) else "(plain text)"
    if key.endswith("dsn"):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1********@", str(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value)
