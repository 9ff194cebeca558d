"""The native relay's asyncio side: hand a live session's sockets to pgguard._relay and back.

Theory
------
After the server's first ReadyForQuery, ``ClientConnection.ready_for_query`` asks
``hand_over`` whether the native relay takes the session. It does when the C extension is
built, ``[server] relay`` allows it, neither side uses TLS, nothing is left in either
transport's write buffer and the server sent nothing past that ReadyForQuery. Then both
transports stop reading, their sockets are duplicated (``os.dup``) and given to the relay
thread, and the transports are aborted with a protocol that ignores their
``connection_lost``: the sockets live on in the duplicates, nothing read is lost (the loop
reads nothing after ``pause_reading``) and nothing is closed twice (each side closes only
its own descriptor).

The session's ``transport`` and ``backend`` become two ``NativeEnd`` objects with the few
transport methods the rest of pgguard calls (write, close, abort, is_closing), so every
path that ends a session is today's: a write to the client end is a take-back (the relay
writes it at the server's next message boundary), a write to the server end goes after
what the client sent, ``close`` flushes then closes, ``abort`` closes now. The relay
reports each side closed through an eventfd the loop watches; the session then runs
``client_lost`` or ``backend_lost`` exactly as the Python pump's ``connection_lost`` does:
Terminate (and a CancelRequest mid-query) to the server when the client left, the client
closed when the server left, the slot released once, when the server socket is gone. (The
relay writes that Terminate itself as the client side closes, unless the client's last
bytes were one, so ``client_lost``'s own is dropped: one wake-up of its thread less.)

One relay thread serves the process (started with the server, ``start``, or else at the
first hand-over, and never stopped: it sleeps in epoll_wait with no session). Its eventfd is watched by the loop of
the latest hand-over; events of a session whose loop is not the running one are dropped
(only a test suite runs several loops, one after the other).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Final, Protocol

from . import tls, wire


class Session(Protocol):
    """The session handed over (proxy.ClientConnection), as the relay sees it."""

    transport: asyncio.Transport | None
    backend: asyncio.Transport | None
    client_tls: tls.ClientTLS | None
    idle_status: int

    def client_lost(self) -> None: ...

    def backend_lost(self) -> None: ...

    def released(self, fd: int) -> None: ...

try:
    from . import _relay as _native  # type: ignore[attr-defined]
except ImportError:  # not built (no compiler, not Linux): the Python relay does everything
    _native = None

__all__ = ["available", "wanted", "start", "hand_over", "native_sessions", "NativeEnd", "BUFSIZE"]

log = logging.getLogger("pgguard")

# The most the native relay reads at once, and so holds per direction of a session (the
# side feeding a non-empty buffer is not read: back-pressure). Allocated only while bytes
# wait, so an idle session holds none. 256 KiB, as much as uvloop reads at once and the
# Python relay's WRITE_HIGH_WATER: COPY moves in as few system calls as there.
BUFSIZE: Final = 256 * 1024
# The relay's event kinds (pgguard/_relay.c).
_CLIENT_CLOSED: Final = 1
_BACKEND_CLOSED: Final = 2
# Detail of a client-closed event of a ``keep`` session: the server's descriptor is ours again.
_RELEASED: Final = -2

_relay: Any = None  # the process's _relay.Relay, started by the first hand-over
_watched: asyncio.AbstractEventLoop | None = None
_warned = False


def available() -> bool:
    """True when the C extension is built and importable."""
    return _native is not None


def wanted(mode: str) -> bool:
    """True when ``[server] relay`` = ``mode`` lets the native relay take sessions here."""
    return _wanted(mode)


def start(mode: str, loop: asyncio.AbstractEventLoop) -> None:
    """Start the relay thread now when ``mode`` will use it (server start), not at the first
    hand-over: its epoll and eventfd descriptors then belong to the process from its start,
    like its listeners, whenever (and whether) a session first lives past ``relay_after``."""
    if _wanted(mode):
        try:
            _watch(loop)
        except OSError as exc:  # hand_over tries again, and says so, at each session
            log.warning("event=relay_unavailable relay=native reason=%r fallback=python", str(exc))


def _wanted(mode: str) -> bool:
    global _warned
    if mode == "python":
        return False
    if _native is None:
        if mode == "native" and not _warned:
            _warned = True
            log.warning("event=relay_unavailable relay=native reason=%r fallback=python",
                        "pgguard._relay is not built")
        return False
    return True


def _watch(loop: asyncio.AbstractEventLoop) -> Any:
    """The relay, its eventfd watched by ``loop``."""
    global _relay, _watched
    relay = _relay
    if relay is None:
        relay = _relay = _native.Relay(bufsize=BUFSIZE)
    if _watched is not loop:
        old, _watched = _watched, loop
        if old is not None and not old.is_closed():
            old.remove_reader(relay.fileno())
        loop.add_reader(relay.fileno(), _dispatch, relay)
    return relay


class _Detached(asyncio.Protocol):
    """The protocol of a transport whose socket the relay took: its close means nothing."""

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class NativeEnd:
    """One side of a relayed session, in the shape of the transport it replaced."""

    __slots__ = ("_session", "_client", "_closing", "client_gone", "fd")

    def __init__(self, session: Any, *, client: bool, fd: int = -1) -> None:
        self._session = session
        self._client = client
        self._closing = False
        self.client_gone = False  # the server end: the relay has told the server already
        self.fd = fd  # the relay's descriptor for this side (pgguard.testing polls it)

    def write(self, data: bytes) -> None:
        """To the client: written at the server's next message boundary. To the server:
        after what the client sent. Ignored once closing, as a closed transport's write."""
        if self._closing or not data:
            return
        if self.client_gone and data == wire.TERMINATE:
            return  # the relay sent it when the client left (a wake-up of its thread saved)
        if self._client:
            self._session.send_client(data)
        else:
            self._session.send_backend(data)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            if self._client:
                self._session.close_client()
            else:
                self._session.close_backend()

    def abort(self) -> None:
        # Also after close(): a flush that never ends (a peer that stopped reading) is cut.
        self._closing = True
        if self._client:
            self._session.abort_client()
        else:
            self._session.abort_backend()

    def is_closing(self) -> bool:
        return self._closing

    def closed(self) -> None:
        """The relay closed this side."""
        self._closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "fileno" and not self._closing:
            return self.fd
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Link:
    """What the relay reports to: the session and its two ends."""

    __slots__ = ("conn", "client", "backend", "loop")

    def __init__(self, conn: Session, client: NativeEnd, backend: NativeEnd,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.client = client
        self.backend = backend
        self.loop = loop


def hand_over(
    conn: Session,
    auth_reader: wire.MessageReader | None,
    *,
    mode: str,
    loop: asyncio.AbstractEventLoop,
    keep: bool = False,
) -> Any:
    """Give a session that just got its first ReadyForQuery to the native relay.

    Returns the relay's session (its ``bytes_in``, ``bytes_out``, ``last_active`` and
    ``status`` count from zero, now and ``conn.idle_status``), after replacing
    ``conn.transport`` and ``conn.backend`` by ``NativeEnd`` objects; or None when the
    session stays with the Python relay (see the module docstring). Raises nothing.

    ``keep`` ([pool]): when the client leaves while the server is idle, the relay hands the
    server's descriptor back open and the session's ``released(fd)`` runs instead of
    ``client_lost`` (see _relay.c).
    """
    if not _wanted(mode):
        return None
    client, backend = conn.transport, conn.backend
    if client is None or backend is None or conn.client_tls is not None:
        return None
    if backend.get_extra_info("ssl_object") is not None:
        return None  # conn.client_tls covers the client side
    if client.get_write_buffer_size() or backend.get_write_buffer_size():
        return None  # bytes still in the loop's hands; rare (the client is slow to read)
    if auth_reader is not None and auth_reader.take_rest():
        return None  # the server already sent more: the relay must start on a message boundary
    csock, bsock = client.get_extra_info("socket"), backend.get_extra_info("socket")
    if csock is None or bsock is None:
        return None
    try:
        relay = _watch(loop)
    except OSError as exc:
        log.warning("event=relay_unavailable relay=native reason=%r fallback=python", str(exc))
        return None
    client.pause_reading()
    backend.pause_reading()
    try:
        cfd = os.dup(csock.fileno())
    except OSError:  # out of descriptors: this session stays in Python
        client.resume_reading()
        backend.resume_reading()
        return None
    try:
        bfd = os.dup(bsock.fileno())
    except OSError:
        os.close(cfd)
        client.resume_reading()
        backend.resume_reading()
        return None
    client_end = NativeEnd(None, client=True, fd=cfd)
    backend_end = NativeEnd(None, client=False, fd=bfd)
    link = _Link(conn, client_end, backend_end, loop)
    try:
        session = relay.add(cfd, bfd, link, status=conn.idle_status, keep=keep)
    except Exception:  # the relay refused (closed): the descriptors are still ours
        os.close(cfd)
        os.close(bfd)
        client.resume_reading()
        backend.resume_reading()
        log.exception("event=internal_error client=%s", conn)
        return None
    client_end._session = backend_end._session = session
    for transport in (client, backend):
        transport.set_protocol(_Detached())
        transport.abort()  # closes the loop's descriptor only; the relay has its own
    conn.transport = client_end  # type: ignore[assignment]
    conn.backend = backend_end  # type: ignore[assignment]
    return session


def _dispatch(relay: Any) -> None:
    """The relay's eventfd is readable: run each closed side's handler."""
    running = asyncio.get_running_loop()
    for link, kind, detail, _final in relay.events():
        if link.loop is not running:
            continue  # a session of a loop that is gone (see the module docstring)
        conn = link.conn
        try:
            if kind == _CLIENT_CLOSED and detail == _RELEASED:
                link.client.closed()
                link.backend.closed()
                conn.released(link.backend.fd)
            elif kind == _CLIENT_CLOSED:
                link.client.closed()
                link.backend.client_gone = True
                if detail > 0:
                    log.debug("event=client_error client=%s error=%r", conn, os.strerror(detail))
                conn.client_lost()
            elif kind == _BACKEND_CLOSED:
                link.backend.closed()
                if detail > 0:
                    log.debug("event=backend_error client=%s error=%r", conn, os.strerror(detail))
                conn.backend_lost()
        except Exception:  # the per-connection boundary
            log.exception("event=internal_error client=%s", conn)


def native_sessions() -> int:
    """Sessions the native relay holds now (either side still open), for tests and metrics."""
    return 0 if _relay is None else int(_relay.sessions)
