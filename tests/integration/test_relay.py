"""The relay: after admission pgguard is invisible. Real clients do real work through it.

Every test runs on both relays: the native one (pgguard._relay, skipped when it is not
built) and the Python one, chosen through PGGUARD_RELAY, the default of ``[server] relay``.
Also the backend failures: a closed port, a listener that never completes the TCP handshake
and one that accepts but never answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import socket
import struct
import time
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from pgguard import relay as relay_mod
from pgguard.errors import AdminShutdown
from pgguard.testing.cluster import free_port
from pgguard.testing.wait import await_until

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=["native", "python"], autouse=True)
def relay_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which relay the guards of this test use. "native" from the first ReadyForQuery on
    (``relay_after = 0``), so every test here runs whole on each relay; the move from one to
    the other mid-session has tests of its own below."""
    if request.param == "native" and not relay_mod.available():
        pytest.skip("pgguard._relay is not built")
    monkeypatch.setenv("PGGUARD_RELAY", request.param)
    if request.param == "native":
        monkeypatch.setenv("PGGUARD_SERVER__RELAY_AFTER", "0")
    return str(request.param)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = "/nonexistent/pgpass"
    env["PGCONNECT_TIMEOUT"] = "20"
    return env


async def run(*argv: str, timeout: float = 90) -> tuple[int, str, str]:
    """A client program as a subprocess, so the loop pgguard runs on keeps running."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def relay(guard):  # type: ignore[no-untyped-def]
    """A guard with a role limit that is never reached (the relay must not care)."""
    return await guard('[roles.app]\nmax_connections = 10\nqueue_timeout = 60')


@pytest.fixture
async def app(relay) -> AsyncIterator[asyncpg.Connection]:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(relay.dsn("app"), timeout=30)
    yield conn
    await conn.close()


async def test_prepared_statements_asyncpg(app: asyncpg.Connection) -> None:
    stmt = await app.prepare("select $1::int * 2, $2::text || 'x'")
    for i in range(50):
        assert await stmt.fetchrow(i, str(i)) == (i * 2, f"{i}x")
    assert [r[0] for r in await app.fetch("select generate_series(1, $1)", 5)] == [1, 2, 3, 4, 5]


async def test_prepared_statements_psycopg(relay) -> None:  # type: ignore[no-untyped-def]
    async with await psycopg.AsyncConnection.connect(relay.conninfo("app"), connect_timeout=20) as conn:
        for i in range(10):
            cur = await conn.execute("select %s::int + 1", (i,), prepare=True)
            assert await cur.fetchone() == (i + 1,)
        cur = await conn.execute(
            "select count(*) from pg_prepared_statements where statement like 'select $1::int + 1'"
        )
        assert await cur.fetchone() == (1,)


async def test_copy_in_and_out_of_several_megabytes(app: asyncpg.Connection) -> None:
    await app.execute("create temp table blob (id int, payload text)")
    lines = b"".join(b"%d\t%s\n" % (i, hashlib.sha256(b"%d" % i).hexdigest().encode() * 4) for i in range(25000))
    assert len(lines) > 6_000_000
    status = await app.copy_to_table("blob", source=io.BytesIO(lines))
    assert status == "COPY 25000"
    out = io.BytesIO()
    await app.copy_from_query("select id, payload from blob order by id", output=out)
    assert hashlib.sha256(out.getvalue()).hexdigest() == hashlib.sha256(lines).hexdigest()
    assert await app.fetchval("select sum(length(payload)) from blob") == 25000 * 256


async def test_large_result_set(app: asyncpg.Connection) -> None:
    rows = await app.fetch("select i, repeat('x', 200) from generate_series(1, 200000) i")
    assert len(rows) == 200000  # ~50 MB on the wire
    assert sum(r[0] for r in rows) == 200000 * 200001 // 2
    assert rows[-1][1] == "x" * 200


async def test_listen_notify_across_two_sessions(relay) -> None:  # type: ignore[no-untyped-def]
    listener = await asyncpg.connect(relay.dsn("app"), timeout=30)
    sender = await asyncpg.connect(relay.dsn("app2"), timeout=30)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("pgguard_chan", lambda *args: got.put_nowait(args[3]))
    for i in range(3):
        await sender.execute(f"notify pgguard_chan, 'hello {i}'")
    assert [await asyncio.wait_for(got.get(), 10) for _ in range(3)] == ["hello 0", "hello 1", "hello 2"]
    await listener.close()
    await sender.close()


async def _sleeping(pg_conn: asyncpg.Connection) -> int:
    return int(
        await pg_conn.fetchval(
            "select count(*) from pg_stat_activity where query like 'select pg_sleep(30)%' "
            "and state = 'active' and usename = 'app'"
        )
    )


@pytest.fixture
async def direct(pg) -> AsyncIterator[asyncpg.Connection]:  # type: ignore[no-untyped-def]
    """A superuser session straight to PostgreSQL, to watch the server's own view."""
    conn = await asyncpg.connect(pg.dsn(), timeout=30)
    yield conn
    await conn.close()


async def test_query_cancel_asyncpg_timeout(relay, app: asyncpg.Connection, direct) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await app.execute("select pg_sleep(30)", timeout=0.5)  # asyncpg sends a CancelRequest
    assert await app.fetchval("select 42") == 42
    assert time.monotonic() - start < 10
    assert await _sleeping(direct) == 0
    assert relay.server.stats.cancels_forwarded == 1
    assert relay.server.control.counts().sessions_active == 1  # the cancel connection was never counted


async def test_query_cancel_asyncpg_wait_for(app: asyncpg.Connection, direct) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(app.fetchval("select pg_sleep(30)"), 0.5)
    assert await app.fetchval("select 'still here'") == "still here"
    assert time.monotonic() - start < 10
    assert await _sleeping(direct) == 0


async def test_query_cancel_psycopg(relay, direct) -> None:  # type: ignore[no-untyped-def]
    conn = await psycopg.AsyncConnection.connect(relay.conninfo("app"), connect_timeout=20)
    query = asyncio.create_task(conn.execute("select pg_sleep(30)"))
    await await_until(lambda: _sleeping(direct), what="pg_sleep to run on the server")
    start = time.monotonic()
    await conn.cancel_safe(timeout=10)
    with pytest.raises(psycopg.errors.QueryCanceled):
        await query
    assert time.monotonic() - start < 5
    await conn.rollback()
    cur = await conn.execute("select 1")
    assert await cur.fetchone() == (1,)
    await conn.close()


async def test_client_leaving_mid_query_cancels_it_and_frees_the_slot(guard, direct) -> None:  # type: ignore[no-untyped-def]
    """The server does not read the Terminate while a query runs: pgguard cancels the query,
    so the session ends (and its slot frees) long before close_timeout."""
    g = await guard("[backend]\nclose_timeout = 60\n[roles.app]\nmax_connections = 1")
    conn = await asyncpg.connect(g.dsn("app"), timeout=30)
    query = asyncio.create_task(conn.execute("select pg_sleep(30)"))
    await await_until(lambda: _sleeping(direct), what="pg_sleep to run on the server")
    start = time.monotonic()
    conn.terminate()  # the client vanishes without a word
    query.cancel()
    await g.wait_idle(timeout=20)
    assert time.monotonic() - start < 10
    assert await _sleeping(direct) == 0
    # and the slot really is free: the next client of the role gets in at once
    again = await asyncpg.connect(g.dsn("app"), timeout=10)
    assert await again.fetchval("select 1") == 1
    await again.close()


async def test_idle_client_leaving_sends_no_cancel(relay, app: asyncpg.Connection) -> None:  # type: ignore[no-untyped-def]
    assert await app.fetchval("select 1") == 1
    await app.close()
    await relay.wait_idle()
    assert relay.server.stats.cancels_forwarded == 0


async def test_psql_sslmode_prefer_connects(relay) -> None:  # type: ignore[no-untyped-def]
    code, out, err = await run("psql", "-X", "-A", "-t", "-w", "-d", relay.conninfo("app", sslmode="prefer"),
                               "-c", "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()")  # fmt: skip
    assert code == 0, err
    assert out.strip() == "app|f"
    code, _, err = await run("psql", "-X", "-w", "-d", relay.conninfo("app", sslmode="require"), "-c", "select 1")
    assert code != 0 and "server does not support SSL" in err


async def test_pgbench_through_pgguard_has_no_failures(guard, pg) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.app]\nmax_connections = 4\nqueue_timeout = 60')
    base = ["-h", "127.0.0.1", "-p", str(g.port), "-U", "app", "otherdb"]
    code, _, err = await run("pgbench", "-i", "-q", "-s", "1", *base)
    assert code == 0, err
    code, out, err = await run("pgbench", "-S", "-c", "4", "-j", "2", "-T", "3", "-n", *base)
    assert code == 0, err + out
    assert re.search(r"number of failed transactions: 0 \(", out), out
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert processed > 100
    await g.wait_idle()
    await asyncio.to_thread(pg.psql, "drop table if exists pgbench_accounts, pgbench_branches, "
                            "pgbench_history, pgbench_tellers", database="otherdb")  # fmt: skip


# -------------------------------------------------------------- backend failures


async def test_closed_backend_port_gives_57p03_and_frees_the_slot(guard) -> None:  # type: ignore[no-untyped-def]
    """An unreachable server is answered as PostgreSQL answers when it cannot take
    connections (57P03), the reason in DETAIL, so health checks read "rejecting"."""
    g = await guard(f'[backend]\nport = {free_port()}\n[roles.app]\nmax_connections = 1\npolicy = "reject"')
    for _ in range(2):  # the slot is free again each time
        with pytest.raises(asyncpg.CannotConnectNowError) as info:
            await asyncpg.connect(g.dsn("app"), timeout=30)
        assert info.value.sqlstate == "57P03"
        assert info.value.message == "the database system is not accepting connections"
        assert info.value.detail.startswith("pgguard could not connect to the server: ")
        await g.wait_idle()
    with pytest.raises(psycopg.OperationalError, match="the database system is not accepting connections"):
        await psycopg.AsyncConnection.connect(g.conninfo("app"), connect_timeout=20)
    await g.wait_idle()
    assert g.server.stats.dial_failures == 3


@pytest.fixture
def full_backlog() -> AsyncIterator[int]:  # type: ignore[misc]
    """A fake backend (a real server always completes the handshake): a listener with a full
    accept queue, so a further connect never completes and only connect_timeout ends it."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):  # the backlog of 0 lets one or two in; the rest hang in SYN_SENT
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    lsock.close()


async def test_backend_dial_timeout_gives_57p03(guard, full_backlog: int) -> None:  # type: ignore[no-untyped-def]
    g = await guard(f"[backend]\nport = {full_backlog}\nconnect_timeout = 0.5\n[roles.app]\nmax_connections = 1")
    start = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(g.dsn("app"), timeout=30)
    assert info.value.sqlstate == "57P03"
    assert info.value.detail == "pgguard could not connect to the server: timeout expired"
    assert 0.4 < time.monotonic() - start < 10
    await g.wait_idle()


async def test_backend_that_accepts_and_never_answers_gives_57p03(guard) -> None:  # type: ignore[no-untyped-def]
    """A fake backend: accepts the TCP connection, reads the startup packet, never replies
    (a real PostgreSQL cannot be made to hang like this). connect_timeout covers the wait for
    the server's first reply, so the client gets 57P03 and the slot comes back."""
    accepted: list[asyncio.StreamWriter] = []

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # until pgguard gives up

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    g = await guard(f"[backend]\nport = {port}\nconnect_timeout = 0.5\n[roles.app]\nmax_connections = 1")
    try:
        start = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(g.dsn("app"), timeout=30)
        assert info.value.sqlstate == "57P03"
        assert info.value.detail == "pgguard could not connect to the server: timeout expired"
        assert 0.4 < time.monotonic() - start < 10
        assert len(accepted) == 1
        await g.wait_idle()
        assert g.server.clients == {}
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------- the relay itself


async def test_live_sessions_use_the_relay_asked_for(relay, relay_kind: str) -> None:  # type: ignore[no-untyped-def]
    before = relay_mod.native_sessions()
    conn = await asyncpg.connect(relay.dsn("app"), timeout=30)
    assert await conn.fetchval("select 1") == 1
    assert relay_mod.native_sessions() - before == (1 if relay_kind == "native" else 0)
    [client] = relay.server.clients.values()
    # the control plane's view of the session, whichever relay moves its bytes
    bytes_in, bytes_out = client.bytes_in, client.bytes_out
    idle_before = client.last_active
    assert await conn.fetchval("select repeat('x', 100000)") == "x" * 100000
    assert client.bytes_in > bytes_in and client.bytes_out > bytes_out + 100000
    assert client.last_active > idle_before
    assert client.idle_status == ord("I")
    async with conn.transaction():
        await conn.execute("select 1")
        assert client.idle_status == ord("T")
    assert client.idle_status == ord("I")
    await conn.close()
    await relay.wait_idle()
    assert relay.server.control.bytes_relayed()[1] >= client.bytes_out
    await await_until(lambda: relay_mod.native_sessions() == before, what="the relay to let go")


async def test_kill_mid_result_gives_a_clean_fatal(relay, relay_kind: str) -> None:  # type: ignore[no-untyped-def]
    """A session killed while the server streams a large result: on the native relay the
    FATAL goes in between two messages, so the client reads PostgreSQL's 57P01, not a torn
    message. (The Python relay writes it at a chunk boundary: only native is checked.)"""
    if relay_kind != "native":
        pytest.skip("the Python relay writes a take-back at a chunk boundary")
    conn = await psycopg.AsyncConnection.connect(relay.conninfo("app"), connect_timeout=20)
    [client] = relay.server.clients.values()
    start = client.bytes_out
    cur = conn.cursor()
    query = asyncio.create_task(cur.execute("select repeat('x', 1000) from generate_series(1, 2000000)"))
    await await_until(lambda: client.bytes_out > start + 1_000_000, what="the result to stream")
    relay.server.control.terminate(client, AdminShutdown())
    with pytest.raises(psycopg.errors.AdminShutdown, match="terminating connection due to administrator command"):
        await query
    await relay.wait_idle()
    await conn.close()


async def test_client_reset_mid_query_cancels_it_and_frees_the_slot(guard, direct) -> None:  # type: ignore[no-untyped-def]
    """An abortive close (RST) while a query runs: as for a FIN, the query is cancelled.
    The client speaks the protocol on a raw socket, to close it with SO_LINGER 0."""
    g = await guard("[backend]\nclose_timeout = 60\n[roles.app]\nmax_connections = 1")
    reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
    params = b"user\x00app\x00database\x00postgres\x00\x00"
    writer.write(struct.pack("!II", 8 + len(params), 196608) + params)
    await asyncio.wait_for(reader.readuntil(b"Z\x00\x00\x00\x05I"), 30)
    writer.write(b"Q" + struct.pack("!I", 4 + 20) + b"select pg_sleep(30)\x00")
    await await_until(lambda: _sleeping(direct), what="pg_sleep to run on the server")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    start = time.monotonic()
    await g.wait_idle(timeout=20)
    assert time.monotonic() - start < 10
    assert await _sleeping(direct) == 0


async def test_server_ending_the_session_closes_the_client_and_frees_the_slot(relay, direct) -> None:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(relay.dsn("app"), timeout=30)
    pid = await conn.fetchval("select pg_backend_pid()")
    assert await direct.fetchval("select pg_terminate_backend($1)", pid)
    await relay.wait_idle()
    await await_until(lambda: not relay.server.clients, what="the client to be closed")
    await await_until(conn.is_closed, what="asyncpg to see its connection closed")


async def test_many_sessions_at_once_each_get_their_own_bytes(relay) -> None:  # type: ignore[no-untyped-def]
    conns = [await asyncpg.connect(relay.dsn("app"), timeout=30) for _ in range(8)]

    async def work(i: int, conn: asyncpg.Connection) -> None:
        for j in range(50):
            assert await conn.fetchval("select $1::text || repeat('y', $2)", f"{i}:{j}", 3000) == f"{i}:{j}" + "y" * 3000

    await asyncio.gather(*(work(i, c) for i, c in enumerate(conns)))
    for c in conns:
        await c.close()
    await relay.wait_idle()


# ----------------------------------------------------- from the Python relay to the native one


async def _until_native(conn: asyncpg.Connection, before: int, timeout: float = 15.0) -> int:
    """Run queries until the native relay holds one more session (relay_after has passed and a
    ReadyForQuery ended a chunk); returns how many queries that took."""
    deadline = time.monotonic() + timeout
    queries = 0
    while relay_mod.native_sessions() == before:
        assert time.monotonic() < deadline, "the session never moved to the native relay"
        assert await conn.fetchval("select 1") == 1
        queries += 1
    return queries


async def test_a_session_moves_to_the_native_relay_past_relay_after(guard, relay_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Young sessions stay on the Python relay; past relay_after the native one takes the
    session at a ReadyForQuery, and nothing about it changes for the client."""
    if relay_kind != "native":
        pytest.skip("the move is to the native relay")
    monkeypatch.delenv("PGGUARD_SERVER__RELAY_AFTER")  # this test's own value
    g = await guard("[server]\nrelay_after = 0.2\n[roles.app]\nmax_connections = 10")
    before = relay_mod.native_sessions()
    conn = await asyncpg.connect(g.dsn("app"), timeout=30)
    stmt = await conn.prepare("select $1::int + 1")
    assert await stmt.fetchval(1) == 2
    assert relay_mod.native_sessions() == before  # young: still the Python relay's
    [client] = g.server.clients.values()
    assert await _until_native(conn, before) >= 1
    # The same server session, its prepared statement, transaction status and counters.
    assert await stmt.fetchval(41) == 42
    async with conn.transaction():
        await conn.execute("select 1")
        assert client.idle_status == ord("T")
    assert client.idle_status == ord("I")
    out = client.bytes_out
    assert await conn.fetchval("select repeat('x', 300000)") == "x" * 300000
    assert client.bytes_out > out + 300000
    await conn.close()
    await g.wait_idle()
    await await_until(lambda: relay_mod.native_sessions() == before, what="the relay to let go")


async def test_a_session_that_ends_young_never_reaches_the_native_relay(guard, relay_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    if relay_kind != "native":
        pytest.skip("the move is to the native relay")
    monkeypatch.delenv("PGGUARD_SERVER__RELAY_AFTER")  # this test's own value
    g = await guard("[server]\nrelay_after = 60\n[roles.app]\nmax_connections = 10")
    before = relay_mod.native_sessions()
    for _ in range(3):
        conn = await asyncpg.connect(g.dsn("app"), timeout=30)
        assert await conn.fetchval("select count(*) from generate_series(1, 1000)") == 1000
        assert relay_mod.native_sessions() == before
        await conn.close()
    await g.wait_idle()
    assert relay_mod.native_sessions() == before
