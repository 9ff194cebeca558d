"""The two relays of a session's bytes: ``BackendAuth`` until the first ReadyForQuery, ``Pump`` after it.

``BackendAuth`` is the server socket's protocol while the session authenticates: it relays
the server's bytes to the client unchanged while framing them, to notice BackendKeyData,
ErrorResponse and the first ReadyForQuery (and, for a TLS server whose SASL list the client
must not see whole, to rewrite AuthenticationSASL). Then both sockets get a ``Pump``: each
chunk goes straight into the peer's transport, with aiohttp-style flow control (a full write
buffer on one side pauses reading on the other). No per-message parsing after ReadyForQuery.

Both talk to their session through ``Session`` (``proxy.ClientConnection``), never to the
layers above it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from typing import Final, Protocol

from . import tls, wire
from .errors import PgGuardError, ProtocolViolation
from .log import log_event

__all__ = ["BackendAuth", "PooledPump", "Pump", "Session", "idle_status"]


class Session(Protocol):
    """The session whose bytes a relay moves (proxy.ClientConnection)."""

    transport: asyncio.Transport | None
    peer: str
    backend_pid: int | None
    backend_key: bytes
    bytes_in: int
    bytes_out: int
    idle_status: int
    last_active: float

    @property
    def client_gone(self) -> bool: ...

    def server_answered(self) -> None: ...

    def key_received(self, pid: int, key: bytes) -> None: ...

    def startup_error(self, fields: dict[str, str]) -> None: ...

    def ready_for_query(self) -> None: ...

    def promote(self) -> None: ...

    def fail(self, exc: PgGuardError) -> None: ...

    def client_lost(self) -> None: ...

    def backend_lost(self) -> None: ...


class BackendAuth(asyncio.Protocol):
    """The backend side until the first ReadyForQuery: relay unchanged, frame to watch.

    With ``strip_channel_binding`` set (a TLS server whose SASL list the client must not
    see whole, see tls.py) the framed messages are forwarded instead of the raw chunks,
    AuthenticationSASL rewritten, until ReadyForQuery; the common path stays raw.
    """

    def __init__(self, client: Session) -> None:
        self.client = client
        self.reader = wire.MessageReader()
        self.strip_channel_binding = False
        self.error_seen = False  # the server already told the client why (an ErrorResponse)

    def silent_close(self) -> bool:
        """True when the server's close leaves the client with no message to say why.

        Only then may pgguard write one: nothing from the server is pending mid-message.
        """
        return not self.error_seen and self.reader.buffered == 0

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.server_answered()  # connect_timeout no longer applies
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
                    client.key_received(*wire.parse_backend_key_data(body))
                elif tag == b"E":
                    self.error_seen = True
                    fields = wire.parse_error_fields(body)
                    client.startup_error(fields)
        except ProtocolViolation as exc:
            log_event(logging.WARNING, "backend_protocol_error", client=client.peer, error=exc.message)
            client.fail(exc)
            return
        if out:
            self._forward(b"".join(out))

    def _forward(self, data: bytes) -> None:
        client = self.client
        if client.transport is not None and not client.client_gone:
            client.bytes_out += len(data)
            client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.backend_lost()

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None and not self.client.client_gone:
            self.client.transport.resume_reading()


class Pump(asyncio.Protocol):
    """One direction of an established session: every chunk goes straight to the peer.

    ``pause_writing`` fires on the protocol whose *own* transport's write buffer is full,
    so it pauses reading on the peer (which is what fills that buffer).
    """

    __slots__ = ("session", "peer", "other", "from_client", "paused")

    def __init__(
        self, session: Session, peer: asyncio.Transport, *, from_client: bool
    ) -> None:
        self.session = session
        self.peer = peer  # the transport this side's data is written to
        self.other: Pump | None = None
        self.from_client = from_client
        self.paused = False

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer.is_closing():
            # The other side is gone (or closing after a FATAL): its bytes have nowhere to go.
            # Reading on keeps the server unblocked until it sees the cancel and Terminate.
            return
        peer.write(data)
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
            session.idle_status = idle_status(data, session.idle_status)
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



class YoungPump(Pump):
    """The server side of a live session not yet handed to the native relay (``relay_after``).

    It frames the server's messages as they pass (a walk over the headers, no copy) so it
    knows when a chunk ends on a message boundary, the one place the native relay may start.
    At the first chunk that ends with a ReadyForQuery once ``promote_at`` (monotonic) has
    passed, it asks the session to move (``promote``). A session that ends sooner never pays
    the hand-over. A malformed length stops the framing: such a session stays here.
    """

    __slots__ = ("promote_at", "_skip", "_head", "_tag")

    def __init__(self, session: Session, peer: asyncio.Transport, *, promote_at: float) -> None:
        super().__init__(session, peer, from_client=False)
        self.promote_at = promote_at
        self._skip = 0  # bytes of the current message still to come
        self._head = b""  # the start of a message header cut by the chunk's end
        self._tag = 0  # the type of the current (or last complete) message

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._at_ready(data) and time.monotonic() >= self.promote_at:
            self.session.promote()

    def _at_ready(self, data: bytes) -> bool:
        """Frame ``data``; True when it ends exactly after a ReadyForQuery."""
        if self.promote_at == math.inf:
            return False  # framing stopped (a malformed length)
        n = len(data)
        i = self._skip
        if self._head:  # i == 0: a header was cut; complete it first
            need = 5 - len(self._head)
            head = self._head + data[:need]
            if len(head) < 5:
                self._head = head
                return False
            self._head = b""
            i = self._message(head, 0)
            if i < 0:
                return False
            i -= len(head) - need
        while i < n:
            if n - i < 5:
                self._head = data[i:]
                self._skip = 0
                return False
            i = self._message(data, i)
            if i < 0:
                return False
        self._skip = i - n
        return i == n and self._tag == _READY

    def _message(self, data: bytes, i: int) -> int:
        """The position after the message whose header starts at ``i``; -1 when malformed."""
        length = _LENGTH.unpack_from(data, i + 1)[0]
        if length < 4:
            self.promote_at = math.inf
            self._skip = 0
            self._head = b""
            self._tag = 0
            return -1
        self._tag = data[i]
        return i + 1 + length


class PooledPump(Pump):
    """The client side of a reused server session ([pool]): a Terminate sent while the session
    is idle ends the client only; the server session outlives it (pool.py resets it)."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        session = self.session
        if data == wire.TERMINATE and session.idle_status == _IDLE and session.transport is not None:
            session.transport.close()  # its connection_lost hands the server session back
            return
        super().data_received(data)


_IDLE: Final = ord("I")
_READY: Final = ord("Z")
_LENGTH: Final = struct.Struct("!I")
# ReadyForQuery: 'Z', Int32 5, then the transaction status byte.
_READY_HEADER: Final = b"Z\x00\x00\x00\x05"
# What a server may send unasked while idle: NotificationResponse, NoticeResponse, ParameterStatus.
_ASYNC_TYPES: Final = b"ANS"


def idle_status(data: bytes, previous: int) -> int:
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


