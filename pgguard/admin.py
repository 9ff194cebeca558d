"""The admin console: database ``pgguard`` on pgguard's own port; SCRAM login, then SHOW / SET / RELOAD / ...

Reaching it
-----------
A client whose StartupMessage names database ``pgguard`` (or user ``pgguard`` without a
database, since the database defaults to the user) is routed here instead of to the server,
when ``[admin] users`` is non-empty. ``Server.open_admin`` moves the socket from its
``ClientConnection`` to an ``AdminSession`` with ``transport.set_protocol``; the session is
never counted against any limit and holds no backend connection.

Authentication is pgguard's own: SCRAM-SHA-256 against ``[admin] password`` (a verifier, or
a plain password turned into one in memory), or ``trust`` when configured, and then only
from a loopback address. Every refusal is PostgreSQL's ``FATAL 28P01 password
authentication failed for user "NAME"``; a user not in ``[admin] users`` goes through the
same SCRAM exchange and fails at the same point, so the console reveals nothing.

Protocol
--------
After AuthenticationOk the session sends ParameterStatus (server_version "15.0 (pgguard)",
UTF8, ISO dates), BackendKeyData and ReadyForQuery, then serves:

- the simple query protocol ('Q'): one or more ``;``-separated commands, each answered
  with RowDescription/DataRow/CommandComplete, then ReadyForQuery (psql, ``conn.execute``);
- a minimal extended protocol (Parse/Bind/Describe/Execute/Sync/Close/Flush) for commands
  without parameters, so ``asyncpg``'s ``fetch`` and ``psycopg``'s ``cursor.execute`` work;
  after an error, messages are skipped until Sync, as PostgreSQL does;
- Terminate ('X'). Any other message gets ErrorResponse 0A000 and the session goes on.

Every column is of type ``text``. A failing command gets an ErrorResponse with severity
ERROR (42601 for an unknown command) and the session stays usable.

Command registry
----------------
Commands are a list of ``Command`` entries, tried in order against each statement with its
surrounding blanks and trailing semicolons removed. Register one with the decorator::

    @command(r"SHOW\\s+FAULTS", columns=("id", "rule"), syntax="SHOW FAULTS",
             help="active fault rules")
    def _show_faults(session: AdminSession, m: re.Match[str]) -> Result:
        return Result("SHOW", rows=[...])

The pattern is matched case-insensitively against the whole statement (``re.fullmatch``);
named groups reach the handler through ``m``; ``session.server`` is the ``Server``.
``columns`` is fixed per command (the extended protocol describes a statement before running
it); a command without rows leaves it empty. ``syntax`` and ``help`` are what SHOW HELP
lists. Call ``session.audit(action, **fields)`` in a command that changes something.
A handler returns a ``Result`` (its command tag and rows) or raises ``AdminCommandError``.
Modules that add commands (``faults.py``: ``INJECT ...``, ``SHOW FAULTS``, ``CLEAR FAULTS``)
register them at import time; ``Server`` imports them. Use ``parse_name`` for role and
database names: SQL rules, so ``App`` means ``app`` and ``"App"`` means ``App``.

Changes made with ``SET`` live in the gate's run-time layer: they apply at once and last
until the next reload (SIGHUP or ``RELOAD``) or restart, which go back to the file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import ipaddress
import logging
import re
import secrets
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from . import scram, wire
from .errors import (
    AdminCommandError,
    AdminShutdown,
    AuthenticationFailed,
    PgGuardError,
    ProtocolViolation,
)
from .limits import UNLIMITED, Policy
from .log import display, log
from .log import log_event as _log_event

if TYPE_CHECKING:
    from .config import AdminConfig, Config
    from .server import Server

__all__ = [
    "ADMIN_DATABASE",
    "AdminSession",
    "Command",
    "Result",
    "COMMANDS",
    "command",
    "parse_name",
    "admin_verifier",
    "check_admin_config",
    "add_parser",
]

# PostgreSQL's words for a frontend message it cannot parse (pqformat.c).
INVALID_MESSAGE_FORMAT: Final = "invalid message format"

ADMIN_DATABASE: Final = "pgguard"
SERVER_VERSION: Final = "15.0 (pgguard)"  # libpq and asyncpg parse the leading "15.0"
# Sent after AuthenticationOk, as PostgreSQL does; client libraries read these.
PARAMETERS: Final = (
    ("server_version", SERVER_VERSION),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
    ("TimeZone", "UTC"),
    ("application_name", ""),
)

# Authentication request codes (protocol-message-formats: AuthenticationSASL & co.).
_AUTH_SASL: Final = 10
_AUTH_SASL_CONTINUE: Final = 11
_AUTH_SASL_FINAL: Final = 12
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_ID: Final = r'(?:"(?:[^"]|"")+"|[^\s=;"]+)'  # an identifier, plain or double-quoted
_INT: Final = r"[+-]?\d+"


# ------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class Result:
    """What a command returns: its CommandComplete tag and its rows (text or NULL)."""

    tag: str
    rows: Sequence[Sequence[str | None]] = ()


Handler = Callable[["AdminSession", "re.Match[str]"], Result]


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


def _find(statement: str) -> tuple[Command, re.Match[str]]:
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
def _show_limits(session: AdminSession, m: re.Match[str]) -> Result:
    rows = [
        (r.kind, display(r.name), _limit_text(r.limit), str(r.active), str(r.waiting), r.policy, r.source)
        for r in session.server.gate.limit_rows()
    ]
    return Result("SHOW", rows)


@command(
    r"SHOW\s+CLIENTS",
    syntax="SHOW CLIENTS",
    columns=(
        "id", "address", "role", "database", "application_name", "state", "activity",
        "connected_for", "idle_for", "bytes_in", "bytes_out",
    ),  # fmt: skip
    help="every client connection, longest idle first; activity as pg_stat_activity.state "
    "(idle, idle in transaction, active); seconds; bytes from/to the client",
)
def _show_clients(session: AdminSession, m: re.Match[str]) -> Result:
    server = session.server
    now, mono = time.time(), time.monotonic()
    entries: list[tuple[float, tuple[str, ...]]] = []
    for client in server.clients.values():
        startup = client.startup
        idle = mono - client.last_active
        entries.append(
            (
                idle,
                (
                    str(client.id),
                    client.peer,
                    display(client.role),
                    display(client.database),
                    display(startup.application_name) if startup else "",
                    client.state.value,
                    _ACTIVITY.get(client.idle_status, "active") if client.state.value == "active" else "",
                    _fmt_seconds(now - client.connected_at),
                    _fmt_seconds(idle),
                    str(client.bytes_in),
                    str(client.bytes_out),
                ),
            )
        )
    for admin in server.admin_sessions.values():
        idle = mono - admin.last_active
        entries.append(
            (
                idle,
                (
                    str(admin.id),
                    admin.peer,
                    display(admin.user),
                    ADMIN_DATABASE,
                    display(admin.startup.application_name),
                    "admin",
                    "",
                    _fmt_seconds(now - admin.connected_at),
                    _fmt_seconds(idle),
                    str(admin.bytes_in),
                    str(admin.bytes_out),
                ),
            )
        )
    entries.sort(key=lambda e: (-e[0], int(e[1][0])))
    return Result("SHOW", [row for _, row in entries])


# What pg_stat_activity.state would say, from the last ReadyForQuery status (0: a query runs).
_ACTIVITY: Final = {
    ord("I"): "idle",
    ord("T"): "idle in transaction",
    ord("E"): "idle in transaction (aborted)",
}


@command(
    r"SHOW\s+QUEUES",
    syntax="SHOW QUEUES",
    columns=("role", "database", "waiting", "oldest_wait", "next_timeout", "policy"),
    help="one row per (role, database) wait queue: waiters, the oldest one's wait and the "
    "seconds until the next queue_timeout",
)
def _show_queues(session: AdminSession, m: re.Match[str]) -> Result:
    gate = session.server.gate
    now = session.server.loop.time()
    queues: dict[tuple[str, str], list[float]] = {}
    for waiter in gate.waiters():
        q = queues.setdefault((waiter.role, waiter.database), [0, 0.0, float("inf")])
        q[0] += 1
        q[1] = max(q[1], now - waiter.arrived)
        q[2] = min(q[2], waiter.deadline - now)
    rows = [
        (
            display(role),
            display(db),
            str(int(n)),
            _fmt_seconds(oldest),
            _fmt_seconds(nxt),
            gate.role_policy(role).value,
        )
        for (role, db), (n, oldest, nxt) in sorted(queues.items())
    ]
    return Result("SHOW", rows)


# Rejection reasons always listed, even at zero (others appear once counted).
_REASONS: Final = (
    "limit",
    "max_queue",
    "max_queue_total",
    "max_client_connections",
    "queue_timeout",
    "shutdown",
    "fault",
)


@command(
    r"SHOW\s+STATS",
    syntax="SHOW STATS",
    columns=("stat", "value"),
    help="counters since start: admissions, rejections by reason, queue timeouts, dial "
    "failures, idle timeouts, bytes, admission wait percentiles",
)
def _show_stats(session: AdminSession, m: re.Match[str]) -> Result:
    server = session.server
    st = server.stats
    gate = server.gate
    bytes_in, bytes_out = server.bytes_relayed()
    rows: list[tuple[str, str]] = [
        ("uptime_seconds", _fmt_seconds(time.time() - server.started_at)),
        ("paused", "yes" if gate.paused else "no"),
        ("draining", "yes" if server.draining else "no"),
        ("sessions_active", str(gate.total_active)),
        ("clients_waiting", str(gate.total_waiting)),
        ("clients_connected", str(len(server.clients))),
        ("admissions", str(st.admissions)),
        ("queued", str(st.queued)),
        ("rejections", str(sum(st.rejections.values()))),
    ]
    reasons = list(_REASONS) + sorted(set(st.rejections) - set(_REASONS))
    rows += [(f"rejections_{reason}", str(st.rejections.get(reason, 0))) for reason in reasons]
    rows += [
        ("queue_timeouts", str(st.queue_timeouts)),
        ("dial_failures", str(st.dial_failures)),
        ("fd_exhausted", str(st.fd_exhausted)),
        ("backend_errors", str(st.backend_errors)),
        ("idle_timeouts", str(st.idle_timeouts)),
        ("kills", str(st.kills)),
        ("cancels_forwarded", str(st.cancels_forwarded)),
        ("cancels_dropped", str(st.cancels_dropped)),
        ("bytes_in", str(bytes_in)),
        ("bytes_out", str(bytes_out)),
        ("reloads", str(st.reloads)),
        ("reload_failures", str(st.reload_failures)),
    ]
    ordered = sorted(st.waits)
    for label, p in (("p50", 50), ("p90", 90), ("p99", 99)):
        value = ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0
        rows.append((f"wait_{label}_seconds", f"{value:.3f}"))
    rows.append(("wait_max_seconds", f"{ordered[-1] if ordered else 0.0:.3f}"))
    return Result("SHOW", rows)


@command(
    r"SHOW\s+CONFIG",
    syntax="SHOW CONFIG",
    columns=("key", "value"),
    help="the configuration in force (from the file; SET changes show in SHOW LIMITS)",
)
def _show_config(session: AdminSession, m: re.Match[str]) -> Result:
    return Result("SHOW", config_rows(session.server.config))


@command(
    r"SHOW\s+(?:HELP|COMMANDS)",
    columns=("command", "description"),
    syntax="SHOW HELP",
    help="this list",
)
def _show_help(session: AdminSession, m: re.Match[str]) -> Result:
    return Result("SHOW", [(c.syntax, c.help) for c in COMMANDS if c.syntax])


@command(
    rf"SET\s+LIMIT\s+ROLE\s+(?P<name>{_ID})\s*=\s*(?P<value>{_INT})",
    syntax="SET LIMIT ROLE name = n",
    help="the role's limit until the next reload (-1 unlimited)",
)
def _set_role_limit(session: AdminSession, m: re.Match[str]) -> Result:
    name, value = parse_name(m["name"]), _limit_value(m["value"])
    server = session.server
    server.admit_waiters(server.gate.set_role_limit(name, value))
    session.audit("set_limit", role=name, value=value)
    return Result("SET")


@command(
    rf"SET\s+LIMIT\s+DATABASE\s+(?P<name>{_ID})\s*=\s*(?P<value>{_INT})",
    syntax="SET LIMIT DATABASE name = n",
    help="the database's limit until the next reload",
)
def _set_database_limit(session: AdminSession, m: re.Match[str]) -> Result:
    name, value = parse_name(m["name"]), _limit_value(m["value"])
    server = session.server
    server.admit_waiters(server.gate.set_database_limit(name, value))
    session.audit("set_limit", database=name, value=value)
    return Result("SET")


@command(
    rf"SET\s+LIMIT\s+TOTAL\s*=\s*(?P<value>{_INT})",
    syntax="SET LIMIT TOTAL = n",
    help="the total limit until the next reload",
)
def _set_total_limit(session: AdminSession, m: re.Match[str]) -> Result:
    value = _limit_value(m["value"])
    server = session.server
    server.admit_waiters(server.gate.set_total_limit(value))
    session.audit("set_limit", total=value)
    return Result("SET")


@command(
    rf"SET\s+POLICY\s+ROLE\s+(?P<name>{_ID})\s*=\s*(?P<value>\w+)",
    syntax="SET POLICY ROLE name = queue|reject",
    help="the role's policy until the next reload",
)
def _set_role_policy(session: AdminSession, m: re.Match[str]) -> Result:
    name, text = parse_name(m["name"]), m["value"].lower()
    try:
        policy = Policy(text)
    except ValueError:
        raise AdminCommandError("22023", f'invalid policy "{text}": use queue or reject') from None
    server = session.server
    server.admit_waiters(server.gate.set_role_policy(name, policy))
    session.audit("set_policy", role=name, policy=policy.value)
    return Result("SET")


@command(
    r"RELOAD",
    syntax="RELOAD",
    help="re-read the config file (drops SET changes); a bad file changes nothing",
)
def _reload(session: AdminSession, m: re.Match[str]) -> Result:
    session.audit("reload")
    server = session.server
    if not server.reload():
        raise AdminCommandError(
            "F0000", f"reload failed, old configuration kept: {server.reload_error}"
        )
    return Result("RELOAD")


@command(r"PAUSE", syntax="PAUSE", help="admit nobody new (exempt roles excepted); arrivals queue")
def _pause(session: AdminSession, m: re.Match[str]) -> Result:
    session.server.gate.pause()
    session.audit("pause")
    return Result("PAUSE")


@command(r"RESUME", syntax="RESUME", help="admit again; waiters that fit are admitted at once")
def _resume(session: AdminSession, m: re.Match[str]) -> Result:
    server = session.server
    server.admit_waiters(server.gate.resume())
    session.audit("resume")
    return Result("RESUME")


@command(
    r"KILL\s+CLIENT\s+(?P<id>\d+)",
    syntax="KILL CLIENT id",
    help="close that client (FATAL 57P01); its slot frees when the server "
    "has closed the session",
)
def _kill_client(session: AdminSession, m: re.Match[str]) -> Result:
    server = session.server
    client_id = int(m["id"])
    session.audit("kill", id=client_id)
    client = server.clients.get(client_id)
    if client is not None:
        server.kill(client, AdminShutdown())
        server.stats.kills += 1
        return Result("KILL")
    admin = server.admin_sessions.get(client_id)
    if admin is not None:
        admin.terminate(AdminShutdown())
        return Result("KILL")
    raise AdminCommandError("42704", f"no client with id {client_id}")


# Drivers wrap statements in transactions (psycopg without autocommit); the console has none.
@command(r"(?P<word>BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT)(?:\s+\w+)?")
def _transaction(session: AdminSession, m: re.Match[str]) -> Result:
    word = m["word"].split()[0].upper()
    tag = {"START": "BEGIN", "END": "COMMIT", "ABORT": "ROLLBACK"}.get(word, word)
    return Result(tag)


# --------------------------------------------------------------- SHOW CONFIG


def config_rows(cfg: Config) -> list[tuple[str, str]]:
    """Every key in force as (dotted key, value); secrets masked."""
    rows: list[tuple[str, str]] = [("file", cfg.path)]
    for section in ("server", "backend", "limits", "admin", "metrics", "errors", "tls"):
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


# ------------------------------------------------------------ authentication

_derived: dict[str, scram.Verifier] = {}


def admin_verifier(admin: AdminConfig) -> scram.Verifier | None:
    """The verifier for ``[admin] password`` (derived once, in memory, from a plain password)."""
    password = admin.password
    if not password:
        return None
    if scram.is_verifier(password):
        return scram.parse_verifier(password)
    verifier = _derived.get(password)
    if verifier is None:
        _derived.clear()  # keep only the newest plain password's verifier
        verifier = _derived[password] = scram.make_verifier(password)
    return verifier


def check_admin_config(cfg: Config, log_event: Callable[..., None]) -> None:
    """Log what an operator should know about ``[admin]`` (at start and on reload)."""
    admin = cfg.admin
    if not admin.users:
        return
    if admin.auth == "trust":
        log_event(logging.WARNING, "admin_trust", users=",".join(admin.users), note="loopback only")
    elif not admin.password:
        log_event(logging.WARNING, "admin_no_password", note="nobody can log in to the console")
    elif not scram.is_verifier(admin.password):
        log_event(
            logging.WARNING,
            "admin_plain_password",
            note="store a verifier instead: pgguard hash-password",
        )
        admin_verifier(admin)  # derive now rather than during the first login


def _is_loopback(transport: asyncio.BaseTransport) -> bool:
    addr = transport.get_extra_info("peername")
    if not isinstance(addr, tuple):
        return addr is not None  # a Unix socket path
    try:
        ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


# -------------------------------------------------------------------- session


@dataclass(slots=True)
class _Prepared:
    """A parsed statement or bound portal of the extended protocol (``command`` None: empty)."""

    command: Command | None
    match: re.Match[str] | None
    text: str = ""


@dataclass
class _Auth:
    exchange: scram.ScramServer | None = None
    step: int = 0  # 0: waiting for SASLInitialResponse, 1: for SASLResponse


class AdminSession(asyncio.Protocol):
    """One admin console connection, after its StartupMessage."""

    def __init__(
        self,
        server: Server,
        transport: asyncio.Transport,
        startup: wire.StartupMessage,
        *,
        client_id: int,
        peer: str,
        connected_at: float,
    ) -> None:
        self.server = server
        self.transport = transport
        self.startup = startup
        self.user = startup.user
        self.id = client_id
        self.peer = peer
        self.connected_at = connected_at
        self.last_active = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.authenticated = False
        self._reader = wire.MessageReader()
        self._auth = _Auth()
        self._timer: asyncio.TimerHandle | None = None
        self._statements: dict[str, _Prepared] = {}
        self._portals: dict[str, _Prepared] = {}
        self._skip_until_sync = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<admin {self.id} {self.peer} {display(self.user)}>"

    # -------------------------------------------------------------- lifecycle

    def begin(self, early: bytes) -> None:
        """Start authentication; ``early`` is whatever the client sent after its StartupMessage."""
        admin = self.server.config.admin
        allowed = self.user in admin.users
        if admin.auth == "trust":
            if allowed and _is_loopback(self.transport):
                self._login_ok()
            else:
                self._login_failed("trust only from loopback" if allowed else "not an admin user")
            if early and not self._closed:
                self.data_received(early)
            return
        timeout = self.server.config.server.client_login_timeout
        self._timer = self.server.loop.call_later(timeout, self._login_timeout)
        real = admin_verifier(admin)
        self._auth.exchange = scram.ScramServer(
            self.user,
            real if allowed else None,
            mock_iterations=real.iterations if real else scram.DEFAULT_ITERATIONS,
        )
        mechanisms = scram.MECHANISM.encode() + b"\x00\x00"
        self._send(wire.build_message(b"R", _INT32.pack(_AUTH_SASL) + mechanisms))
        if early:
            self.data_received(early)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # set_protocol hands us an established transport; begin() starts the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.admin_closed(self)

    def eof_received(self) -> bool | None:
        return None

    def terminate(self, exc: PgGuardError) -> None:
        """Close the session with a FATAL ErrorResponse (KILL CLIENT, shutdown)."""
        self._send_error(exc)
        self._close()

    def _close(self) -> None:
        self._closed = True
        if not self.transport.is_closing():
            self.transport.close()

    def _login_timeout(self) -> None:
        self._timer = None
        if not self.authenticated:
            log.debug("event=admin_login_timeout client=%s", self.peer)
            self._close()

    # ------------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self.bytes_in += len(data)
        self.last_active = time.monotonic()
        self._reader.feed(data)
        try:
            while not self._closed:
                message = self._reader.next_message()
                if not isinstance(message, tuple):  # NEED_DATA
                    return
                tag, body = message
                if not self.authenticated:
                    self._auth_message(tag, body)
                else:
                    self._message(tag, body)
        except PgGuardError as exc:  # a protocol violation: FATAL, as PostgreSQL does
            self.terminate(exc)
        except Exception:  # the per-connection boundary
            log.exception("event=internal_error client=%r", self)
            self.terminate(PgGuardError("pgguard internal error"))

    def _auth_message(self, tag: bytes, body: bytes) -> None:
        exchange = self._auth.exchange
        if tag != b"p" or exchange is None:
            raise ProtocolViolation(
                f"expected SASL response, got message type {tag.decode('latin-1')!r}"
            )
        if self._auth.step == 0:
            mech_end = body.find(b"\x00")
            if mech_end < 0 or len(body) < mech_end + 5:
                raise ProtocolViolation("malformed SASLInitialResponse message")
            mechanism = body[:mech_end].decode("utf-8", "replace")
            if mechanism != scram.MECHANISM:
                raise ProtocolViolation(
                    "client selected an invalid SASL authentication mechanism"
                )
            (length,) = _INT32.unpack_from(body, mech_end + 1)
            data = body[mech_end + 5 :]
            if length != len(data):
                raise ProtocolViolation("malformed SASLInitialResponse message")
            server_first = exchange.first(data)
            self._auth.step = 1
            self._send(wire.build_message(b"R", _INT32.pack(_AUTH_SASL_CONTINUE) + server_first))
            return
        try:
            server_final = exchange.final(body)
        except AuthenticationFailed:
            reason = "wrong password" if self.user in self.server.config.admin.users else (
                "not an admin user"
            )
            self._login_failed(reason)
            return
        self._send(wire.build_message(b"R", _INT32.pack(_AUTH_SASL_FINAL) + server_final))
        self._login_ok()

    def _login_ok(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.authenticated = True
        self._auth = _Auth()
        out = [wire.build_authentication_ok()]
        out += [wire.build_parameter_status(k, v) for k, v in PARAMETERS if k != "application_name"]
        out.append(wire.build_parameter_status("application_name", self.startup.application_name))
        out.append(wire.build_backend_key_data(self.id, secrets.token_bytes(4)))
        out.append(wire.build_ready_for_query())
        self._send(b"".join(out))
        _log_event(logging.INFO, "admin_login", user=self.user, client=self.peer)

    def _login_failed(self, reason: str) -> None:
        _log_event(
            logging.WARNING, "admin_login_failed", user=self.user, client=self.peer, reason=reason
        )
        self.terminate(AuthenticationFailed(self.user))

    # -------------------------------------------------------------- commands

    def _message(self, tag: bytes, body: bytes) -> None:
        if tag == b"Q":
            self._simple_query(_cstring(body, 0)[0])
        elif tag == b"X":
            self._close()
        elif tag in b"PBDECSH" and len(tag) == 1:
            self._extended(tag, body)
        else:
            self._send_error(
                AdminCommandError(
                    "0A000",
                    f"message type {tag.decode('latin-1')!r} is not supported by the "
                    "pgguard admin console",
                )
            )
            self._send(wire.build_ready_for_query())

    def _simple_query(self, text: str) -> None:
        statements = split_statements(text)
        out: list[bytes] = []
        if not statements:
            out.append(wire.build_empty_query_response())
        for statement in statements:
            try:
                cmd, m = _find(statement)
                result = self._run(cmd, m)
            except AdminCommandError as exc:
                out.append(_error_bytes(exc))
                break  # like PostgreSQL: an error ends the query string
            if cmd.columns:
                out.append(wire.build_row_description(cmd.columns))
            out += [wire.build_data_row(row) for row in result.rows]
            out.append(_command_complete(result))
        out.append(wire.build_ready_for_query())
        self._send(b"".join(out))

    def _run(self, cmd: Command, m: re.Match[str]) -> Result:
        try:
            return cmd.handler(self, m)
        except AdminCommandError:
            raise
        except PgGuardError as exc:
            raise AdminCommandError(exc.sqlstate, exc.message, detail=exc.detail) from None
        except Exception:
            log.exception("event=admin_command_error client=%r command=%r", self, m.string)
            raise AdminCommandError("XX000", "pgguard internal error running the command") from None

    # ---------------------------------------------------- extended protocol

    def _extended(self, tag: bytes, body: bytes) -> None:
        if tag == b"S":
            self._skip_until_sync = False
            self._send(wire.build_ready_for_query())
            return
        if tag == b"H" or self._skip_until_sync:
            return
        try:
            if tag == b"P":
                self._parse(body)
            elif tag == b"B":
                self._bind(body)
            elif tag == b"D":
                self._describe(body)
            elif tag == b"E":
                self._execute(body)
            elif tag == b"C":
                kind, name = body[:1], _cstring(body, 1)[0]
                (self._statements if kind == b"S" else self._portals).pop(name, None)
                self._send(wire.build_message(b"3"))
        except AdminCommandError as exc:
            self._send_error(exc)
            self._skip_until_sync = True
        except (struct.error, IndexError, UnicodeDecodeError):
            # PostgreSQL's answer to a message it cannot read: FATAL 08P01, session closed.
            raise ProtocolViolation(INVALID_MESSAGE_FORMAT) from None

    def _parse(self, body: bytes) -> None:
        name, pos = _cstring(body, 0)
        query, pos = _cstring(body, pos)
        statements = split_statements(query)
        if len(statements) > 1:
            raise AdminCommandError("42601", "cannot insert multiple commands into a prepared statement")
        if not statements:
            prepared = _Prepared(None, None)
        else:
            cmd, m = _find(statements[0])
            prepared = _Prepared(cmd, m, statements[0])
        self._statements[name] = prepared
        self._send(wire.build_message(b"1"))

    def _bind(self, body: bytes) -> None:
        portal, pos = _cstring(body, 0)
        name, pos = _cstring(body, pos)
        (nformats,) = _INT16.unpack_from(body, pos)
        pos += 2 + 2 * nformats
        (nparams,) = _INT16.unpack_from(body, pos)
        prepared = self._statements.get(name)
        if prepared is None:
            raise AdminCommandError("26000", f'prepared statement "{name}" does not exist')
        if nparams:
            raise AdminCommandError(
                "08P01",
                f'bind message supplies {nparams} parameters, but prepared statement "{name}" '
                "requires 0",
            )
        # Every column is text, whose binary form is its text form: result formats need no care.
        self._portals[portal] = prepared
        self._send(wire.build_message(b"2"))

    def _describe(self, body: bytes) -> None:
        kind, name = body[:1], _cstring(body, 1)[0]
        if kind == b"S":
            prepared = self._statements.get(name)
            if prepared is None:
                raise AdminCommandError("26000", f'prepared statement "{name}" does not exist')
            self._send(wire.build_message(b"t", _INT16.pack(0)))
        else:
            prepared = self._portals.get(name)
            if prepared is None:
                raise AdminCommandError("34000", f'portal "{name}" does not exist')
        if prepared.command is not None and prepared.command.columns:
            self._send(wire.build_row_description(prepared.command.columns))
        else:
            self._send(wire.build_message(b"n"))  # NoData

    def _execute(self, body: bytes) -> None:
        name = _cstring(body, 0)[0]
        prepared = self._portals.get(name)
        if prepared is None:
            raise AdminCommandError("34000", f'portal "{name}" does not exist')
        if prepared.command is None or prepared.match is None:
            self._send(wire.build_empty_query_response())
            return
        result = self._run(prepared.command, prepared.match)
        out = [wire.build_data_row(row) for row in result.rows]
        out.append(_command_complete(result))
        self._send(b"".join(out))

    # ----------------------------------------------------------------- output

    def audit(self, action: str, **fields: object) -> None:
        """Log a state-changing command: one line naming who did what."""
        _log_event(
            logging.INFO, "admin_command", action=action, user=self.user, client=self.peer, **fields
        )

    def _send(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.bytes_out += len(data)
            self.transport.write(data)

    def _send_error(self, exc: PgGuardError) -> None:
        self._send(_error_bytes(exc))


def _error_bytes(exc: PgGuardError) -> bytes:
    return wire.build_error_response(exc.sqlstate, exc.message, severity=exc.severity, detail=exc.detail)


def _command_complete(result: Result) -> bytes:
    tag = result.tag
    if tag == "SHOW" and result.rows:
        tag = f"SHOW {len(result.rows)}"
    return wire.build_command_complete(tag)


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    """The NUL-terminated UTF-8 string at ``pos`` and the position after it.

    Raises ProtocolViolation (PostgreSQL's "invalid message format") when there is none.
    """
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation(INVALID_MESSAGE_FORMAT)
    try:
        return body[pos:end].decode("utf-8"), end + 1
    except UnicodeDecodeError:
        raise ProtocolViolation(INVALID_MESSAGE_FORMAT) from None


# ----------------------------------------------------------------------- CLI


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pgguard hash-password``."""
    p = sub.add_parser(
        "hash-password",
        help="print a SCRAM-SHA-256 verifier for [admin] password",
        description="Print the SCRAM-SHA-256 verifier of a password, in the format PostgreSQL "
        "stores, for [admin] password. Reads the password from the terminal (twice) or from "
        "the first line of standard input.",
    )
    p.add_argument("password", nargs="?", help="the password (better: type it when asked)")
    p.add_argument(
        "--iterations",
        type=int,
        default=scram.DEFAULT_ITERATIONS,
        help="PBKDF2 iterations (default: %(default)s, as PostgreSQL)",
    )
    p.set_defaults(func=_cmd_hash_password)


def _cmd_hash_password(args: argparse.Namespace) -> int:
    password = args.password
    if password is None:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                print("pgguard: passwords differ", file=sys.stderr)
                return 2
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("pgguard: empty password", file=sys.stderr)
        return 2
    if args.iterations < 1:
        print("pgguard: --iterations must be at least 1", file=sys.stderr)
        return 2
    print(scram.make_verifier(password, iterations=args.iterations))
    return 0

