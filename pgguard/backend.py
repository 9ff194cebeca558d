"""Reaching the PostgreSQL server: session dials (TCP, Unix socket, pgguard's own SSLRequest) and cancels.

``Backend`` is built from ``[backend]`` and the TLS settings ``tls.load`` made, and rebuilt on
every reload. It opens the server connection of an admitted session (``open``), sends a
CancelRequest on a connection of its own (``send_cancel``), and answers whether the server
accepts a TCP connection at all (``probe``, for ``/readyz``). It decides nothing: which
cancels to send and what a failure means to the client is the control layer's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import tls
from .config import BackendConfig

__all__ = ["Backend", "unix_socket_path"]


def unix_socket_path(directory: str, port: int) -> str:
    """The server's Unix-domain socket in ``directory``: ``.s.PGSQL.<port>``, as libpq names it."""
    return f"{directory.rstrip('/') or '/'}/.s.PGSQL.{port}"


class Backend:
    """How to reach the server, per ``[backend]``: host or socket directory, port, TLS."""

    def __init__(
        self, config: BackendConfig, backend_tls: tls.BackendTLS, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.config = config
        self.tls = backend_tls
        self.loop = loop

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @property
    def unix_path(self) -> str | None:
        """The Unix socket to dial when ``host`` is a directory (libpq's convention), else None."""
        if self.config.host.startswith("/"):
            return unix_socket_path(self.config.host, self.config.port)
        return None

    async def open(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """Connect, with TLS as ``sslmode`` says, and attach ``factory()``.

        With an sslmode that tries TLS, sends pgguard's own SSLRequest and reads the one-byte
        answer: ``S`` starts TLS (verifying as the mode says), ``N`` continues in clear for
        ``prefer``. Raises OSError (ssl.SSLError included) or BackendUnavailable.
        """
        cfg, loop = self.config, self.loop
        path = self.unix_path
        if path is not None:
            # No TLS on a Unix socket (PostgreSQL offers none there); each message costs the
            # kernel less than over loopback TCP (measured: pgguard's CPU per pgbench -S
            # transaction -18%).
            transport, proto = await loop.create_unix_connection(factory, path)
            return transport, proto
        if self.tls.context is None:
            transport, proto = await loop.create_connection(factory, cfg.host, cfg.port)
            return transport, proto
        raw, answer = await loop.create_connection(_SSLAnswer, cfg.host, cfg.port)
        assert isinstance(answer, _SSLAnswer)
        try:
            raw.write(tls.SSL_REQUEST)
            upgraded: asyncio.Transport | None = raw  # prefer, and the server said N: clear
            if tls.read_ssl_response(await answer.byte, self.tls.sslmode):
                upgraded = await loop.start_tls(
                    raw,
                    answer,
                    self.tls.context,
                    server_hostname=self.tls.server_hostname,
                    ssl_handshake_timeout=cfg.connect_timeout,
                )
            if upgraded is None or upgraded.is_closing():
                raise ConnectionResetError("server closed the connection during SSL negotiation")
        except BaseException:
            raw.abort()
            raise
        proto = factory()
        upgraded.set_protocol(proto)
        proto.connection_made(upgraded)
        return upgraded, proto

    async def send_cancel(self, raw: bytes) -> None:
        """Deliver one CancelRequest on a connection of its own, within ``connect_timeout``.

        Raises OSError or TimeoutError; the socket is closed either way.
        """
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                path = self.unix_path
                if path is not None:
                    reader, writer = await asyncio.open_unix_connection(path)
                else:
                    reader, writer = await asyncio.open_connection(self.config.host, self.config.port)
                writer.write(raw)
                await writer.drain()
                # The server closes after reading it; wait for that so the cancel is delivered.
                await reader.read(1)
        finally:
            if writer is not None:
                writer.close()

    async def probe(self, timeout: float) -> str | None:
        """Why the server cannot be reached (a bounded TCP or Unix-socket connect), or None.

        The connection is closed at once without a byte, which PostgreSQL does not log.
        """
        try:
            async with asyncio.timeout(timeout):
                path = self.unix_path
                if path is not None:
                    _, writer = await asyncio.open_unix_connection(path)
                else:
                    _, writer = await asyncio.open_connection(self.config.host, self.config.port)
            writer.close()
        except TimeoutError:
            return f"server {self.address}: timeout expired"
        except OSError as exc:
            return f"server {self.address}: {exc.strerror or exc}"
        return None


class _SSLAnswer(asyncio.Protocol):
    """Reads the server's answer to pgguard's SSLRequest (tls.read_ssl_response judges it)."""

    def __init__(self) -> None:
        self.byte: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.byte.done():
            self.byte.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.byte.done():
            self.byte.set_exception(exc or ConnectionResetError("server closed the connection"))
