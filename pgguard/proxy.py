"""One client session: startup, admission, backend dial, relay until ReadyForQuery, raw pump, release.

Theory
------
A ``ClientConnection`` is the asyncio protocol of one accepted socket. Its ``state`` moves
forward only::

    STARTUP --StartupMessage--> ADMITTING --admit--> DIALING --connected--> AUTH --'Z'--> ACTIVE
                                   |   \\--queue--> QUEUED --admitted--/
                                   \\--reject--> CLOSED (ErrorResponse 53300)
    any state --either side gone--> CLOSED

STARTUP reads SSLRequest / GSSENCRequest (answered ``N`` unless TLS is on), CancelRequest
(forwarded to the server at once, never counted) and the StartupMessage, within
``client_login_timeout``. From admission on, the session holds a ``Ticket``; it is given
back exactly once, through ``_release``, when the backend socket is gone (or never came):
PostgreSQL removes a backend from its own counts before it closes the socket, so the next
waiter can never make ``pg_stat_activity`` show one more than the limit.

AUTH relays bytes both ways unchanged while framing the server's messages to notice
BackendKeyData, ErrorResponse and the first ReadyForQuery. Then both transports are handed
to ``_Pump`` protocols that do nothing but write each chunk into the peer's transport,
with aiohttp-style flow control: when one side's write buffer is full, reading from the
other side pauses until it drains. No per-message parsing after ReadyForQuery.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Final, cast

from . import relay, tls, wire
from .errors import BackendUnavailable, EncryptionRequired, PgGuardError, ProtocolViolation
from .limits import Ticket, Waiter

if TYPE_CHECKING:
    from .server import Server

__all__ = ["ClientConnection", "State"]

log = logging.getLogger("pgguard")

# A client should send nothing between its StartupMessage and the server's first reply;
# whatever it does send before the backend is connected is kept, up to this bound.
MAX_EARLY_DATA: Final = 64 * 1024
# Write-buffer marks for both transports of a session: past HIGH, reading from the peer
# pauses; under LOW it resumes. Bounds memory per session at about HIGH per direction.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
# Seconds a closing TLS client gets to answer our close_notify before the socket is dropped.
TLS_SHUTDOWN_TIMEOUT: Final = 5.0

_ids = itertools.count(1)


class State(enum.Enum):
    STARTUP = "startup"
    ADMITTING = "admitting"
    QUEUED = "queued"
    DIALING = "dialing"
    AUTH = "authenticating"
    ACTIVE = "active"
    CLOSED = "closed"


class ClientConnection(asyncio.Protocol):
    """The client side of one session, and the owner of its backend connection and ticket."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.id = next(_ids)
        self.state = State.STARTUP
        self.transport: asyncio.Transport | None = None
        self.backend: asyncio.Transport | None = None
        self.peer = ""
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
        self._timer: asyncio.TimerHandle | None = None
        self._dial: asyncio.Task[None] | None = None
        self._backend_proto: _BackendAuth | None = None
        self._ssl_asked = False
        self._gss_asked = False
        # TLS (see tls.py): client_tls is what this client negotiated (None: clear). While
        # _handshake runs, self.transport is still the raw socket: nothing may be written to
        # it, and decrypted bytes that arrive before the task swaps transports wait in
        # _tls_early. _hello collects a direct-TLS ClientHello before the handshake starts.
        self.client_tls: tls.ClientTLS | None = None
        self._handshake: asyncio.Task[None] | None = None
        self._tls_early = bytearray()
        self._hello: bytearray | None = None
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
        return f"<client {self.id} {self.peer} {self.role}@{self.database} {self.state.value}>"

    # ----------------------------------------------------------------- startup

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not a subclass of asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        addr = transport.get_extra_info("peername")
        if isinstance(addr, tuple):
            self.peer = f"{addr[0]}:{addr[1]}"
        elif addr:
            self.peer = str(addr)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        loop = self.server.loop
        self._timer = loop.call_later(
            self.server.config.server.client_login_timeout, self._login_timeout
        )
        self.server.client_opened(self)

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
            elif self.state in (State.ADMITTING, State.QUEUED, State.DIALING):
                self._early += data
                if len(self._early) > MAX_EARLY_DATA:
                    raise ProtocolViolation("client sent too much data before authentication")
        except PgGuardError as exc:
            self.fail(exc)
        except Exception:  # the per-connection boundary: log, answer, release
            log.exception("event=internal_error client=%s", self)
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
        hello_bytes = self._hello = (self._hello or bytearray()) + data
        hello = tls.parse_client_hello(hello_bytes)  # ProtocolViolation(silent) on garbage
        if hello is wire.NEED_DATA:
            return
        assert isinstance(hello, tls.ClientHello)
        refusal = tls.direct_tls_refusal(hello)
        if refusal is not None:
            reason, reply = refusal
            log.info("event=tls_refused client=%s reason=%r", self.peer, reason)
            if reply:
                self._write(reply)
            self._close()
            return
        self._hello = None
        self._start_tls(bytes(hello_bytes))

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
            log.info("event=tls_handshake_failed client=%s error=%r", self.peer, exc)
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
        self._cancel_timer()
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
            self.state = State.CLOSED
            early, self._early = bytes(self._early), bytearray()
            self.server.open_admin(self, early)
            return
        self.state = State.ADMITTING
        self.server.admit(self)

    def _login_timeout(self) -> None:
        self._timer = None
        if self.state is State.STARTUP:
            log.debug("event=login_timeout client=%s", self)
            self._close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -------------------------------------------------------------- admission

    def queued(self, waiter: Waiter) -> None:
        if self.state is State.ADMITTING:
            self.state = State.QUEUED
            self.waiter = waiter

    def admitted(self, ticket: Ticket) -> None:
        """The gate gave this client a ticket: dial the backend (or give it back at once)."""
        self.ticket = ticket
        self.waiter = None
        self.admitted_at = time.time()
        if self._client_gone or self.state is State.CLOSED:
            self._release()
            return
        self.state = State.DIALING
        self._dial = self.server.loop.create_task(self._connect_backend())

    def reject(self, exc: PgGuardError) -> None:
        """Answer a client still in startup with a FATAL ErrorResponse and close."""
        self.fail(exc)

    async def _connect_backend(self) -> None:
        cfg = self.server.config.backend
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                transport, proto = await self.server.open_backend(lambda: _BackendAuth(self))
        except asyncio.CancelledError:
            self._release()
            raise
        except (OSError, TimeoutError, PgGuardError) as exc:
            reason = "timeout expired" if isinstance(exc, TimeoutError) else _reason(exc)
            self.server.dial_failed(self, reason)
            self._release()
            self.fail(BackendUnavailable(reason))
            return
        except Exception:  # the per-connection boundary: log, answer, release
            log.exception("event=internal_error client=%s", self)
            self._release()
            self.fail(PgGuardError("pgguard internal error"))
            return
        finally:
            self._dial = None
        assert isinstance(proto, _BackendAuth)
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
        self.state = State.AUTH
        assert self.startup is not None
        transport.write(self.startup.raw)
        if self._early:
            self.bytes_in += len(self._early)
            transport.write(bytes(self._early))
            self._early.clear()
        # A server that accepts the TCP connection but never answers is as unreachable as
        # one that refuses it: connect_timeout also bounds the wait for its first reply.
        self._timer = self.server.loop.call_later(cfg.connect_timeout, self._backend_silent)

    def _backend_silent(self) -> None:
        self._timer = None
        if self.state is not State.AUTH or self._client_gone:
            return
        self.server.dial_failed(self, "timeout expired")
        exc = BackendUnavailable("timeout expired")
        # Nothing came from the server yet, so the client is still waiting for its first
        # reply: answer like a failed dial (fail() writes nothing once in AUTH).
        self._write(wire.build_error_response(exc.sqlstate, exc.message, severity=exc.severity))
        self.fail(exc)  # closes both sides; the backend's connection_lost releases the slot

    # ------------------------------------------------------------------- relay

    def ready_for_query(self) -> None:
        """First ReadyForQuery: hand both sockets to the native relay, or both transports to raw pumps."""
        assert self.transport is not None and self.backend is not None
        self.state = State.ACTIVE
        auth, self._backend_proto = self._backend_proto, None
        self.server.session_started(self)
        native = relay.hand_over(self, None if auth is None else auth.reader)
        if native is not None:  # relay.py: the transports are NativeEnd objects now
            self._native = native
            self.__class__ = _Relayed
            return
        client_side = _Pump(self, self.backend, from_client=True)
        backend_side = _Pump(self, self.transport, from_client=False)
        client_side.other = backend_side
        backend_side.other = client_side
        self.transport.set_protocol(client_side)
        self.backend.set_protocol(backend_side)

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
        self._cancel_timer()
        state, self.state = self.state, State.CLOSED
        if state is State.QUEUED and self.waiter is not None:
            self.server.gate.cancel(self.waiter)
            self.waiter = None
        backend = self.backend
        if backend is not None and not self._backend_gone:
            # Tell the server we are leaving (harmless if the client already sent X), then
            # give it close_timeout to close its socket before we close it ourselves.
            try:
                backend.write(wire.TERMINATE)
            except Exception:  # a transport already closing may refuse; it is going anyway
                pass
            if state is State.ACTIVE and self.idle_status == 0 and self.backend_pid is not None:
                # A query is running: the server would not read the Terminate (nor count the
                # session gone) until it ends, so cancel it, as the client could have.
                cancel = wire.build_cancel_request(self.backend_pid, self.backend_key)
                self.server.forward_cancel(wire.CancelRequest(self.backend_pid, self.backend_key, cancel))
            timeout = self.server.config.backend.close_timeout
            self._timer = self.server.loop.call_later(timeout, backend.abort)
        elif self._dial is None:
            self._release()
        self.server.client_closed(self)

    def backend_lost(self) -> None:
        """The backend socket is gone: give the slot back, close the client."""
        if self._backend_gone:
            return
        self._backend_gone = True
        self._cancel_timer()
        self._release()
        if not self._client_gone and self.transport is not None:
            self.state = State.CLOSED
            self.transport.close()

    def _release(self) -> None:
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            self.server.release(ticket)

    def fail(self, exc: PgGuardError) -> None:
        """Answer ``exc`` if the client is still before authentication, then close."""
        if self.state in (State.STARTUP, State.ADMITTING, State.QUEUED, State.DIALING):
            if not (isinstance(exc, ProtocolViolation) and exc.silent):
                self._write(
                    wire.build_error_response(
                        exc.sqlstate, exc.message, severity=exc.severity, detail=exc.detail
                    )
                )
        if self.state is State.QUEUED and self.waiter is not None:
            self.server.gate.cancel(self.waiter)
            self.waiter = None
        self._close()
        if self.backend is not None and not self._backend_gone:
            self.backend.close()

    def terminate(self, exc: PgGuardError) -> None:
        """Close a live session with a FATAL ErrorResponse (admin kill, idle timeout, faults)."""
        if self.transport is not None and not self._client_gone:
            self._write(
                wire.build_error_response(
                    exc.sqlstate, exc.message, severity=exc.severity, detail=exc.detail
                )
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


class _BackendAuth(asyncio.Protocol):
    """The backend side until the first ReadyForQuery: relay unchanged, frame to watch.

    With ``strip_channel_binding`` set (a TLS server whose SASL list the client must not
    see whole, see tls.py) the framed messages are forwarded instead of the raw chunks,
    AuthenticationSASL rewritten, until ReadyForQuery; the common path stays raw.
    """

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.reader = wire.MessageReader()
        self.strip_channel_binding = False

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client.state is State.AUTH and not client._client_gone:
            client._cancel_timer()  # the server answered: connect_timeout no longer applies
        framed = self.strip_channel_binding
        if not framed:
            self._forward(data)
        reader = self.reader
        reader.feed(data)
        out: list[bytes] = []
        try:
            while True:
                message = reader.next_message()
                if not isinstance(message, tuple):  # NEED_DATA
                    break
                tag, body = message
                if framed:
                    if tag == b"R":
                        body = tls.strip_channel_binding(body)
                    out.append(wire.build_message(tag, body))
                if tag == b"Z":
                    if framed:
                        out.append(reader.take_rest())
                        self._forward(b"".join(out))
                    client.ready_for_query()
                    return
                if tag == b"K":
                    client.backend_pid, client.backend_key = wire.parse_backend_key_data(body)
                elif tag == b"E":
                    fields = wire.parse_error_fields(body)
                    client.server.backend_error(client, fields)
        except ProtocolViolation as exc:
            log.warning("event=backend_protocol_error client=%s error=%r", client, exc.message)
            client.fail(exc)
            return
        if out:
            self._forward(b"".join(out))

    def _forward(self, data: bytes) -> None:
        client = self.client
        if client.transport is not None and not client._client_gone:
            client.bytes_out += len(data)
            client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.backend_lost()

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None and not self.client._client_gone:
            self.client.transport.resume_reading()


class _Pump(asyncio.Protocol):
    """One direction of an established session: every chunk goes straight to the peer.

    ``pause_writing`` fires on the protocol whose *own* transport's write buffer is full,
    so it pauses reading on the peer (which is what fills that buffer).
    """

    __slots__ = ("session", "peer", "other", "from_client", "paused")

    def __init__(
        self, session: ClientConnection, peer: asyncio.Transport, *, from_client: bool
    ) -> None:
        self.session = session
        self.peer = peer  # the transport this side's data is written to
        self.other: _Pump | None = None
        self.from_client = from_client
        self.paused = False

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)
        session = self.session
        if self.from_client:
            session.bytes_in += len(data)
            if not data.endswith(wire.TERMINATE):
                # A query (or more) is on its way. A Terminate is not one: the server reads
                # it at once, so a client that says goodbye and closes (libpq does) leaves an
                # idle session, and client_lost sends no CancelRequest (each costs the server
                # a process).
                session.idle_status = 0
        else:
            session.bytes_out += len(data)
            session.idle_status = _idle_status(data, session.idle_status)
        session.last_active = time.monotonic()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        # Our transport is full: stop reading from the peer that feeds it.
        if not self.paused:
            self.paused = True
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        # Also reached after the AUTH-phase protocol paused the peer (paused is False then).
        self.paused = False
        if not self.peer.is_closing():
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.from_client:
            self.session.client_lost()
        else:
            self.session.backend_lost()


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


# ReadyForQuery: 'Z', Int32 5, then the transaction status byte.
_READY_HEADER: Final = b"Z\x00\x00\x00\x05"
# What a server may send unasked while idle: NotificationResponse, NoticeResponse, ParameterStatus.
_ASYNC_TYPES: Final = b"ANS"


def _idle_status(data: bytes, previous: int) -> int:
    """The session's idle status after a chunk from the server (see ``idle_status``).

    A chunk ending in a ReadyForQuery leaves the server waiting for the client. The chunk
    after it starts on a message boundary: an asynchronous message keeps the session idle,
    anything else is the reply to a pipelined query. A ReadyForQuery split across chunks
    reads as busy, which only errs on the side of not closing a session.
    """
    if data[-6:-1] == _READY_HEADER:
        return data[-1]
    if previous and data[0] in _ASYNC_TYPES:
        return previous
    return 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PgGuardError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

