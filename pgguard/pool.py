"""Warm server-session reuse ([pool]): pgguard's own client login, server logins with a ClientKey, reset, hand-over.

Theory
------
For a (role, database) where ``Config.reuse`` is true, a client is authenticated by pgguard
(``ClientLogin``: SCRAM-SHA-256 against the role's own verifier, read by ``auth.Verifiers`` at
each login; the verified proof yields the role's ClientKey), then admitted as any client.
Where pgguard cannot check the client itself (no verifier for the role, no monitor_dsn, the
lookup failing, a server that asks pgguard's logins of the pair for another method: ``direct``)
the client logs in to the server as without reuse, before anything was asked of it: reuse
never changes who may log in. Its server session is either a warm one with the same
``pool_key`` (role, database, protocol and startup settings) taken from the pool, or a new one
(``Pool.connect``) that pgguard logs in to with that ClientKey (``scram.ScramClient``: no
password, no PBKDF2). The session's StartupMessage carries the client's own startup settings
(``params.startup_settings``), so RESET returns to them; only ``application_name`` is applied
with ``set_config`` (``params.set_query``). The client gets the session's ParameterStatus
values, a BackendKeyData with the server process's real id and a secret of pgguard's own
(``client_secret``, mapped to the server's for cancels) and ReadyForQuery.

A ``ServerSession`` is the server socket's protocol whenever no client holds it::

    LOGIN --'Z'--> SETUP (set_config) --'Z'--> CLIENT (the client's pumps own the socket)
    CLIENT --client left idle ('I')--> RESET (server_reset_query) --'Z' I--> IDLE --take--> SETUP
    any --error, unexpected message, lifetime, max_idle, timeout, a waiter elsewhere--> CLOSED

Slots: a session holds exactly one ticket (``limits.Ticket``) from its client's admission
until its server socket is gone: the client's while in use, its own while RESET or IDLE.
A client of the same key takes a warm session (and its ticket) without going through the
gate; a released session is handed straight to the oldest waiter of its key; a waiter of
another key blocked by a limit an idle session occupies makes the oldest such idle session
close (its ticket is released when the server has closed the socket). So ``pg_stat_activity``
never shows more sessions than the limits allow, idle warm ones included.

Nothing here parses a client's traffic: between hand-over and release the session's bytes
go through the native relay (``relay.hand_over(keep=True)``: it hands the server's socket
back when the client leaves it idle) or the Python one (``pump.PooledPump``), untouched,
except that a lone Terminate sent while idle is kept from the server (the session outlives
its client).

Size: about 900 lines, one job: the life of a reused server session (login, setup, reset,
idle, close) and the client login that makes it possible.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import random
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from . import auth, params, scram, wire
from .auth import LookupUnavailable, Verifiers
from .config import Config
from .errors import AuthenticationFailed, PgGuardError, ProtocolViolation
from .limits import Ticket
from .log import log, log_event

__all__ = ["Pool", "ServerSession", "ClientLogin", "ServerRefused", "PoolStats"]

# Longest message read from a client before its login (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH).
AUTH_MESSAGE_MAX: Final = 65535
# server_lifetime is shortened by up to this fraction per session, so sessions made in one
# storm are not all closed in the same sweep.
LIFETIME_JITTER: Final = 0.1
# The pool's sweep (server_idle_timeout, server_lifetime) runs at most this often.
SWEEP_INTERVAL: Final = 1.0
IDLE: Final = ord("I")
# The server socket's write-buffer marks, as proxy.py sets them for every session.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
# Close reasons logged at INFO (something went wrong); the routine ones are DEBUG lines.
NOTABLE_CLOSES: Final = frozenset({
    "reset_failed", "setup_failed", "server_message", "protocol_error", "server_signature",
    "server_auth_method", "internal_error",
})
# Pairs whose counters SHOW POOLS keeps; past it, pairs without sessions are forgotten.
STATS_MAX: Final = 1000
_INT32 = struct.Struct("!i")
AUTH_MD5: Final = 5  # AuthenticationMD5Password

# A warm session's pool key: (role, database, protocol, the startup settings its own
# StartupMessage carried, sorted). A client only ever gets a session logged in with exactly
# its own startup settings, so RESET returns to them as on a session of its own.
PoolKey = tuple[str, str, int, tuple[tuple[str, str], ...]]


def pool_key(startup: wire.StartupMessage) -> PoolKey:
    """The key of the warm sessions ``startup``'s client may be given."""
    settings = tuple(sorted(params.startup_settings(startup.params).items()))
    return (startup.user, startup.database, startup.protocol, settings)


class ServerRefused(PgGuardError):
    """The server answered a pooled login (or its setup) with an ErrorResponse; ``fields`` are its."""

    sqlstate = "08006"

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "server refused the session"))
        self.fields = fields
        self.sqlstate = fields.get("C", "08006")


class Host(Protocol):
    """What the pool needs from the control layer (``control.Control``)."""

    config: Config
    loop: asyncio.AbstractEventLoop

    async def open_backend(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.Transport, asyncio.Protocol]: ...

    def release(self, ticket: Ticket) -> None: ...

    def hand_to_waiter(self, role: str, database: str, ticket: Ticket, session: ServerSession) -> bool: ...

    def others_waiting(self, role: str, database: str) -> bool: ...

    def over_limit(self, role: str, database: str) -> bool: ...


class Client(Protocol):
    """A pooled client (``proxy.ClientConnection``), as the login sees it."""

    peer: str
    startup: wire.StartupMessage | None

    @property
    def client_gone(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def logged_in(
        self, client_key: bytes | None, server_key: bytes | None, final: bytes, *, md5: str | None = None
    ) -> None: ...

    def fail(self, exc: PgGuardError) -> None: ...

    def verifier_unavailable(self) -> None: ...


@dataclass(slots=True)
class PoolStats:
    """One (role, database) pair's counters (SHOW POOLS, /metrics)."""

    created: int = 0
    reused: int = 0
    reset_failures: int = 0
    closed: int = 0
    in_use: int = 0


class ClientLogin:
    """pgguard's own authentication of one pooled client: SCRAM-SHA-256 (md5 for a role whose
    stored password is md5) against the role's verifier; trusted roles need none at all."""

    def __init__(self, pool: Pool, client: Client, role: str) -> None:
        self.pool = pool
        self.client = client
        self.role = role
        self._reader = wire.MessageReader(max_length=AUTH_MESSAGE_MAX)
        self._exchange: scram.ScramServer | None = None
        self._server_key: bytes | None = None
        self._md5: str | None = None  # the stored md5 password, for an md5 role
        self._salt = b""
        self._step = 0
        self._read_at = 0.0  # when the lookup of the verifier in use started
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.role in self.pool.config.pool.trusted_roles:
            self.client.logged_in(None, None, b"")
            return
        startup = self.client.startup
        if startup is not None and (self.role, startup.database) in self.pool.direct:
            self._direct()  # the server asks pgguard for a method it does not speak
            return
        hit, lookup = self.pool.verifiers.cached(self.role)
        if hit:
            self._begin(lookup)
        else:
            self._task = self.pool.loop.create_task(self._fetch())

    def _direct(self, *, fallback: bool = False) -> None:
        """Nothing was sent to the client yet: it logs in as without reuse, PostgreSQL checks
        it (its password, NOLOGIN, VALID UNTIL, pg_hba.conf) and it gets a session of its own."""
        if fallback:
            self.pool.lookup_fallbacks += 1
        else:
            self.pool.direct_logins += 1
        self.client.verifier_unavailable()

    async def _fetch(self) -> None:
        try:
            lookup = await self.pool.verifiers.get(self.role)
        except LookupUnavailable:
            # Better than refusing everyone while the lookup is down.
            self._task = None
            if not self.client.client_gone:
                self._direct(fallback=True)
            return
        self._task = None
        if self.client.client_gone:
            return
        try:
            if self._begin(lookup):
                self.feed(b"")
        except PgGuardError as exc:
            self.client.fail(exc)
        except Exception:  # the per-connection boundary (this task is the client's)
            log.exception("event=internal_error client=%s", self.client.peer)
            self.client.fail(PgGuardError("pgguard internal error"))

    def _begin(self, lookup: tuple[str | None, float]) -> bool:
        """Ask the client for what the role's verifier can check; False when pgguard cannot
        check it (no verifier, one of a kind it does not know): the login goes to the server."""
        text, self._read_at = lookup
        if text is not None and scram.is_md5_verifier(text):
            self._md5 = text
            self._salt = secrets.token_bytes(4)
            self.client.write(wire.build_message(b"R", _INT32.pack(AUTH_MD5) + self._salt))
            return True
        verifier: scram.Verifier | None = None
        if text is not None and scram.is_verifier(text):
            try:
                verifier = scram.parse_verifier(text)
            except ValueError:
                verifier = None
        if verifier is None:
            self._direct()
            return False
        self._server_key = verifier.server_key
        self._exchange = scram.ScramServer(self.role, verifier, mock_iterations=verifier.iterations)
        self.client.write(wire.build_authentication_sasl([scram.MECHANISM]))
        return True

    def rest(self) -> bytes:
        """What the client sent after its last authentication message."""
        return self._reader.take_rest()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def feed(self, data: bytes) -> None:
        """Bytes from the client during its login; answers, or ends the login either way."""
        if data:
            self._reader.feed(data)
        if self._exchange is None and self._md5 is None:
            if self._reader.buffered > AUTH_MESSAGE_MAX:
                raise ProtocolViolation("client sent too much data during authentication")
            return  # the verifier is being looked up: the message waits in the reader
        while self._exchange is not None or self._md5 is not None:
            message = self._reader.next_message()
            if not isinstance(message, tuple):
                return
            tag, body = message
            if tag != b"p":
                raise ProtocolViolation(f"expected password response, got message type {tag.decode('latin-1')!r}")
            if self._md5 is not None:
                self._answer_md5(self._md5, body)
            else:
                self._answer(body)

    def _failed(self, exc: AuthenticationFailed, *, real: bool) -> None:
        if real:  # bounds what a flood of wrong passwords costs in lookups
            self.pool.verifiers.failed(self.role, self._read_at)
        self.pool.auth_failures += 1
        log_event(logging.INFO, "auth_failed", role=self.role, client=self.client.peer)
        self.client.fail(exc)

    def _answer_md5(self, stored: str, body: bytes) -> None:
        self._md5 = None
        answer = body.rstrip(b"\x00")
        if not hmac.compare_digest(answer, scram.md5_response(stored, self._salt).encode("ascii")):
            self._failed(AuthenticationFailed(self.role), real=True)
            return
        self.client.logged_in(None, None, b"", md5=stored)

    def _answer(self, body: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        if self._step == 0:
            mechanism, data = wire.parse_sasl_initial_response(body)
            if mechanism != scram.MECHANISM:
                raise ProtocolViolation("client selected an invalid SASL authentication mechanism")
            self.client.write(wire.build_authentication_sasl_continue(exchange.first(data)))
            self._step = 1
            return
        self._exchange = None
        try:
            final = exchange.final(body)
        except AuthenticationFailed as exc:
            self._failed(exc, real=self._server_key is not None)
            return
        # AuthenticationSASLFinal goes out with AuthenticationOk and the session's greeting
        # (one write, as PostgreSQL sends them), once the session is ready.
        self.client.logged_in(exchange.client_key, self._server_key, wire.build_authentication_sasl_final(final))


class ServerSession(asyncio.Protocol):
    """One server connection of a reused pair, and its protocol while no client relays through it."""

    def __init__(self, pool: Pool, key: PoolKey) -> None:
        self.pool = pool
        self.pool_key = key  # the idle list it waits in: its startup settings included
        self.key = key[:3]  # (role, database, protocol): its counters (SHOW POOLS)
        self.stats = pool.stats_for(self.key)
        self.transport: asyncio.Transport | None = None
        self.state = "login"
        self.pid = 0
        self.secret = b""
        self.params: dict[str, str] = {}
        # The startup settings pgguard applied for the last client (params.set_query): set
        # again right after each reset, so a run of similar clients needs no statement.
        self.applied: dict[str, str] = {}
        self._replies = 0  # ReadyForQuery messages still expected
        self.negotiate = b""  # a NegotiateProtocolVersion to pass on to each client
        self.ticket: Ticket | None = None
        self.created = time.monotonic()
        lifetime = pool.config.pool.server_lifetime
        self.expires = self.created + lifetime * (1 - random.random() * LIFETIME_JITTER) if lifetime else 0.0
        self.idle_since = self.created
        self.uses = 0
        self._reader = wire.MessageReader()
        self._done: asyncio.Future[None] | None = None
        self._error: dict[str, str] | None = None
        self._status = 0
        self._scram: scram.ScramClient | None = None
        self._client_key: bytes | None = None
        self._server_key: bytes | None = None
        self._md5: str | None = None
        self._closing_reason = ""
        self.gone = False

    def __repr__(self) -> str:
        return f"<server session {self.pid} {self.key[0]}@{self.key[1]} {self.state}>"

    @property
    def role(self) -> str:
        return self.key[0]

    @property
    def database(self) -> str:
        return self.key[1]

    @property
    def cancel_request(self) -> bytes:
        """The CancelRequest that reaches this server process."""
        return wire.build_cancel_request(self.pid, self.secret)

    # ------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.state in ("idle", "closed"):
            # A warm session speaks only when it is being terminated (FATAL 57P01) or is
            # otherwise not what we left: never hand it out.
            self.close("server_message" if self.state == "idle" else self._closing_reason)
            return
        self._reader.feed(data)
        try:
            while True:
                message = self._reader.next_message()
                if not isinstance(message, tuple):
                    return
                self._message(*message)
        except (ProtocolViolation, struct.error, IndexError, UnicodeDecodeError) as exc:
            self._finish({"C": "08P01", "M": str(exc)})
            self.close("protocol_error")

    def _message(self, tag: bytes, body: bytes) -> None:
        if tag == b"Z":
            self._status = body[0] if body else 0
            self._replies -= 1
            if self._replies <= 0:
                self._finish(None)
        elif tag == b"S":
            name, pos = wire.read_cstring(body, 0)
            self.params[name] = wire.read_cstring(body, pos)[0]
        elif tag == b"E":
            if self._error is None:
                self._error = wire.parse_error_fields(body)
            if self.state == "login":
                self._finish(self._error)
        elif tag == b"R" and self.state == "login":
            self._auth(body)
        elif tag == b"K" and self.state == "login":
            self.pid, self.secret = wire.parse_backend_key_data(body)
        elif tag == b"v" and self.state == "login":
            self.negotiate = wire.build_message(tag, body)
        elif tag in b"CNATDIn" and len(tag) == 1 and self.state != "login":
            pass  # replies to our statements, notices, notifications the reset discards
        elif tag == b"N":
            pass
        else:
            self._finish({"C": "08P01", "M": f"unexpected message type {tag!r} from the server"})
            self.close("protocol_error")

    def _auth(self, body: bytes) -> None:
        (code,) = _INT32.unpack_from(body, 0)
        if code == 0:
            # AuthenticationOk. Asked for no password (trust), as a server often trusts its
            # own Unix socket, where pgguard runs: that says nothing of what it would ask a
            # client over the network, so the role's stored password stays checked.
            return
        if code == wire.AUTH_SASL:
            mechanisms = body[4:].split(b"\x00")
            if self._client_key is None or scram.MECHANISM.encode() not in mechanisms:
                self._refuse()
                return
            self._scram = scram.ScramClient(self._client_key, self._server_key)
            first = self._scram.first()
            mech = scram.MECHANISM.encode() + b"\x00"
            self._write(wire.build_message(b"p", mech + _INT32.pack(len(first)) + first))
        elif code == wire.AUTH_SASL_CONTINUE and self._scram is not None:
            self._write(wire.build_message(b"p", self._scram.final(body[4:])))
        elif code == AUTH_MD5 and self._md5 is not None and len(body) >= 8:
            answer = scram.md5_response(self._md5, body[4:8]).encode("ascii") + b"\x00"
            self._write(wire.build_message(b"p", answer))
        elif code == wire.AUTH_SASL_FINAL and self._scram is not None:
            if not self._scram.verify(body[4:]):
                self._finish({"C": "08006", "M": "the server's SCRAM signature is wrong"})
                self.close("server_signature")
        else:
            self._refuse()

    def _refuse(self) -> None:
        """The server asks for an authentication pgguard cannot give for this role (cleartext,
        GSSAPI, another SASL mechanism, md5 for a SCRAM verifier): this client, already past
        pgguard's check, gets an error (never 28P01: its password was right); the next ones
        of the pair log in to the server as without reuse (``Pool.direct``)."""
        self.pool.learn_direct(self.role, self.database)
        self._finish({
            "C": "28000",
            "M": f'pgguard cannot log in to the server for role "{self.role}" with the '
            "authentication method the server asks for; the next login goes to the server itself",
        })  # fmt: skip
        self.close("server_auth_method")

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        reason = self._closing_reason or "server_closed"
        self._finish({"C": "08006", "M": "the server closed the connection"})
        prev, self.state = self.state, "closed"
        self.pool.forget(self, prev, reason)
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            self.pool.host.release(ticket)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    # ------------------------------------------------------------- steps

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _finish(self, error: dict[str, str] | None) -> None:
        done = self._done
        if done is not None and not done.done():
            self._error = error or self._error
            done.set_result(None)

    async def _wait(self, replies: int = 1) -> None:
        self._done = self.pool.loop.create_future()
        self._error = None
        self._replies = replies
        await self._done
        self._done = None

    async def login(
        self, startup: wire.StartupMessage, client_key: bytes | None, server_key: bytes | None,
        md5: str | None = None,
    ) -> None:
        """Log in as the session's role; raises ServerRefused with the server's (or our) error."""
        self._client_key, self._server_key, self._md5 = client_key, server_key, md5
        # The client's own startup settings (options included), so that RESET, RESET ALL and
        # DISCARD ALL return to them on this session as on one of the client's own.
        body = {"user": startup.user, "database": startup.database, **params.startup_settings(startup.params)}
        waiting = self._wait()
        self._write(wire.build_startup_message(body, protocol=startup.protocol))
        await waiting
        self._client_key = self._server_key = self._md5 = None
        self._scram = None
        if self._error is not None or self.gone:
            raise ServerRefused(self._error or {"C": "08006", "M": "the server closed the connection"})
        self.state = "setup"

    async def query(self, *sqls: str) -> bool:
        """Run each of ``sqls`` as one simple Query, pipelined (one round trip); True when all
        ended without error and the session is idle outside a transaction."""
        waiting = self._wait(len(sqls))
        self._write(b"".join(wire.build_message(b"Q", sql.encode("utf-8") + b"\x00") for sql in sqls))
        try:
            # Bounded: a server that does not answer (or a stream pgguard misread) must not
            # keep the session, and its slot, in RESET forever.
            async with asyncio.timeout(self.pool.config.backend.connect_timeout):
                await waiting
        except TimeoutError:
            self._done = None
            self._error = {"C": "08006", "M": "the server did not answer in time"}
            return False
        return self._error is None and not self.gone and self._status == IDLE

    @property
    def error(self) -> dict[str, str] | None:
        return self._error

    def detach(self, reason: str) -> None:
        """The client's relay keeps the socket to its end (closed the usual way): count it closed."""
        if self.state == "client":
            self.stats.in_use -= 1
        self.state = "closed"
        self.stats.closed += 1
        _log_close(self, reason)

    def adopt(self, ticket: Ticket | None) -> None:
        """Hold ``ticket`` until the server socket is gone (released now if it already is)."""
        if ticket is None:
            return
        if self.gone:
            self.pool.host.release(ticket)
        else:
            self.ticket = ticket

    def close(self, reason: str) -> None:
        """Terminate and close; the ticket is released when the server socket is gone."""
        if not self._closing_reason:
            self._closing_reason = reason
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(wire.TERMINATE)
            transport.close()
        self._finish({"C": "08006", "M": "the server session was closed"})


class Pool:
    """Every warm session of this process, per (role, database, protocol)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.loop = host.loop
        self.verifiers = Verifiers(host.config)
        # Bounded by the warm sessions (each holds a slot); a key goes with its last session.
        self.idle: dict[PoolKey, collections.deque[ServerSession]] = {}
        self.stats: dict[tuple[str, str, int], PoolStats] = {}
        self.auth_failures = 0
        self.lookup_fallbacks = 0  # logins passed to the server because the lookup failed
        self.direct_logins = 0  # logins passed to the server because pgguard cannot check them
        # (role, database) pairs whose server asks pgguard's logins for a method it does not
        # speak: their clients log in as without reuse, until a reload.
        # Client-supplied names: bounded (cleared when full).
        self.direct: set[tuple[str, str]] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self._doomed: set[Ticket] = set()  # [cluster]: slots given away while their session was reset
        self._schedule()

    @property
    def config(self) -> Config:
        return self.host.config

    def reconfigure(self, config: Config) -> None:
        self.verifiers.config = config
        self.direct.clear()  # the server's pg_hba.conf may have changed with it: learn again

    def learn_direct(self, role: str, database: str) -> None:
        """The server asks pgguard's logins of (role, database) for a method pgguard cannot
        answer from a verifier: its next clients log in as without reuse."""
        if len(self.direct) >= auth.CACHE_MAX:
            self.direct.clear()
        self.direct.add((role, database))
        log_event(logging.INFO, "pool_direct", role=role, database=database)

    def stats_for(self, key: tuple[str, str, int]) -> PoolStats:
        stats = self.stats.get(key)
        if stats is None:
            if len(self.stats) >= STATS_MAX:
                # Database names come from clients: forget pairs that hold nothing now.
                held = {k[:3] for k in self.idle}
                for old in [k for k, st in self.stats.items() if not st.in_use and k not in held]:
                    del self.stats[old]
            stats = self.stats[key] = PoolStats()
        return stats

    def wants(self, startup: wire.StartupMessage) -> bool:
        """True when this client's sessions are reused (its pair has reuse on, its startup allows it)."""
        return self.config.reuse(startup.user, startup.database) and params.wanted(startup.params) is not None

    # ---------------------------------------------------------- sessions

    def take(self, startup: wire.StartupMessage) -> ServerSession | None:
        """A warm session for this client's pair (newest first), with its ticket, or None."""
        sessions = self.idle.get(pool_key(startup))
        now = time.monotonic()
        while sessions:
            session = sessions.pop()
            if session.gone or session.state != "idle":
                continue
            if session.expires and now >= session.expires:
                session.close("server_lifetime")
                continue
            return session  # claim() counts the reuse and takes its ticket
        return None

    async def connect(
        self,
        startup: wire.StartupMessage,
        client_key: bytes | None,
        server_key: bytes | None,
        on_fail: Callable[[ServerSession], None],
        md5: str | None = None,
    ) -> ServerSession:
        """A new server session for this client, logged in (raises ServerRefused, OSError, TimeoutError).

        When the login fails after the connection was made, ``on_fail(session)`` runs before
        it is closed (the client hands it its slot: released when the socket is gone).
        """
        key = pool_key(startup)
        proto: ServerSession | None = None
        try:
            async with asyncio.timeout(self.config.backend.connect_timeout):
                transport, opened = await self.host.open_backend(lambda: ServerSession(self, key))
                assert isinstance(opened, ServerSession)
                proto = opened
                transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
                await proto.login(startup, client_key, server_key, md5)
        except BaseException:
            if proto is not None:
                on_fail(proto)
                proto.close("login_failed")
            raise
        proto.stats.created += 1
        return proto

    async def prepare(self, session: ServerSession, startup: wire.StartupMessage) -> None:
        """Apply the client's application_name; raises ServerRefused (the session is closed)."""
        want = params.later(startup.params)
        if session.gone:  # closed by the server between its reset and now
            raise ServerRefused({"C": "08006", "M": "the server closed the connection"})
        sql = params.set_query(want, session.params, session.applied)
        if sql is not None and not await session.query(sql):
            error = session.error or {"C": "08006", "M": "the server closed the connection"}
            session.close("setup_failed")
            raise ServerRefused(error)
        session.applied = want
        session.state = "client"
        session.uses += 1
        session.stats.in_use += 1

    def ready(self, session: ServerSession, startup: wire.StartupMessage) -> bool:
        """True (and ``session`` marked in use) when it already has the client's application_name
        (its other startup settings it has by construction, ``pool_key``): the hand-over needs
        no round trip (``prepare`` otherwise)."""
        want = params.later(startup.params)
        if session.gone or params.set_query(want, session.params, session.applied) is not None:
            return False
        session.applied = want
        session.state = "client"
        session.uses += 1
        session.stats.in_use += 1
        return True

    def give_back(self, session: ServerSession, ticket: Ticket | None, reusable: bool) -> None:
        """The client left: reset and keep ``session`` (with ``ticket``) when it can be reused."""
        session.ticket = ticket
        if session.state == "client":
            session.stats.in_use -= 1
        transport = session.transport
        if session.gone or transport is None or transport.is_closing():
            if ticket is not None and session.gone:
                session.ticket = None
                self.host.release(ticket)
            return
        transport.set_protocol(session)
        transport.resume_reading()
        if not reusable:
            session.state = "closing"
            session.close("client_left_busy")
            return
        session.state = "reset"
        self.loop.create_task(self._reset(session))

    def give_back_fd(self, session: ServerSession, ticket: Ticket | None, fd: int) -> None:
        """The native relay handed ``session``'s server socket back (``fd``): reset and keep it."""
        session.ticket = ticket
        if session.state == "client":
            session.stats.in_use -= 1
        session.state = "reset"
        self.loop.create_task(self._adopt_fd(session, fd))

    async def _adopt_fd(self, session: ServerSession, fd: int) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            session.connection_lost(None)
            return
        try:
            transport, _ = await self.loop.connect_accepted_socket(lambda: session, sock)
        except Exception:  # the socket is unusable (closed meanwhile): the session is gone
            sock.close()
            session.connection_lost(None)
            return
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        await self._reset(session)

    async def _reset(self, session: ServerSession) -> None:
        sqls = [self.config.pool.server_reset_query]
        again = params.set_query(session.applied, {})
        if again is not None:
            sqls.append(again)
        if not await session.query(*sqls):
            session.stats.reset_failures += 1
            session.close("reset_failed")
            return
        self.park(session)

    def park(self, session: ServerSession) -> None:
        """A clean session: to the oldest waiter of its pair, else the idle list (or closed)."""
        ticket = session.ticket
        assert ticket is not None
        role, database, _ = session.key
        if ticket in self._doomed:
            self._doomed.discard(ticket)
            session.close("cluster_lease_lost")
            return
        if self._closed or (session.expires and time.monotonic() >= session.expires):
            session.close("server_lifetime" if not self._closed else "shutdown")
            return
        session.state = "idle"
        if self.host.hand_to_waiter(role, database, ticket, session):
            return
        if self.host.others_waiting(role, database):
            session.close("slot_wanted")
            return
        if self.warm_of(session.key) >= self.config.pool.max_idle:
            session.close("max_idle")
            return
        session.idle_since = time.monotonic()
        self.idle.setdefault(session.pool_key, collections.deque()).append(session)

    def put_back(self, session: ServerSession, ticket: Ticket) -> None:
        """A warm session taken for a client that left before using it: clean still, park it."""
        session.ticket = ticket
        if session.gone:
            session.ticket = None
            self.host.release(ticket)
            return
        self.park(session)

    def claim(self, session: ServerSession) -> Ticket:
        """``session`` (just parked) goes to a waiter: its ticket, taken from the session."""
        ticket = session.ticket
        assert ticket is not None
        session.ticket = None
        session.state = "setup"
        session.stats.reused += 1
        return ticket

    def forget(self, session: ServerSession, state: str, reason: str) -> None:
        """The server socket of ``session`` is gone."""
        session.stats.closed += 1
        if state == "client":
            session.stats.in_use -= 1
        sessions = self.idle.get(session.pool_key)
        if sessions is not None and session in sessions:
            sessions.remove(session)
        if not sessions:
            self.idle.pop(session.pool_key, None)
        _log_close(session, reason)

    def free_slot_for(self, shares: Callable[[str, str], bool]) -> bool:
        """Close the oldest idle session whose slot would help (``shares(role, database)``)."""
        oldest: ServerSession | None = None
        for key, sessions in self.idle.items():
            if sessions and shares(key[0], key[1]):
                head = sessions[0]
                if oldest is None or head.idle_since < oldest.idle_since:
                    oldest = head
        if oldest is None:
            return False
        self.idle[oldest.pool_key].popleft()
        oldest.state = "closing"
        oldest.close("slot_wanted")
        return True

    def warm(self) -> int:
        return sum(len(s) for s in self.idle.values())

    def warm_of(self, key: tuple[str, str, int]) -> int:
        """Warm sessions of (role, database, protocol), whatever their startup settings."""
        return sum(len(s) for k, s in self.idle.items() if k[:3] == key)

    def close_holding(self, ticket: Ticket, reason: str) -> None:
        """Close the warm session holding ``ticket``; one being reset now is closed when it
        would be parked ([cluster]: its slot was given to another pgguard)."""
        for sessions in self.idle.values():
            for session in sessions:
                if session.ticket is ticket:
                    sessions.remove(session)
                    session.state = "closing"
                    session.close(reason)
                    return
        self._doomed = {t for t in self._doomed if not t.released}  # bounded by the live tickets
        self._doomed.add(ticket)

    # ---------------------------------------------------------- upkeep

    def _schedule(self) -> None:
        if not self._closed:
            self._sweep = self.loop.call_later(SWEEP_INTERVAL, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close warm sessions past server_idle_timeout or server_lifetime, or over a lowered limit."""
        now = time.monotonic()
        timeout = self.config.pool.server_idle_timeout
        for (role, database, _, _), sessions in list(self.idle.items()):
            for session in list(sessions):
                if self.host.over_limit(role, database):
                    reason = "limit_lowered"
                elif timeout and now - session.idle_since > timeout:
                    reason = "server_idle_timeout"
                elif session.expires and now >= session.expires:
                    reason = "server_lifetime"
                else:
                    continue
                sessions.remove(session)
                session.state = "closing"
                session.close(reason)
        self._schedule()

    def close(self) -> None:
        """Close every warm session (pgguard stops)."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for sessions in list(self.idle.values()):
            for session in list(sessions):
                session.state = "closing"
                session.close("shutdown")
        self.idle.clear()

    def abort(self) -> None:
        """Drop every warm session's socket at once (a stop without drain)."""
        sessions = [s for queue in self.idle.values() for s in queue]
        self.close()
        for session in sessions:
            if session.transport is not None:
                session.transport.abort()

    def rows(self) -> list[tuple[str, ...]]:
        """SHOW POOLS: role, database, protocol, warm, in_use, created, reused, reset_failures, closed."""
        out: list[tuple[str, ...]] = []
        for key, st in sorted(self.stats.items()):
            warm = self.warm_of(key)
            role, database, protocol = key
            out.append((
                role, database, f"3.{protocol & 0xFFFF}", str(warm), str(st.in_use),
                str(st.created), str(st.reused), str(st.reset_failures), str(st.closed),
            ))  # fmt: skip
        return out


def _log_close(session: ServerSession, reason: str) -> None:
    level = logging.INFO if reason in NOTABLE_CLOSES else logging.DEBUG
    log_event(
        level, "server_session", action="close", role=session.role, database=session.database,
        pid=session.pid, reason=reason, uses=session.uses,
    )  # fmt: skip


def client_secret(protocol_32: bool) -> bytes:
    """pgguard's own BackendKeyData secret for a client of a reused session (the process id is
    the server session's real one): 32 bytes on protocol 3.2, 4 on 3.0. A client that left
    cannot cancel the next client's queries on the same server process: its secret is not
    the next one's."""
    return secrets.token_bytes(32 if protocol_32 else 4)
