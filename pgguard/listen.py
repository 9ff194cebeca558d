"""Listening sockets that pgguard accepts on itself, so that running out of descriptors is seen, counted and survived.

Why not ``loop.create_server``: when accept(2) fails, uvloop (libuv) handles it out of
sight. For EMFILE/ENFILE it frees a spare descriptor, accepts every pending connection and
closes it at once without a word to anyone (libuv's "EMFILE trick": 762 of 1,000 flood
connections once, nothing logged), and for an error it passes on (EMFILE again when the
spare is gone, ENOBUFS, ENOMEM) it closes the listening socket itself, again silently, so
the port stops answering for good. An ``Acceptor`` calls accept itself: a failure goes to
its ``on_error`` (the control layer counts ``fd_exhausted`` and logs it, rate-limited) and
accepting pauses for ``ACCEPT_RETRY_DELAY``, the connections waiting in the kernel's backlog
meanwhile, as PostgreSQL's postmaster leaves them. Each accepted socket becomes a transport
through ``loop.connect_accepted_socket`` with the caller's protocol.

``bind`` makes the sockets ``create_server`` used to make: one per address of the host,
SO_REUSEADDR, SO_REUSEPORT when asked (``[server] workers``), IPv6 sockets IPv6-only.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Final

__all__ = ["ACCEPT_BATCH", "ACCEPT_RETRY_DELAY", "LISTEN_BACKLOG", "Acceptor", "bind"]

# Connections waiting in the kernel for pgguard to accept them, per listening socket.
LISTEN_BACKLOG: Final = 4096
# Accepts per readiness event before the loop serves others (asyncio's own accept batches too).
ACCEPT_BATCH: Final = 128
# After a failed accept, wait this long before the next try: PostgreSQL's postmaster sleeps
# 100 ms there too (pqcomm.c, StreamConnection: "delay a bit before trying again").
ACCEPT_RETRY_DELAY: Final = 0.1


class Acceptor:
    """Accepts on one listening socket and gives each connection a ``factory()`` protocol.

    ``on_error`` gets every failed accept (the socket stays open; accepting resumes after
    ``ACCEPT_RETRY_DELAY``). ``close`` stops accepting, closes the socket and cancels the
    hand-overs still in flight.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        on_error: Callable[[OSError], None],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.on_error = on_error
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        # Hand-overs in flight (a strong reference each until connection_made has run).
        self._serving: set[asyncio.Task[None]] = set()
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the peer gave up while in the backlog
            except OSError as exc:
                self.on_error(exc)
                self._pause()
                return
            task = self.loop.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:  # the peer reset between accept and here: nothing to serve
            conn.close()

    def _pause(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self._retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in list(self._serving):
            task.cancel()


def bind(
    host: str | None, port: int, *, reuse_port: bool = False, backlog: int = LISTEN_BACKLOG
) -> list[socket.socket]:
    """Non-blocking listening sockets for every address ``host`` names (all when empty).

    Raises OSError (the socket's errno, the address in the message) when one cannot be bound;
    then none is left open.
    """
    infos = socket.getaddrinfo(
        host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                problem = (exc.strerror or str(exc)).lower()
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {problem}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks
