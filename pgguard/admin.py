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

Commands
--------
The commands themselves are in ``console.py`` (each a call into the control layer); this
module is the protocol session that reads them and writes their results. A session given a
``Runner`` (``[server] workers``: see workers.py) runs commands through it instead, which
may take a round trip: its messages are then served one at a time, in order, by a task, and
reading pauses while more than ``MAX_PENDING`` wait.

Size: about 600 lines, kept as one job: the console's protocol session (login, the simple
and extended query protocols, and both served through a ``Runner``); splitting the login
from the queries would split one state machine.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from . import scram, wire
from .console import Command, Host, Result, Session, find, split_statements
from .control import ADMIN_DATABASE
from .errors import (
    AdminCommandError,
    AuthenticationFailed,
    PgGuardError,
    ProtocolViolation,
)
from .log import display, log
from .log import log_event as _log_event

if TYPE_CHECKING:
    from .config import AdminConfig, Config

__all__ = [
    "ADMIN_DATABASE",
    "AdminSession",
    "Runner",
    "admin_verifier",
    "check_admin_config",
    "execute",
]

# Longest message the console reads before the login (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH,
# auth.c) and after it (a console statement is a line of text).
AUTH_MESSAGE_MAX: Final = 65535
CONSOLE_MESSAGE_MAX: Final = 1024 * 1024
# Messages a session with a Runner keeps while a command is away; past it reading pauses.
MAX_PENDING: Final = 64

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

_ID: Final = r'(?:"(?:[^"]|"")+"|[^\s=;"]+)'  # an identifier, plain or double-quoted
_INT: Final = r"[+-]?\d+"


# ---------------------------------------------------------------- commands


class Runner(Protocol):
    """Runs a session's commands somewhere else (``[server] workers``: on every worker)."""

    def columns(self, cmd: Command) -> tuple[str, ...]:
        """The columns the command's rows have when run this way."""
        ...

    async def run(self, session: AdminSession, cmd: Command, m: re.Match[str]) -> Result:
        """The command's result; raises ``AdminCommandError``."""
        ...


def execute(session: Session, cmd: Command, m: re.Match[str]) -> Result:
    """Run one console command here; raises ``AdminCommandError`` (and only that)."""
    try:
        return cmd.handler(session, m)
    except AdminCommandError:
        raise
    except PgGuardError as exc:
        raise AdminCommandError(exc.sqlstate, exc.message, detail=exc.detail) from None
    except Exception:
        log.exception("event=admin_command_error command=%r", m.string)
        raise AdminCommandError("XX000", "pgguard internal error running the command") from None


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
        host: Host,
        transport: asyncio.Transport,
        startup: wire.StartupMessage,
        *,
        client_id: int,
        peer: str,
        connected_at: float,
        runner: Runner | None = None,
    ) -> None:
        self.host = host
        self.runner = runner
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
        self._reader = wire.MessageReader(max_length=AUTH_MESSAGE_MAX)
        self._auth = _Auth()
        self._timer: asyncio.TimerHandle | None = None
        self._statements: dict[str, _Prepared] = {}
        self._portals: dict[str, _Prepared] = {}
        self._skip_until_sync = False
        self._closed = False
        # With a runner: messages waiting for the one in progress, and its task.
        self._pending: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._serving: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"<admin {self.id} {self.peer} {display(self.user)}>"

    # -------------------------------------------------------------- lifecycle

    def begin(self, early: bytes) -> None:
        """Start authentication; ``early`` is whatever the client sent after its StartupMessage."""
        admin = self.host.config.admin
        allowed = self.user in admin.users
        if admin.auth == "trust":
            if allowed and _is_loopback(self.transport):
                self._login_ok()
            else:
                self._login_failed("trust only from loopback" if allowed else "not an admin user")
            if early and not self._closed:
                self.data_received(early)
            return
        timeout = self.host.config.server.client_login_timeout
        self._timer = self.host.control.loop.call_later(timeout, self._login_timeout)
        real = admin_verifier(admin)
        self._auth.exchange = scram.ScramServer(
            self.user,
            real if allowed else None,
            mock_iterations=real.iterations if real else scram.DEFAULT_ITERATIONS,
        )
        self._send(wire.build_authentication_sasl([scram.MECHANISM]))
        if early:
            self.data_received(early)

    @property
    def application_name(self) -> str:
        return self.startup.application_name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # set_protocol hands us an established transport; begin() starts the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.host.control.console_closed(self)
        self._pending.clear()
        if self._serving is not None:
            self._serving.cancel()

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
                elif self.runner is not None:
                    self._enqueue(tag, body)
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
            mechanism, data = wire.parse_sasl_initial_response(body)
            if mechanism != scram.MECHANISM:
                raise ProtocolViolation(
                    "client selected an invalid SASL authentication mechanism"
                )
            server_first = exchange.first(data)
            self._auth.step = 1
            self._send(wire.build_authentication_sasl_continue(server_first))
            return
        try:
            server_final = exchange.final(body)
        except AuthenticationFailed:
            reason = "wrong password" if self.user in self.host.config.admin.users else (
                "not an admin user"
            )
            self._login_failed(reason)
            return
        self._send(wire.build_authentication_sasl_final(server_final))
        self._login_ok()

    def _login_ok(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.authenticated = True
        self._reader.max_length = CONSOLE_MESSAGE_MAX
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
            self._simple_query(wire.read_cstring(body, 0)[0])
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
        outcomes: list[tuple[Command, Result] | AdminCommandError] = []
        for statement in split_statements(text):
            try:
                cmd, m = find(statement)
                outcomes.append((cmd, self._run(cmd, m)))
            except AdminCommandError as exc:
                outcomes.append(exc)
                break  # like PostgreSQL: an error ends the query string
        self._send(self._query_reply(outcomes))

    def _query_reply(self, outcomes: list[tuple[Command, Result] | AdminCommandError]) -> bytes:
        """A simple query's answer: each statement's rows and tag (or the error), ReadyForQuery."""
        out: list[bytes] = []
        if not outcomes:
            out.append(wire.build_empty_query_response())
        for outcome in outcomes:
            if isinstance(outcome, AdminCommandError):
                out.append(wire.build_error(outcome))
                break
            cmd, result = outcome
            columns = self._columns(cmd)
            if columns:
                out.append(wire.build_row_description(columns))
            out += [wire.build_data_row(row) for row in result.rows]
            out.append(_command_complete(result))
        out.append(wire.build_ready_for_query())
        return b"".join(out)

    def _columns(self, cmd: Command) -> tuple[str, ...]:
        return cmd.columns if self.runner is None else self.runner.columns(cmd)

    def _run(self, cmd: Command, m: re.Match[str]) -> Result:
        return execute(self, cmd, m)

    # ------------------------------------------------- commands run elsewhere

    def _enqueue(self, tag: bytes, body: bytes) -> None:
        """Keep a message for the serving task (started if idle); pause reading past MAX_PENDING."""
        self._pending.append((tag, body))
        if len(self._pending) >= MAX_PENDING and not self.transport.is_closing():
            self.transport.pause_reading()
        if self._serving is None:
            self._serving = self.host.control.spawn(self._serve())

    async def _serve(self) -> None:
        """Serve pending messages in order; a command in progress holds back the later ones."""
        try:
            while self._pending and not self._closed:
                tag, body = self._pending.popleft()
                try:
                    await self._message_async(tag, body)
                except PgGuardError as exc:
                    self.terminate(exc)
                except Exception:  # the per-connection boundary, as in data_received
                    log.exception("event=internal_error client=%r", self)
                    self.terminate(PgGuardError("pgguard internal error"))
                if len(self._pending) < MAX_PENDING // 2 and not self.transport.is_closing():
                    self.transport.resume_reading()
        finally:
            self._serving = None

    async def _message_async(self, tag: bytes, body: bytes) -> None:
        if tag == b"Q":
            outcomes: list[tuple[Command, Result] | AdminCommandError] = []
            for statement in split_statements(wire.read_cstring(body, 0)[0]):
                try:
                    cmd, m = find(statement)
                    outcomes.append((cmd, await self._run_async(cmd, m)))
                except AdminCommandError as exc:
                    outcomes.append(exc)
                    break
            self._send(self._query_reply(outcomes))
        elif tag == b"E" and not self._skip_until_sync:
            try:
                prepared = self._portal(wire.read_cstring(body, 0)[0])
                if prepared.command is None or prepared.match is None:
                    self._send(wire.build_empty_query_response())
                    return
                result = await self._run_async(prepared.command, prepared.match)
                self._send(self._execute_reply(result))
            except AdminCommandError as exc:
                self._send_error(exc)
                self._skip_until_sync = True
            except (struct.error, IndexError, UnicodeDecodeError):
                raise ProtocolViolation(wire.INVALID_MESSAGE_FORMAT) from None
        else:
            self._message(tag, body)

    async def _run_async(self, cmd: Command, m: re.Match[str]) -> Result:
        assert self.runner is not None
        try:
            return await self.runner.run(self, cmd, m)
        except AdminCommandError:
            raise
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
                kind, name = body[:1], wire.read_cstring(body, 1)[0]
                (self._statements if kind == b"S" else self._portals).pop(name, None)
                self._send(wire.build_message(b"3"))
        except AdminCommandError as exc:
            self._send_error(exc)
            self._skip_until_sync = True
        except (struct.error, IndexError, UnicodeDecodeError):
            # PostgreSQL's answer to a message it cannot read: FATAL 08P01, session closed.
            raise ProtocolViolation(wire.INVALID_MESSAGE_FORMAT) from None

    def _parse(self, body: bytes) -> None:
        name, pos = wire.read_cstring(body, 0)
        query, pos = wire.read_cstring(body, pos)
        statements = split_statements(query)
        if len(statements) > 1:
            raise AdminCommandError("42601", "cannot insert multiple commands into a prepared statement")
        if not statements:
            prepared = _Prepared(None, None)
        else:
            cmd, m = find(statements[0])
            prepared = _Prepared(cmd, m, statements[0])
        self._statements[name] = prepared
        self._send(wire.build_message(b"1"))

    def _bind(self, body: bytes) -> None:
        portal, name, nparams = wire.parse_bind(body)
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
        kind, name = body[:1], wire.read_cstring(body, 1)[0]
        if kind == b"S":
            prepared = self._statements.get(name)
            if prepared is None:
                raise AdminCommandError("26000", f'prepared statement "{name}" does not exist')
            self._send(wire.build_parameter_description(0))
        else:
            prepared = self._portals.get(name)
            if prepared is None:
                raise AdminCommandError("34000", f'portal "{name}" does not exist')
        columns = () if prepared.command is None else self._columns(prepared.command)
        if columns:
            self._send(wire.build_row_description(columns))
        else:
            self._send(wire.build_message(b"n"))  # NoData

    def _portal(self, name: str) -> _Prepared:
        prepared = self._portals.get(name)
        if prepared is None:
            raise AdminCommandError("34000", f'portal "{name}" does not exist')
        return prepared

    def _execute(self, body: bytes) -> None:
        prepared = self._portal(wire.read_cstring(body, 0)[0])
        if prepared.command is None or prepared.match is None:
            self._send(wire.build_empty_query_response())
            return
        self._send(self._execute_reply(self._run(prepared.command, prepared.match)))

    @staticmethod
    def _execute_reply(result: Result) -> bytes:
        out = [wire.build_data_row(row) for row in result.rows]
        out.append(_command_complete(result))
        return b"".join(out)

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
        self._send(wire.build_error(exc))


def _command_complete(result: Result) -> bytes:
    tag = result.tag
    if tag == "SHOW" and result.rows:
        tag = f"SHOW {len(result.rows)}"
    return wire.build_command_complete(tag)
