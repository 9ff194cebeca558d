"""Bad input on raw sockets: PostgreSQL's answer or a close, and nothing leaks or crashes.

Every test here ends by checking that pgguard holds no slot, no waiter and no client, and that
a well-behaved client is still served.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time

import asyncpg
import pytest

from pgguard import wire
from pgguard.testing.wait import await_until

pytestmark = pytest.mark.asyncio

LOGIN_TIMEOUT = 0.5
TOML = f"[server]\nclient_login_timeout = {LOGIN_TIMEOUT}\n"


def _startup(params: dict[str, str], protocol: int = wire.PROTOCOL_3_0) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!ii", 8 + len(body), protocol) + body


class Raw:
    """One raw TCP client of pgguard."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, g) -> Raw:  # type: ignore[no-untyped-def]
        reader, writer = await asyncio.open_connection(g.host, g.port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_to_eof(self, timeout: float = 15.0) -> bytes:
        """Everything pgguard sends until it closes (a reset counts as a close)."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return b""

    async def read_message(self, timeout: float = 15.0) -> tuple[bytes, bytes]:
        header = await asyncio.wait_for(self.reader.readexactly(5), timeout)
        (length,) = struct.unpack("!I", header[1:])
        body = await asyncio.wait_for(self.reader.readexactly(length - 4), timeout)
        return header[:1], body

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def settled(g) -> None:  # type: ignore[no-untyped-def]
    """No slot, no waiter, no client object left; and a real client still gets served."""
    await g.wait_idle()
    await await_until(lambda: not g.server.clients, what="pgguard to forget every client")
    conn = await asyncpg.connect(g.dsn("app"), timeout=30)
    assert await conn.fetchval("select 1") == 1
    await conn.close()
    await g.wait_idle()


GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: pgguard\r\n\r\n",
    "tls_hello_without_tls": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    "random": b"\x7f" + os.urandom(200),
    "negative_length": struct.pack("!i", -5) + b"xxxxxxxx",
    "length_4": struct.pack("!ii", 4, wire.PROTOCOL_3_0),
    "length_7": struct.pack("!i", 7) + b"abc",
    "length_10001": struct.pack("!ii", 10001, wire.PROTOCOL_3_0) + b"u" * 100,
    "ssl_request_too_long": struct.pack("!iii", 12, wire.SSL_REQUEST_CODE, 0),
    "cancel_key_too_short": struct.pack("!iii", 12, wire.CANCEL_REQUEST_CODE, 1),
}


@pytest.mark.parametrize("payload", list(GARBAGE.values()), ids=list(GARBAGE))
async def test_garbage_and_bad_lengths_close_without_reply(guard, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML)
    raw = await Raw.open(g)
    raw.send(payload)
    assert await raw.read_to_eof() == b""
    await raw.close()
    await settled(g)


async def test_no_user_gets_28000(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML)
    raw = await Raw.open(g)
    raw.send(_startup({"database": "postgres"}))
    reply = await raw.read_to_eof()
    assert reply == wire.build_error_response(
        "28000", "no PostgreSQL user name specified in startup packet"
    )
    await raw.close()
    await settled(g)


async def test_protocol_2_gets_0a000(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML)
    raw = await Raw.open(g)
    raw.send(_startup({"user": "app"}, protocol=0x00020000))
    reply = await raw.read_to_eof()
    assert reply == (
        b"E\x00\x00\x00\x59SFATAL\x00VFATAL\x00C0A000\x00"
        b"Munsupported frontend protocol 2.0: server supports 3.0 to 3.2\x00\x00"
    )
    await raw.close()
    await settled(g)


async def test_duplicate_ssl_request_is_a_protocol_violation(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML)
    raw = await Raw.open(g)
    ssl_request = struct.pack("!ii", 8, wire.SSL_REQUEST_CODE)
    raw.send(ssl_request)
    assert await asyncio.wait_for(raw.reader.readexactly(1), 10) == b"N"
    raw.send(ssl_request)
    reply = await raw.read_to_eof()
    assert reply[:1] == b"E" and b"C08P01\x00" in reply
    await raw.close()
    await settled(g)


async def test_ssl_and_gssenc_requests_answered_n_then_startup_proceeds(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML)
    raw = await Raw.open(g)
    raw.send(struct.pack("!ii", 8, wire.GSSENC_REQUEST_CODE))
    assert await asyncio.wait_for(raw.reader.readexactly(1), 10) == b"N"
    raw.send(struct.pack("!ii", 8, wire.SSL_REQUEST_CODE))
    assert await asyncio.wait_for(raw.reader.readexactly(1), 10) == b"N"
    raw.send(_startup({"user": "app", "database": "postgres"}))
    assert await raw.read_message() == (b"R", b"\x00\x00\x00\x00")  # trust: AuthenticationOk
    while (await raw.read_message())[0] != b"Z":
        pass
    raw.send(wire.TERMINATE)
    assert await raw.read_to_eof() == b""
    await raw.close()
    await settled(g)


async def test_truncated_packet_then_close(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML)
    for _ in range(5):
        raw = await Raw.open(g)
        raw.send(_startup({"user": "app"})[:-3])
        await raw.close()
    await settled(g)


async def test_truncated_packet_is_closed_after_client_login_timeout(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML)
    raw = await Raw.open(g)
    raw.send(_startup({"user": "app"})[:-1])
    start = time.monotonic()
    assert await raw.read_to_eof() == b""
    assert LOGIN_TIMEOUT * 0.8 <= time.monotonic() - start < 10
    await raw.close()
    await settled(g)


async def test_silent_client_is_closed_after_client_login_timeout(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML)
    raws = [await Raw.open(g) for _ in range(10)]
    start = time.monotonic()
    for raw in raws:
        assert await raw.read_to_eof() == b""
    assert LOGIN_TIMEOUT * 0.8 <= time.monotonic() - start < 10
    for raw in raws:
        await raw.close()
    await settled(g)


async def test_cancel_request_is_forwarded_and_never_counted(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML + "[limits]\nmax_connections = 0\npolicy = 'reject'\n")
    raw = await Raw.open(g)
    raw.send(struct.pack("!iiii", 16, wire.CANCEL_REQUEST_CODE, 12345, 678))
    assert await raw.read_to_eof() == b""  # as PostgreSQL: no reply to a CancelRequest
    await raw.close()
    await await_until(lambda: g.server.stats.cancels_forwarded == 1, what="the cancel to be forwarded")
    stats = g.server.stats
    assert stats.admissions == 0 and sum(stats.rejections.values()) == 0
    g.server.control.set_limit("total", "", -1)
    await settled(g)


async def test_clients_vanishing_while_queued_leave_nothing(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML + "[roles.app]\nmax_connections = 0\nqueue_timeout = 60\n")
    control = g.server.control
    raws = []
    for _ in range(20):
        raw = await Raw.open(g)
        raw.send(_startup({"user": "app", "database": "postgres"}))
        raws.append(raw)
    await await_until(lambda: control.counts().clients_waiting == 20, what="20 clients to queue")
    for raw in raws:
        await raw.close()
    await await_until(lambda: control.counts().clients_waiting == 0, what="the queue to empty")
    assert control.counts().sessions_active == 0
    g.server.control.set_limit("role", "app", -1)
    await settled(g)


async def test_client_vanishing_mid_scram_frees_the_slot(pg, guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML + "[roles.scram_user]\nmax_connections = 1\npolicy = 'reject'\n")
    for _ in range(3):
        raw = await Raw.open(g)
        raw.send(_startup({"user": "scram_user", "database": "postgres"}))
        tag, body = await raw.read_message()
        assert tag == b"R" and body[:4] == struct.pack("!i", 10)  # AuthenticationSASL
        assert b"SCRAM-SHA-256" in body
        await raw.close()  # and never answers the challenge
        await g.wait_idle()
    await await_until(
        lambda: asyncio.to_thread(lambda: pg.connection_count(users=["scram_user"]) == 0),
        what="the abandoned server sessions to exit",
    )
    conn = await asyncpg.connect(g.dsn("scram_user", password="s3cret pass"), timeout=30)
    assert await conn.fetchval("select current_user") == "scram_user"
    await conn.close()
    await settled(g)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_bad_clients_leave_no_file_descriptors(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(TOML + "[roles.app2]\nmax_connections = 0\nqueue_timeout = 60\n"
                    "[roles.scram_user]\nmax_connections = 2\n")  # fmt: skip
    await settled(g)  # warm up whatever is created lazily (the first dial, the first psql)
    before = _open_fds()

    async def garbage(payload: bytes) -> None:
        raw = await Raw.open(g)
        raw.send(payload)
        await raw.read_to_eof()
        await raw.close()

    async def vanish_queued() -> None:
        raw = await Raw.open(g)
        raw.send(_startup({"user": "app2"}))
        await await_until(lambda: g.server.control.counts().clients_waiting > 0, what="a waiter")
        await raw.close()

    async def vanish_mid_auth() -> None:
        raw = await Raw.open(g)
        raw.send(_startup({"user": "scram_user", "database": "postgres"}))
        await raw.read_message()
        await raw.close()

    async def truncated() -> None:
        raw = await Raw.open(g)
        raw.send(_startup({"user": "app"})[:5])
        await raw.close()

    async def silent() -> None:
        raw = await Raw.open(g)
        await raw.read_to_eof()
        await raw.close()

    jobs = [garbage(p) for p in GARBAGE.values() for _ in range(3)]
    jobs += [garbage(_startup({"database": "x"})) for _ in range(10)]
    jobs += [vanish_queued() for _ in range(10)]
    jobs += [truncated() for _ in range(10)]
    jobs += [silent() for _ in range(10)]
    await asyncio.gather(*jobs)
    for _ in range(5):  # at most 2 at a time: the role limit, rejections otherwise
        await asyncio.gather(vanish_mid_auth(), vanish_mid_auth())
        await g.wait_idle()

    await g.wait_idle()
    await await_until(lambda: not g.server.clients, what="pgguard to forget every client")
    await await_until(lambda: _open_fds() <= before + 2, what=f"open fds to fall back to {before}")
    await settled(g)
