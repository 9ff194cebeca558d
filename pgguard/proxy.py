"""One client session: startup, admission, backend dial, relay until ReadyForQuery, raw pump, release.

Theory
------
A ``ClientConnection`` is the asyncio protocol of one accepted socket. Its ``state`` moves
forward only::

    STARTUP --StartupMessage--> ADMITTING --admit--> DIALING --connected--> AUTH --'Z'--> ACTIVE
                                   |  |  \\--queue--> QUEUED --admitted--/ |
                                   |  \\--no login slot--> LOGIN_WAIT --slot--/
                                   \\--reject--> CLOSED (ErrorResponse 53300)
    any state --either side gone--> CLOSED

STARTUP reads SSLRequest / GSSENCRequest (answered ``N`` unless TLS is on), CancelRequest
(forwarded to the server at once, never counted) and the StartupMessage, within
``client_login_timeout``. From admission on, the session holds a ``Ticket``; it is given
back exactly once, through ``_release``, when the backend socket is gone (or never came):
PostgreSQL removes a backend from its own counts before it closes the socket, so the next
waiter can never make ``pg_stat_activity`` show one more than the limit.

Every move is checked against ``_MOVES`` in one place (``_move``). Three timers, each for
one deadline: ``client_login_timeout`` (STARTUP), the server's first reply within
``connect_timeout`` (AUTH), and ``close_timeout`` for the server to close after the client left.

Login slots (``[backend] max_logins_in_flight``, ``logins.py``): an admitted session takes
one before it dials (a counter test and increment when the cap has room) and holds it until
the server's first ReadyForQuery or ErrorResponse, the backend socket's end or the client's,
whichever comes first; ``_end_login`` gives it back, exactly once. Without room the session
waits in LOGIN_WAIT, FIFO per (role, database) and round-robin between pairs, at most
``connect_timeout`` (then the error a dial timeout gives). A warm session handed out by
``[pool]`` reuse is logged in already and takes none; a new reused session's server login
(``pool.Pool.connect``) takes one like any other.

AUTH relays bytes both ways unchanged while ``pump.BackendAuth`` frames the server's
messages to notice BackendKeyData, ErrorResponse and the first ReadyForQuery. Then both
transports are handed to ``pump.Pump`` protocols that do nothing but write each chunk into
the peer's transport, with flow control. No per-message parsing after ReadyForQuery.

The session's ``server`` is its ``Host``: the control layer (``control.Control``), which this
module knows only through that protocol.

With ``[pool]`` reuse on for the client's (role, database), STARTUP moves to LOGIN instead
(pgguard authenticates the client, ``pool.ClientLogin``), then ADMITTING; DIALING takes a
warm server session or logs in a new one (``pool.Pool``) and goes straight to ACTIVE; when
the client leaves a session idle outside a transaction, the session goes back to the pool
with its slot instead of being terminated.

Size: about 1070 lines, one job: the life of one client socket from accept to close (TLS
negotiation included, since it decides what the startup bytes mean, and the pooled login,
since it decides which server session the client gets); the relays are in ``pump.py``.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

from . import pool as pool_mod
from . import relay, tls, wire
from .config import Config
from .errors import (
    BackendLost,
    BackendUnavailable,
    BackendUnreachable,
    EncryptionRequired,
    PgGuardError,
    ProtocolViolation,
)
from .limits import AddressHold, Ticket, Waiter
from .log import display, log, log_event
from .logins import LoginSlot
from .pump import BackendAuth, PooledPump, Pump, YoungPump

__all__ = ["ClientConnection", "Host", "State", "number_clients"]

# A client should send nothing between its StartupMessage and the server's first reply;
# whatever it does send before the backend is connected is kept, up to this bound.
MAX_EARLY_DATA: Final = 64 * 1024
# Write-buffer marks for both transports of a session: past HIGH, reading from the peer
# pauses; under LOW it resumes. Bounds memory per session at about HIGH per direction.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
# Seconds a closing TLS client gets to answer our close_notify before the socket is dropped.
TLS_SHUTDOWN_TIMEOUT: Final = 5.0
IDLE: Final = ord("I")  # ReadyForQuery status: idle, not in a transaction

_ids = itertools.count(1)


def number_clients(first: int, step: int) -> None:
    """Number this process's clients ``first``, ``first + step``, ... (from now on).

    ``[server] workers``: worker i of N numbers its clients i+1, i+1+N, ..., so a client id
    (SHOW CLIENTS, KILL CLIENT, the console's BackendKeyData) names one client on the host.
    """
    global _ids
    _ids = itertools.count(first, step)


class State(enum.Enum):
    STARTUP = "startup"
    LOGIN = "login"  # [pool]: pgguard itself authenticates the client
    ADMITTING = "admitting"
    QUEUED = "queued"
    LOGIN_WAIT = "login_wait"  # admitted, waiting for a login slot (max_logins_in_flight)
    DIALING = "dialing"
    AUTH = "authenticating"
    ACTIVE = "active"
    CLOSED = "closed"

    # Identity hash in C: a state is a dict key on every move (_MOVES), and Enum's own
    # __hash__ is a Python call.
    __hash__ = object.__hash__


# The moves a session may make; _move checks each one (a session only goes forward).
_MOVES: Final = {
    State.STARTUP: frozenset({State.ADMITTING, State.LOGIN, State.CLOSED}),
    State.LOGIN: frozenset({State.ADMITTING, State.CLOSED}),
    State.ADMITTING: frozenset({State.QUEUED, State.LOGIN_WAIT, State.DIALING, State.CLOSED}),
    State.QUEUED: frozenset({State.LOGIN_WAIT, State.DIALING, State.CLOSED}),
    State.LOGIN_WAIT: frozenset({State.DIALING, State.CLOSED}),
    State.DIALING: frozenset({State.AUTH, State.ACTIVE, State.CLOSED}),
    State.AUTH: frozenset({State.ACTIVE, State.CLOSED}),
    State.ACTIVE: frozenset({State.CLOSED}),
    State.CLOSED: frozenset({State.CLOSED}),
}


class Host(Protocol):
    """What a session needs from the layer that runs it (``control.Control``)."""

    config: Config
    loop: asyncio.AbstractEventLoop
    client_tls: tls.ClientTLS | None
    pool: pool_mod.Pool | None

    def client_opened(self, client: ClientConnection) -> bool: ...

    def client_closed(self, client: ClientConnection) -> None: ...

    def wants_admin(self, packet: wire.StartupMessage) -> bool: ...

    def open_admin(self, client: ClientConnection, early: bytes) -> None: ...

    def refuse_past_cap(self, client: ClientConnection) -> None: ...

    def admit(self, client: ClientConnection) -> None: ...

    def leave_queue(self, waiter: Waiter) -> None: ...

    def release(self, ticket: Ticket) -> None: ...

    def take_login(self, client: ClientConnection) -> LoginSlot: ...

    def end_login(self, slot: LoginSlot) -> None: ...

    def login_timed_out(self, client: ClientConnection) -> None: ...

    async def open_backend(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.Transport, asyncio.Protocol]: ...

    def dial_failed(
        self, client: ClientConnection, reason: str, exc: BaseException | None = None
    ) -> None: ...

    def fd_exhausted(self, where: str, exc: OSError) -> None: ...

    def session_key(self, client: ClientConnection) -> None: ...

    def session_started(self, client: ClientConnection) -> None: ...

    def backend_error(self, client: ClientConnection, fields: dict[str, str]) -> None: ...

    def backend_closed_early(self, client: ClientConnection) -> None: ...

    def forward_cancel(self, packet: wire.CancelRequest) -> None: ...


class ClientConnection(asyncio.Protocol):
    """The client side of one session, and the owner of its backend connection and ticket."""

    # [pool] (class defaults: a session that is not reused never sets them): pooled says
    # pgguard authenticates the client and its server session is reused; warm is the warm
    # session admission gave it; session the server session it holds; server_cancel the
    # CancelRequest that reaches that server process (the client knows the process id and a
    # secret of pgguard's own).
    pooled = False
    warm: pool_mod.ServerSession | None = None
    session: pool_mod.ServerSession | None = None
    server_cancel: bytes | None = None
    _login: pool_mod.ClientLogin | None = None
    _client_key: bytes | None = None
    _server_key: bytes | None = None
    _greeting = b""
    _md5: str | None = None
    _released_fd: int | None = None
    # Taken past [server] max_client_connections into [admin] reserved_connections: only a
    # console login may follow (set by the host's client_opened).
    past_cap = False
    # max_logins_in_flight (class defaults, set only while a login is waiting or running):
    # the slot this session's server login holds or waits for, and the timer of that wait.
    login_slot: LoginSlot | None = None
    _slot_timer: asyncio.TimerHandle | None = None

    def __init__(self, server: Host) -> None:
        self.server = server
        self.id = next(_ids)
        self.state = State.STARTUP
        self.transport: asyncio.Transport | None = None
        self.backend: asyncio.Transport | None = None
        self.peer = ""
        # The client's IP address (TCP) for [limits] client_address_max_connections; None on
        # the Unix socket. ``hold`` is its count on that address (limits.AddressHold), given
        # back when the socket closes (Host.client_closed).
        self.address: str | None = None
        self.hold: AddressHold | None = None
        self.startup: wire.StartupMessage | None = None
        self.ticket: Ticket | None = None
        self.waiter: Waiter | None = None
        self.connected_at = time.time()
        self.admitted_at: float | None = None
        self.last_active = time.monotonic()
        # The ReadyForQuery status (b"I", b"T", b"E" as an int) while the server waits for
        # this client, 0 while a query runs; idle_timeout only closes waiting sessions.
        self.idle_status = 0
        self.backend_pid: int | None = None
        self.backend_key = b""  # BackendKeyData secret, to cancel a query of a client that left
        self.bytes_in = 0  # from the client
        self.bytes_out = 0  # to the client
        self._reader: wire.StartupReader | None = wire.StartupReader()
        self._early = bytearray()
        self._login_timer: asyncio.TimerHandle | None = None  # client_login_timeout
        self._reply_timer: asyncio.TimerHandle | None = None  # the server's first reply
        self._close_timer: asyncio.TimerHandle | None = None  # the server's close, client gone
        self._dial: asyncio.Task[None] | None = None
        self._backend_proto: BackendAuth | None = None
        self._ssl_asked = False
        self._gss_asked = False
        # TLS (see tls.py): client_tls is what this client negotiated (None: clear). While
        # _handshake runs, self.transport is still the raw socket: nothing may be written to
        # it, and decrypted bytes that arrive before the task swaps transports wait in
        # _tls_early. _hello collects a direct-TLS ClientHello before the handshake starts.
        self.client_tls: tls.ClientTLS | None = None
        self._handshake: asyncio.Task[None] | None = None
        self._tls_early = bytearray()
        self._hello: tls.ClientHelloReader | None = None
        self._client_gone = False
        self._backend_gone = False

    # ---------------------------------------------------------------- identity

    @property
    def role(self) -> str:
        return self.startup.user if self.startup else ""

    @property
    def database(self) -> str:
        return self.startup.database if self.startup else ""

    def __repr__(self) -> str:
        who = f"{display(self.role)}@{display(self.database)}"
        return f"<client {self.id} {self.peer} {who} {self.state.value}>"

    @property
    def client_gone(self) -> bool:
        return self._client_gone

    def _move(self, new: State) -> None:
        """The one place ``state`` changes: only the moves in ``_MOVES``."""
        assert new in _MOVES[self.state], f"{self!r}: {self.state.name} -> {new.name}"
        self.state = new

    # ----------------------------------------------------------------- startup

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not a subclass of asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        addr = transport.get_extra_info("peername")
        if isinstance(addr, tuple):
            self.peer = f"{addr[0]}:{addr[1]}"
            self.address = str(addr[0])
        elif addr:
            self.peer = str(addr)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if not self.server.client_opened(self):
            return  # refused: over max_client_connections
        self._login_timer = self.server.loop.call_later(
            self.server.config.server.client_login_timeout, self._login_timeout
        )

    def data_received(self, data: bytes) -> None:
        try:
            if self.state is State.STARTUP:
                if self._handshake is not None:
                    self._tls_early += data
                    if len(self._tls_early) > wire.MAX_STARTUP_PACKET_LENGTH:
                        raise ProtocolViolation("invalid length of startup packet", silent=True)
                    return
                self._startup_data(data)
            elif self.state is State.AUTH:
                self.bytes_in += len(data)
                assert self.backend is not None
                self.backend.write(data)
            elif self.state is State.LOGIN:
                assert self._login is not None
                self._login.feed(data)
            elif self.state in (State.ADMITTING, State.QUEUED, State.LOGIN_WAIT, State.DIALING):
                self._early += data
                if len(self._early) > MAX_EARLY_DATA:
                    raise ProtocolViolation("client sent too much data before authentication")
        except PgGuardError as exc:
            self.fail(exc)
        except Exception:  # the per-connection boundary: log, answer, release
            log.exception("event=internal_error client=%r", self)
            self.fail(PgGuardError("pgguard internal error"))

    def _startup_data(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        if self._hello is not None or (
            data[0] == tls.TLS_HANDSHAKE_RECORD
            and reader.buffered == 0
            and not (self._ssl_asked or self._gss_asked)
            and self.server.client_tls is not None
        ):
            self._direct_tls(data)
            return
        reader.feed(data)
        while self.state is State.STARTUP:
            packet = reader.next_packet()
            if packet is wire.NEED_DATA:
                return
            if isinstance(packet, wire.StartupMessage):
                self._startup_message(packet)
            elif isinstance(packet, wire.SSLRequest):
                if self._ssl_asked:
                    raise ProtocolViolation("duplicate SSLRequest")
                self._ssl_asked = True
                self._answer_ssl_request()
                return
            elif isinstance(packet, wire.GSSENCRequest):
                if self._gss_asked:
                    raise ProtocolViolation("duplicate GSSENCRequest")
                self._gss_asked = True
                self._write(wire.SSL_NOT_SUPPORTED)
            elif isinstance(packet, wire.CancelRequest):
                self.server.forward_cancel(packet)
                self._close()
                return

    def _answer_ssl_request(self) -> None:
        """``S`` and a TLS handshake when client TLS is on; otherwise PostgreSQL's ``N``."""
        if self.server.client_tls is None:
            self._write(wire.SSL_NOT_SUPPORTED)
            return
        self._write(tls.SSL_ACCEPTED)
        reader = self._reader
        assert reader is not None
        if reader.buffered:
            # Bytes sent after SSLRequest, before the handshake, were not encrypted and may
            # have been injected by a man in the middle; PostgreSQL says so in clear and closes.
            raise ProtocolViolation("received unencrypted data after SSL request")
        self._start_tls(b"")

    def _direct_tls(self, data: bytes) -> None:
        """PostgreSQL 17 direct TLS: collect the ClientHello, check its ALPN offer, upgrade."""
        if self._hello is None:
            self._hello = tls.ClientHelloReader()
        hello = self._hello.feed(data)  # ProtocolViolation(silent) on garbage
        if hello is wire.NEED_DATA:
            return
        assert isinstance(hello, tls.ClientHello)
        refusal = tls.direct_tls_refusal(hello)
        if refusal is not None:
            reason, reply = refusal
            log_event(logging.INFO, "tls_refused", client=self.peer, reason=reason)
            if reply:
                self._write(reply)
            self._close()
            return
        raw, self._hello = bytes(self._hello.raw), None
        self._start_tls(raw)

    def _start_tls(self, initial: bytes) -> None:
        """Run the TLS handshake on the client socket; ``initial``: TLS bytes already read."""
        client_tls = self.server.client_tls
        transport = self.transport
        assert client_tls is not None and transport is not None
        # Not one more byte for this protocol: what follows belongs to the TLS layer.
        transport.pause_reading()
        loop = self.server.loop
        self._handshake = loop.create_task(self._tls_handshake(transport, client_tls))
        if initial:
            # The task's first step (already scheduled) makes start_tls's SSL protocol the
            # transport's protocol; this callback runs right after it and hands that protocol
            # the bytes this one consumed, before the transport resumes reading.
            loop.call_soon(_replay, transport, self, initial)

    async def _tls_handshake(self, raw: asyncio.Transport, client_tls: tls.ClientTLS) -> None:
        loop = self.server.loop
        if self._client_gone or raw.is_closing():
            # The client left (a reset right after its SSLRequest) before this task ran:
            # start_tls on a dead transport would wait forever, holding the task and its buffers.
            self._handshake = None
            raw.abort()
            return
        try:
            transport = await loop.start_tls(
                raw,
                self,
                client_tls.context,
                server_side=True,
                ssl_handshake_timeout=self.server.config.server.client_login_timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except asyncio.CancelledError:
            self._handshake = None
            raw.abort()
            self.client_lost()
            raise
        except Exception as exc:  # the per-connection boundary: a failed handshake ends it
            self._handshake = None
            log_event(logging.INFO, "tls_handshake_failed", client=self.peer, error=repr(exc))
            raw.abort()
            self.client_lost()
            return
        self._handshake = None
        if transport is None:  # asyncio: the socket closed cleanly during the handshake
            raw.abort()
            self.client_lost()
            return
        if self._client_gone or transport.is_closing():
            transport.abort()
            self.client_lost()
            return
        self.transport = transport
        self.client_tls = client_tls
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self._tls_early:
            early, self._tls_early = bytes(self._tls_early), bytearray()
            self.data_received(early)

    def _startup_message(self, packet: wire.StartupMessage) -> None:
        _cancel(self._login_timer)
        self._login_timer = None
        self.startup = packet
        reader = self._reader
        assert reader is not None
        self._early += reader.take_rest()
        self._reader = None
        if self.client_tls is None and self.server.config.tls.client_mode == "require":
            # A hostssl-only server's answer to a client without TLS, before anything else.
            host = self.peer.rpartition(":")[0] or self.peer
            raise EncryptionRequired(host, packet.user, packet.database)
        if self.server.wants_admin(packet):
            # The admin console takes the socket over (transport.set_protocol); this object
            # is done and holds nothing.
            self._move(State.CLOSED)
            early, self._early = bytes(self._early), bytearray()
            self.server.open_admin(self, early)
            return
        if self.past_cap:
            self.server.refuse_past_cap(self)  # 53300, as if refused at accept
            return
        pool = self.server.pool
        if pool is not None and pool.wants(packet):
            self._pooled_login(pool)
            return
        self._move(State.ADMITTING)
        self.server.admit(self)

    # ------------------------------------------------------------------ [pool]

    def _pooled_login(self, pool: pool_mod.Pool) -> None:
        """Authenticate the client here (pool.ClientLogin), within client_login_timeout."""
        assert self.startup is not None
        self.pooled = True
        self._move(State.LOGIN)
        self._login_timer = self.server.loop.call_later(
            self.server.config.server.client_login_timeout, self._login_timeout
        )
        login = self._login = pool_mod.ClientLogin(pool, self, self.startup.user)
        login.start()
        if self._early and self.state is State.LOGIN:
            early, self._early = bytes(self._early), bytearray()
            login.feed(early)

    def verifier_unavailable(self) -> None:
        """[pool] pgguard cannot check this client itself (the lookup failed, no verifier for
        the role, no monitor_dsn, a method the server asks for that pgguard does not speak),
        before anything was asked of it: it logs in as without reuse (PostgreSQL checks it,
        the session is its own), admitted as any client."""
        if self.state is not State.LOGIN:
            return
        _cancel(self._login_timer)
        self._login_timer = None
        login, self._login = self._login, None
        if login is not None:
            self._early += login.rest()
        self.pooled = False
        self._move(State.ADMITTING)
        self.server.admit(self)

    def write(self, data: bytes) -> None:
        """Bytes to the client (pool.ClientLogin's messages)."""
        self._write(data)

    def logged_in(
        self, client_key: bytes | None, server_key: bytes | None, final: bytes, *, md5: str | None = None
    ) -> None:
        """pgguard accepted the client's password (or its role is trusted): admission.

        ``final`` (AuthenticationSASLFinal) and AuthenticationOk go out with the session's
        ParameterStatus, BackendKeyData and ReadyForQuery in one write (_attach): one system
        call per login less, and a client refused meanwhile (53300) gets only the
        ErrorResponse, as any client pgguard refuses.
        """
        _cancel(self._login_timer)
        self._login_timer = None
        login, self._login = self._login, None
        if login is not None:
            self._early += login.rest()
        self._client_key, self._server_key, self._md5 = client_key, server_key, md5
        self._greeting = final + wire.build_authentication_ok()
        self._move(State.ADMITTING)
        self.server.admit(self)

    async def _pooled_session(self) -> None:
        """A warm session (admission gave it) or a new one, set up for this client, then attach."""
        pool = self.server.pool
        assert pool is not None and self.startup is not None
        session, self.warm = self.warm, None
        try:
            if session is None:
                session = await pool.connect(
                    self.startup, self._client_key, self._server_key, self._hand_slot, self._md5
                )
                self._end_login()  # logged in: the server's first ReadyForQuery came
                log_event(logging.DEBUG, "server_session", action="create", role=self.role,
                          database=self.database, pid=session.pid, client=self.peer)
            else:
                log_event(logging.DEBUG, "server_session", action="reuse", role=self.role,
                          database=self.database, pid=session.pid, client=self.peer)
            await pool.prepare(session, self.startup)
        except asyncio.CancelledError:
            if session is not None:
                self._hand_slot(session)
                session.close("shutdown")
            self._release()
            raise
        except pool_mod.ServerRefused as exc:
            if session is not None:
                self._hand_slot(session)
            self._release()
            if not self._client_gone:
                self.server.backend_error(self, exc.fields)
                fields = exc.fields
                self._write(wire.build_error_response(
                    fields.get("C", "08006"), fields.get("M", ""), detail=fields.get("D"),
                ))  # fmt: skip
            self._close()
            return
        except (OSError, TimeoutError) as exc:
            reason = "timeout expired" if isinstance(exc, TimeoutError) else _reason(exc)
            self.server.dial_failed(self, reason, exc)
            self._release()
            self.fail(BackendUnreachable(reason))
            return
        except Exception:  # the per-connection boundary: log, answer, release
            log.exception("event=internal_error client=%r", self)
            if session is not None:
                self._hand_slot(session)
                session.close("internal_error")
            self._release()
            self.fail(PgGuardError("pgguard internal error"))
            return
        finally:
            self._dial = None
        if self._client_gone or self.state is State.CLOSED:
            ticket, self.ticket = self.ticket, None
            pool.give_back(session, ticket, True)
            return
        self._attach(session)

    def _hand_slot(self, session: pool_mod.ServerSession) -> None:
        """A session that is being closed keeps this client's slot until its socket is gone."""
        ticket, self.ticket = self.ticket, None
        session.adopt(ticket)

    def _attach(self, session: pool_mod.ServerSession) -> None:
        """Hand ``session`` to this client: its parameters, its process id with a secret of
        pgguard's own (``pool.client_secret``), ReadyForQuery; relay."""
        assert self.transport is not None and session.transport is not None
        self.session = session
        backend = self.backend = session.transport
        pid, key = session.pid, pool_mod.client_secret(len(session.secret) > 4)
        self.backend_pid, self.backend_key = pid, key
        self.server_cancel = session.cancel_request
        self.server.session_key(self)
        # A NegotiateProtocolVersion comes before authentication ends, as the server sends it.
        out = [session.negotiate, self._greeting]
        self._greeting = b""
        out += [wire.build_parameter_status(k, v) for k, v in session.params.items()]
        out.append(wire.build_backend_key_data(pid, key))
        out.append(wire.build_ready_for_query())
        self._write(b"".join(out))
        self._move(State.ACTIVE)
        self.server.session_started(self)
        # The native relay, which hands the server side back when the client leaves it idle
        # (relay.hand_over keep), now or past relay_after; with early bytes the Python relay,
        # which sees them.
        young = not self._early and self._native_later()
        if not self._early and not young and self._to_native(keep=True):
            return
        client_side = PooledPump(self, backend, from_client=True)
        backend_side = self._server_pump(young)
        client_side.other = backend_side
        backend_side.other = client_side
        self.transport.set_protocol(client_side)
        backend.set_protocol(backend_side)
        if self._early:
            self.bytes_in += len(self._early)
            backend.write(bytes(self._early))
            self._early.clear()
            self.idle_status = 0

    def _login_timeout(self) -> None:
        self._login_timer = None
        if self.state is State.STARTUP or self.state is State.LOGIN:
            log_event(logging.DEBUG, "login_timeout", client=self.peer)
            self._close()

    def key_received(self, pid: int, key: bytes) -> None:
        """BackendKeyData: what a cancel for this session must name."""
        self.backend_pid, self.backend_key = pid, key
        self.server.session_key(self)

    def startup_error(self, fields: dict[str, str]) -> None:
        """An ErrorResponse before the session started (wrong password, no database)."""
        self._end_login()  # the server's login is over, failed
        if not self._client_gone:  # else it answers our Terminate mid-login: not the server's fault
            self.server.backend_error(self, fields)

    def server_answered(self) -> None:
        """The server sent its first bytes: connect_timeout no longer applies."""
        _cancel(self._reply_timer)
        self._reply_timer = None

    # -------------------------------------------------------------- admission

    def queued(self, waiter: Waiter) -> None:
        if self.state is State.ADMITTING:
            self._move(State.QUEUED)
            self.waiter = waiter

    def admitted(self, ticket: Ticket) -> None:
        """The gate gave this client a ticket: dial the backend (or give it back at once)."""
        self.ticket = ticket
        self.waiter = None
        self.admitted_at = time.time()
        if self._client_gone or self.state is State.CLOSED:
            warm, self.warm = self.warm, None
            if warm is not None:  # [pool]: the warm session goes back as it came, with the slot
                ticket, self.ticket = self.ticket, None
                assert self.server.pool is not None and ticket is not None
                self.server.pool.put_back(warm, ticket)
                return
            self._release()
            return
        warm = self.warm
        if warm is not None:
            # [pool]: a warm session is logged in already; it needs no login slot.
            self._move(State.DIALING)
            pool = self.server.pool
            assert pool is not None and self.startup is not None
            if pool.ready(warm, self.startup):
                self.warm = None  # the common hand-over: no statement to run, no task
                log_event(logging.DEBUG, "server_session", action="reuse", role=self.role,
                          database=self.database, pid=warm.pid, client=self.peer)
                self._attach(warm)
                return
            self._dial = self.server.loop.create_task(self._pooled_session())
            return
        slot = self.login_slot = self.server.take_login(self)
        if slot.held:
            self._start_login()
            return
        self._move(State.LOGIN_WAIT)
        connect_timeout = self.server.config.backend.connect_timeout
        self._slot_timer = self.server.loop.call_later(connect_timeout, self._login_wait_timeout)

    def _start_login(self) -> None:
        """Holding a login slot: dial the server ([pool]: log a new server session in)."""
        self._move(State.DIALING)
        login = self._pooled_session() if self.pooled else self._connect_backend()
        self._dial = self.server.loop.create_task(login)

    def login_granted(self) -> None:
        """The control layer gave this waiting session a login slot: dial now."""
        _cancel(self._slot_timer)
        self._slot_timer = None
        if self.state is State.LOGIN_WAIT:
            self._start_login()
        else:  # not reached: a session that stops waiting gives its slot back first
            self._end_login()

    def _login_wait_timeout(self) -> None:
        """No login slot within connect_timeout: the answer a dial that timed out gets."""
        self._slot_timer = None
        if self.state is not State.LOGIN_WAIT:
            return
        self._end_login()  # leaves the login queue
        self.server.login_timed_out(self)
        self._release()
        self.fail(BackendUnreachable("timeout expired"))

    def reject(self, exc: PgGuardError) -> None:
        """Answer a client still in startup with a FATAL ErrorResponse and close."""
        self.fail(exc)

    def refuse(self, exc: PgGuardError) -> None:
        """Answer a socket the server will not take at all (no startup read) and close it."""
        self._move(State.CLOSED)
        self._write(wire.build_error(exc))
        self._close()

    async def _connect_backend(self) -> None:
        cfg = self.server.config.backend
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                transport, proto = await self.server.open_backend(lambda: BackendAuth(self))
        except asyncio.CancelledError:
            self._release()
            raise
        except (OSError, TimeoutError, PgGuardError) as exc:
            reason = "timeout expired" if isinstance(exc, TimeoutError) else _reason(exc)
            self.server.dial_failed(self, reason, exc)
            self._release()
            # Not reached (refused, timeout): 57P03, so pg_isready says "rejecting". A TLS
            # failure means a server that answered: 08006, as libpq reports it.
            unreachable = isinstance(exc, TimeoutError) or (
                isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError)
            )
            self.fail(BackendUnreachable(reason) if unreachable else BackendUnavailable(reason))
            return
        except Exception:  # the per-connection boundary: log, answer, release
            log.exception("event=internal_error client=%r", self)
            self._release()
            self.fail(PgGuardError("pgguard internal error"))
            return
        finally:
            self._dial = None
        assert isinstance(proto, BackendAuth)
        if self._client_gone or self.state is State.CLOSED:
            transport.close()  # its connection_lost releases the ticket
            return
        self.backend = transport
        self._backend_proto = proto
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            proto.strip_channel_binding = tls.strip_needed(
                None if self.client_tls is None else self.client_tls.certificate,
                ssl_object.getpeercert(binary_form=True),
            )
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._move(State.AUTH)
        assert self.startup is not None
        transport.write(self.startup.raw)
        if self._early:
            self.bytes_in += len(self._early)
            transport.write(bytes(self._early))
            self._early.clear()
        # A server that accepts the TCP connection but never answers is as unreachable as
        # one that refuses it: connect_timeout also bounds the wait for its first reply.
        self._reply_timer = self.server.loop.call_later(cfg.connect_timeout, self._backend_silent)

    def _backend_silent(self) -> None:
        self._reply_timer = None
        if self.state is not State.AUTH or self._client_gone:
            return
        self.server.dial_failed(self, "timeout expired")
        exc = BackendUnreachable("timeout expired")
        # Nothing came from the server yet, so the client is still waiting for its first
        # reply: answer like a failed dial (fail() writes nothing once in AUTH).
        self._write(
            wire.build_error(exc)
        )
        self.fail(exc)  # closes both sides; the backend's connection_lost releases the slot

    # ------------------------------------------------------------------- relay

    def ready_for_query(self) -> None:
        """First ReadyForQuery: hand both sockets to the native relay, or both transports to raw pumps."""
        self._end_login()
        if self._client_gone:
            # The client left while the server was finishing its login: the Terminate is on
            # its way and close_timeout runs; there is no session to hand over.
            return
        assert self.transport is not None and self.backend is not None
        self._move(State.ACTIVE)
        auth, self._backend_proto = self._backend_proto, None
        self.server.session_started(self)
        young = self._native_later()
        if young:
            if auth is not None and auth.reader.take_rest():
                young = False  # the server sent more already: frame from a boundary or not at all
        elif self._to_native(None if auth is None else auth.reader):
            return
        client_side = Pump(self, self.backend, from_client=True)
        backend_side = self._server_pump(young)
        client_side.other = backend_side
        backend_side.other = client_side
        self.transport.set_protocol(client_side)
        self.backend.set_protocol(backend_side)

    def _native_later(self) -> bool:
        """True when the native relay should take this session, but only past relay_after."""
        cfg = self.server.config.server
        return cfg.relay_after > 0 and self.client_tls is None and relay.wanted(cfg.relay)

    def _to_native(self, reader: wire.MessageReader | None = None, *, keep: bool = False) -> bool:
        """Hand both sockets to the native relay now; False when the session stays in Python."""
        server = self.server
        native = relay.hand_over(self, reader, mode=server.config.server.relay, loop=server.loop,
                                 keep=keep)
        if native is None:
            return False
        self._native = native  # relay.py: the transports are NativeEnd objects now
        self.__class__ = _Relayed
        return True

    def _server_pump(self, young: bool) -> Pump:
        assert self.transport is not None
        if young:
            promote_at = time.monotonic() + self.server.config.server.relay_after
            return YoungPump(self, self.transport, promote_at=promote_at)
        return Pump(self, self.transport, from_client=False)

    def promote(self) -> None:
        """YoungPump: relay_after has passed and the server is at a ReadyForQuery."""
        if self._client_gone or self._backend_gone or self.state is not State.ACTIVE:
            return
        self._to_native(keep=self.session is not None)

    # ------------------------------------------------------------------ close

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_lost()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def client_lost(self) -> None:
        """The client socket is gone, whatever the state."""
        if self._client_gone:
            return
        self._client_gone = True
        self._end_login()  # a login slot held or waited for
        if self._slot_timer is not None:
            self._slot_timer.cancel()
            self._slot_timer = None
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        if self._reply_timer is not None:
            self._reply_timer.cancel()
            self._reply_timer = None
        handshake = self._handshake
        if handshake is not None and handshake is not asyncio.current_task():
            handshake.cancel()  # every task a connection starts ends when it ends
        state = self.state
        self._move(State.CLOSED)
        if state is State.QUEUED and self.waiter is not None:
            self.server.leave_queue(self.waiter)
            self.waiter = None
        if self.pooled and self._pooled_lost(state):
            self.server.client_closed(self)
            return
        backend = self.backend
        if backend is not None and not self._backend_gone:
            # Tell the server we are leaving (harmless if the client already sent X), then
            # give it close_timeout to close its socket before we close it ourselves.
            try:
                backend.write(wire.TERMINATE)
            except Exception:  # a transport already closing may refuse; it is going anyway
                pass
            if not backend.is_closing():
                # The client may have stopped reading before it left, so the pump paused
                # reading from the server: read (and drop) what the server still sends, or it
                # stays blocked in send() and never sees the cancel nor the Terminate.
                backend.resume_reading()
            if state is State.ACTIVE and self.idle_status == 0 and self.backend_pid is not None:
                # A query is running: the server would not read the Terminate (nor count the
                # session gone) until it ends, so cancel it, as the client could have.
                cancel = wire.build_cancel_request(self.backend_pid, self.backend_key)
                self.server.forward_cancel(wire.CancelRequest(self.backend_pid, self.backend_key, cancel))
            timeout = self.server.config.backend.close_timeout
            self._close_timer = self.server.loop.call_later(timeout, backend.abort)
        elif self._dial is None:
            self._release()
        self.server.client_closed(self)

    def _pooled_lost(self, state: State) -> bool:
        """[pool] The client left: True when its server session went back to the pool.

        A session idle outside a transaction is reset and kept (with the slot); any other is
        closed the usual way below (Terminate, a cancel mid-query, the slot released when
        the server has closed the socket).
        """
        if self._login is not None:
            self._login.cancel()
            self._login = None
        session = self.session
        if session is None or self._backend_gone:
            return False
        self.session = None
        if isinstance(self.backend, relay.NativeEnd):
            fd, self._released_fd = self._released_fd, None
            if fd is None:  # the relay kept the server side: it ends the usual way
                session.detach("client_left_busy")
                return False
            ticket, self.ticket = self.ticket, None
            self.backend = None
            assert self.server.pool is not None
            self.server.pool.give_back_fd(session, ticket, fd)
            return True
        if state is State.ACTIVE and self.idle_status == IDLE:
            ticket, self.ticket = self.ticket, None
            self.backend = None
            assert self.server.pool is not None
            self.server.pool.give_back(session, ticket, True)
            return True
        session.detach("client_left_busy")
        return False

    def released(self, fd: int) -> None:
        """[pool] The native relay handed the server side back (the client left it idle)."""
        self._released_fd = fd
        self.client_lost()

    def backend_lost(self) -> None:
        """The backend socket is gone: give the slot back, close the client."""
        if self._backend_gone:
            return
        self._backend_gone = True
        if self.session is not None:
            self.session.detach("server_closed")
            self.session = None
        for timer in (self._reply_timer, self._close_timer):
            _cancel(timer)
        self._reply_timer = self._close_timer = None
        self._release()
        if not self._client_gone and self.transport is not None:
            proto = self._backend_proto
            if self.state in (State.DIALING, State.AUTH) and (proto is None or proto.silent_close()):
                # The server closed before the session started and said nothing (a fast
                # shutdown, a crash, a proxy in front of it): the client still waits for a
                # message, so it gets one instead of a bare end of file.
                self.server.backend_closed_early(self)
                exc = BackendLost("the server closed the connection before the session started")
                self._write(wire.build_error(exc))
            self._move(State.CLOSED)
            self.transport.close()

    def _release(self) -> None:
        """Give back the session's slot, and its login slot if it still holds one."""
        self._end_login()
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            self.server.release(ticket)

    def _end_login(self) -> None:
        """The server login is over (or never starts): its login slot back, exactly once."""
        slot = self.login_slot
        if slot is not None:
            self.login_slot = None
            self.server.end_login(slot)

    def fail(self, exc: PgGuardError) -> None:
        """Answer ``exc`` if the client is still before authentication, then close."""
        if self.state in (
            State.STARTUP, State.LOGIN, State.ADMITTING, State.QUEUED, State.LOGIN_WAIT, State.DIALING
        ):
            if not (isinstance(exc, ProtocolViolation) and exc.silent):
                self._write(
                    wire.build_error(exc)
                )
        if self.state is State.QUEUED and self.waiter is not None:
            self.server.leave_queue(self.waiter)
            self.waiter = None
        self._close()
        if self.backend is not None and not self._backend_gone:
            self.backend.close()

    def terminate(self, exc: PgGuardError) -> None:
        """Close a live session with a FATAL ErrorResponse (admin kill, idle timeout, faults)."""
        if self.transport is not None and not self._client_gone:
            self._write(
                wire.build_error(exc)
            )
        self._close()

    def _write(self, data: bytes) -> None:
        if self._handshake is not None:
            return  # the raw socket belongs to the TLS layer now: never write clear bytes
        if self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(data)
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop both sockets at once (a stop without drain); their connection_lost clean up."""
        if self.transport is not None:
            self.transport.abort()
        if self.backend is not None:
            self.backend.abort()

class _Relayed(ClientConnection):
    """A session whose bytes the native relay moves (relay.py): the counters are the relay's.

    ``ready_for_query`` switches a handed-over session to this class, so the Python pump
    keeps updating plain attributes at no cost while these properties (which shadow the
    instance's attributes, kept as the counts from before the hand-over) read the relay's.
    """

    _native: Any  # the relay's session: bytes_in, bytes_out, last_active, status

    @property
    def bytes_in(self) -> int:
        return int(self.__dict__["bytes_in"] + self._native.bytes_in)

    @bytes_in.setter
    def bytes_in(self, value: int) -> None:
        self.__dict__["bytes_in"] = value - self._native.bytes_in

    @property
    def bytes_out(self) -> int:
        return int(self.__dict__["bytes_out"] + self._native.bytes_out)

    @bytes_out.setter
    def bytes_out(self, value: int) -> None:
        self.__dict__["bytes_out"] = value - self._native.bytes_out

    @property
    def last_active(self) -> float:
        return max(float(self.__dict__["last_active"]), float(self._native.last_active))

    @last_active.setter
    def last_active(self, value: float) -> None:
        self.__dict__["last_active"] = value

    @property
    def idle_status(self) -> int:
        return int(self._native.status)

    @idle_status.setter
    def idle_status(self, value: int) -> None:
        pass  # the relay tracks it from the server's messages



def _replay(transport: asyncio.Transport, before: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand ``data`` to the protocol start_tls installed on ``transport``, as if just read.

    asyncio's and uvloop's SSL protocols are buffered protocols (get_buffer/buffer_updated);
    a plain protocol gets data_received.
    """
    proto = transport.get_protocol()
    if proto is before or transport.is_closing():
        transport.abort()  # start_tls did not take over; its task ends the connection
        return
    get_buffer = getattr(proto, "get_buffer", None)
    if get_buffer is None:
        proto.data_received(data)  # type: ignore[attr-defined]
        return
    view = memoryview(data)
    while view:
        buffer = get_buffer(len(view))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        proto.buffer_updated(n)  # type: ignore[attr-defined]
        view = view[n:]



def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PgGuardError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

