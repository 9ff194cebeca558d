"""A minimal PostgreSQL client on a raw socket bound to a chosen source address.

asyncpg, psycopg and psql cannot pick the local address a connection comes from; the
address-limit tests need clients from 127.0.0.2, 127.0.0.3, ... (Linux routes all of
127.0.0.0/8 to lo). This speaks just enough of the protocol (StartupMessage, trust login,
simple Query, Terminate) with pgguard's own wire builders and reader.
"""

from __future__ import annotations

import asyncio

from pgguard import wire


class RawSession:
    """One client connection from ``source``; ``login`` returns None or the ErrorResponse fields."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._messages = wire.MessageReader()

    @classmethod
    async def open(cls, port: int, source: str, host: str = "127.0.0.1") -> RawSession:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        return cls(reader, writer)

    async def _next(self, timeout: float) -> tuple[bytes, bytes]:
        while True:
            message = self._messages.next_message()
            if message is not wire.NEED_DATA:
                assert isinstance(message, tuple)
                return message
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionResetError("server closed the connection")
            self._messages.feed(data)

    async def _until_ready(self, timeout: float) -> dict[str, str] | None:
        error = None
        while True:
            tag, body = await self._next(timeout)
            if tag == b"E":
                error = wire.parse_error_fields(body)
                if error.get("S") == "FATAL":
                    return error
            elif tag == b"Z":
                return error

    async def login(
        self, user: str, database: str = "postgres", timeout: float = 30.0
    ) -> dict[str, str] | None:
        """Send the StartupMessage; wait for ReadyForQuery (None) or a FATAL (its fields)."""
        self.writer.write(wire.build_startup_message({"user": user, "database": database}))
        return await self._until_ready(timeout)

    async def query(self, sql: str, timeout: float = 30.0) -> None:
        self.writer.write(wire.build_message(b"Q", sql.encode() + b"\0"))
        error = await self._until_ready(timeout)
        assert error is None, error

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.write(wire.build_message(b"X"))
            self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def raw_login(
    port: int, source: str, user: str = "app", database: str = "postgres"
) -> tuple[RawSession, dict[str, str] | None]:
    session = await RawSession.open(port, source)
    return session, await session.login(user, database)
