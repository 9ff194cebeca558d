"""Reuse as faithful as the relay ([pool], issue 22): real process ids, startup settings that
RESET returns to, passwords and logins that change as in PostgreSQL, and logins pgguard cannot
check going to the server. Real PostgreSQL, real clients (asyncpg, psycopg); each outcome is
compared with what the same client gets straight from the server where that is the point.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from pgguard.proxy import State
from pgguard.testing.cluster import PostgresCluster
from pgguard.testing.wait import await_until

ROLE = "fid_user"
PASSWORD = "fid-pass"
CHANGER = "fid_changer"  # a role whose password and login the tests change
NOPASS = "fid_nopass"  # no password: trust, as the test cluster's pg_hba.conf gives such roles
TRUSTING = "fid_trusting"  # a SCRAM verifier stored, yet a trust line in pg_hba.conf


@pytest.fixture(scope="module")
def fid_pg(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    pg.create_role(ROLE, password=PASSWORD)
    pg.create_role(NOPASS)
    pg.create_role(TRUSTING)
    pg.execute(f"ALTER ROLE {TRUSTING} PASSWORD 'trusting-pass'")  # no scram line: trust
    pg.create_auth_lookup()
    yield pg


@pytest.fixture(autouse=True)
def _end_server_sessions(fid_pg: PostgresCluster) -> Iterator[None]:
    yield
    fid_pg.terminate(users=[ROLE, CHANGER, NOPASS, TRUSTING])


@pytest.fixture
async def pooled(guard, fid_pg: PostgresCluster) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    """A factory of guards with reuse on; their warm sessions are closed before the leak check."""
    started = []

    async def start(more: str = "", *, monitor: bool = True, pool: str = ""):  # type: ignore[no-untyped-def]
        backend = f'[backend]\nmonitor_dsn = "{fid_pg.dsn()}"\n' if monitor else ""
        g = await guard(f"{backend}[pool]\nreuse = true\n{pool}\n{more}")
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


def _reused(g) -> int:  # type: ignore[no-untyped-def]
    return sum(int(row[6]) for row in _pool(g).rows())


# ------------------------------------------------------------------ 1. real process ids


async def test_clients_are_given_the_server_process_id_on_new_and_reused_sessions(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    pids = []
    for _ in range(2):
        conn = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert conn.get_server_pid() == pid
        pids.append(pid)
        await conn.close()
        await _warm(g, 1)
    conninfo = g.conninfo(ROLE, password=PASSWORD)
    for _ in range(2):  # other startup parameters than asyncpg's: warm sessions of their own
        async with await psycopg.AsyncConnection.connect(conninfo, connect_timeout=30, autocommit=True) as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None and conn.info.backend_pid == row[0]
            pids.append(row[0])
        await _warm(g, 2)
    assert pids[0] == pids[1] and pids[2] == pids[3]  # each second client had a reused session
    assert _reused(g) == 2


async def test_terminating_the_given_pid_ends_that_client_and_its_session_is_not_reused(pooled, fid_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    first = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)
    await first.close()
    await _warm(g, 1)
    conn = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)  # a reused session
    assert _reused(g) == 1
    pid = conn.get_server_pid()
    probe = await asyncpg.connect(fid_pg.dsn(), timeout=30)
    try:
        assert await probe.fetchval("SELECT pg_terminate_backend($1)", pid) is True
    finally:
        await probe.close()
    await await_until(conn.is_closed, timeout=20, what="the client's connection to end")
    await g.wait_idle()
    assert _pool(g).warm() == 0  # the dead session was not parked
    again = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)
    assert await again.fetchval("SELECT pg_backend_pid()") not in (pid, None)
    await again.close()


async def test_notify_sender_pid_is_the_one_the_client_was_given(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    first = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)
    await first.close()
    await _warm(g, 1)
    conn = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)  # reused
    got: asyncio.Queue[int] = asyncio.Queue()
    await conn.add_listener("fid_chan", lambda _c, pid, _ch, _p: got.put_nowait(pid))
    await conn.execute("NOTIFY fid_chan, 'x'")
    assert await asyncio.wait_for(got.get(), 20) == conn.get_server_pid()
    await conn.close()


async def test_a_cancel_with_the_previous_clients_key_leaves_the_next_client_alone(pooled, fid_pg) -> None:  # type: ignore[no-untyped-def]
    """The process id is the server's, the secret pgguard's and new for each client: a client
    that left cannot cancel the queries of the next one on the same server process."""
    from pgguard import wire

    g = await pooled()
    first = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)
    pid = first.get_server_pid()
    (client,) = [c for c in g.server.clients.values() if c.role == ROLE]
    old_key = client.backend_key
    await first.close()
    await _warm(g, 1)
    second = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)
    assert second.get_server_pid() == pid
    sleeping = asyncio.ensure_future(second.fetchval("SELECT pg_sleep(3)"))
    probe = await asyncpg.connect(fid_pg.dsn(), timeout=30)
    try:
        await await_until(
            lambda: probe.fetchval("SELECT state = 'active' FROM pg_stat_activity WHERE pid = $1", pid),
            timeout=20, what="the second client's query to run",
        )  # fmt: skip
        reader, writer = await asyncio.open_connection(g.host, g.port)
        writer.write(wire.build_cancel_request(pid, old_key))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 20) == b""
        writer.close()
        assert await asyncio.wait_for(sleeping, 30) is None  # pg_sleep ran to its end, not cancelled
    finally:
        await probe.close()
    await second.close()


# ---------------------------------------------------------- 2. startup settings and RESET

# What each client runs: SET, then each way back to the startup value, reading it every time.
_RESET_SCRIPT = [
    "SHOW DateStyle", "SHOW TimeZone", "SHOW statement_timeout",
    "SET DateStyle = 'ISO, MDY'", "SET TimeZone = 'UTC'", "SET statement_timeout = '1min'",
    "RESET DateStyle", "SHOW DateStyle",
    "SET TimeZone TO DEFAULT", "SHOW TimeZone",
    "SET DateStyle = 'ISO, MDY'", "SET statement_timeout = '1min'",
    "RESET ALL", "SHOW DateStyle", "SHOW TimeZone", "SHOW statement_timeout",
    "SET DateStyle = 'ISO, MDY'", "SET TimeZone = 'UTC'",
    "DISCARD ALL", "SHOW DateStyle", "SHOW TimeZone", "SHOW statement_timeout",
    "SELECT '2024-03-05 06:07:08+00'::timestamptz::text",
]  # fmt: skip
_STARTUP = {"DateStyle": "SQL, DMY", "TimeZone": "Asia/Tokyo", "statement_timeout": "42s"}


async def _asyncpg_script(dsn: str) -> tuple[int, list[Any]]:
    # No statement cache: the script's DISCARD ALL drops prepared statements, direct too.
    conn = await asyncpg.connect(dsn, timeout=30, server_settings=dict(_STARTUP), statement_cache_size=0)
    try:
        out = [await conn.fetchval(sql) for sql in _RESET_SCRIPT]
        return conn.get_server_pid(), out
    finally:
        await conn.close()


async def _psycopg_script(conninfo: str) -> tuple[int, list[Any]]:
    options = " ".join(f"-c {k}={v.replace(' ', chr(92) + ' ')}" for k, v in _STARTUP.items())
    async with await psycopg.AsyncConnection.connect(
        conninfo, options=options, connect_timeout=30, autocommit=True
    ) as conn:
        out = []
        for sql in _RESET_SCRIPT:
            cur = await conn.execute(sql)
            row = await cur.fetchone() if cur.description else None
            out.append(None if row is None else row[0])
        return conn.info.backend_pid, out


async def test_reset_returns_to_the_startup_settings_on_a_reused_session_as_direct(pooled, fid_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    _, direct = await _asyncpg_script(fid_pg.dsn(ROLE, password=PASSWORD))
    assert direct[:3] == ["SQL, DMY", "Asia/Tokyo", "42s"] and direct[7] == "SQL, DMY"
    new_pid, new = await _asyncpg_script(g.dsn(ROLE, password=PASSWORD))
    await _warm(g, 1)
    reused_pid, reused = await _asyncpg_script(g.dsn(ROLE, password=PASSWORD))
    assert reused_pid == new_pid  # the same server process, reset in between
    assert new == direct
    assert reused == direct


async def test_options_settings_survive_reset_on_a_reused_session_as_direct(pooled, fid_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    direct_info = f"host={fid_pg.host} port={fid_pg.port} user={ROLE} password={PASSWORD} dbname=postgres"
    _, direct = await _psycopg_script(direct_info)
    assert direct[:3] == ["SQL, DMY", "Asia/Tokyo", "42s"]
    conninfo = g.conninfo(ROLE, password=PASSWORD)
    new_pid, new = await _psycopg_script(conninfo)
    await _warm(g, 1)
    reused_pid, reused = await _psycopg_script(conninfo)
    assert reused_pid == new_pid
    assert new == direct
    assert reused == direct


async def test_a_client_with_other_startup_settings_gets_a_session_of_its_own(pooled) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    tokyo = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30, server_settings={"TimeZone": "Asia/Tokyo"})
    tokyo_pid = tokyo.get_server_pid()
    await tokyo.close()
    await _warm(g, 1)
    plain = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)
    assert plain.get_server_pid() != tokyo_pid
    await plain.execute("RESET TimeZone")
    assert await plain.fetchval("SHOW TimeZone") != "Asia/Tokyo"  # the server's default
    await plain.close()
    await _warm(g, 2)
    again = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30, server_settings={"TimeZone": "Asia/Tokyo"})
    assert again.get_server_pid() == tokyo_pid
    await again.execute("RESET TimeZone")
    assert await again.fetchval("SHOW TimeZone") == "Asia/Tokyo"
    await again.close()


# ------------------------------------------------------------ 3. passwords and logins


@pytest.fixture
def changer(fid_pg: PostgresCluster) -> Iterator[str]:
    fid_pg.create_role(CHANGER, password="old-pass")
    yield CHANGER
    fid_pg.terminate(users=[CHANGER])
    fid_pg.create_role(CHANGER, password="old-pass")


async def _login_error(dsn: str) -> tuple[str, str] | None:
    """None when ``dsn`` logs in, else the (SQLSTATE, message) it was refused with."""
    try:
        conn = await asyncpg.connect(dsn, timeout=30)
    except asyncpg.PostgresError as exc:
        return exc.sqlstate, str(exc)
    await conn.close()
    return None


async def test_a_changed_password_counts_at_the_next_login_despite_a_warm_session(pooled, fid_pg, changer) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    conn = await asyncpg.connect(g.dsn(CHANGER, password="old-pass"), timeout=30)
    await conn.close()
    await _warm(g, 1)
    fid_pg.execute(f"ALTER ROLE {CHANGER} PASSWORD 'new-pass'")
    assert await _login_error(g.dsn(CHANGER, password="new-pass")) is None  # the first login after
    refused = await _login_error(g.dsn(CHANGER, password="old-pass"))
    assert refused == ("28P01", f'password authentication failed for user "{CHANGER}"')
    assert refused == await _login_error(fid_pg.dsn(CHANGER, password="old-pass"))  # as direct
    assert _reused(g) >= 1  # the new password got the warm session


async def test_nologin_valid_until_and_drop_role_count_at_the_next_login_as_direct(pooled, fid_pg, changer) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    conn = await asyncpg.connect(g.dsn(CHANGER, password="old-pass"), timeout=30)
    await conn.close()
    await _warm(g, 1)
    via, direct = g.dsn(CHANGER, password="old-pass"), fid_pg.dsn(CHANGER, password="old-pass")
    fid_pg.execute(f"ALTER ROLE {CHANGER} NOLOGIN")
    refused = await _login_error(via)
    assert refused == ("28000", f'role "{CHANGER}" is not permitted to log in')
    assert refused == await _login_error(direct)
    fid_pg.execute(f"ALTER ROLE {CHANGER} LOGIN VALID UNTIL '2000-01-01'")
    refused = await _login_error(via)
    assert refused is not None and refused[0] == "28P01"
    assert refused == await _login_error(direct)
    fid_pg.execute(f"ALTER ROLE {CHANGER} VALID UNTIL 'infinity'")
    assert await _login_error(via) is None
    await _warm(g, 1)
    fid_pg.execute(f"DROP ROLE {CHANGER}")
    refused = await _login_error(via)
    assert refused is not None and refused[0] in ("28P01", "28000")
    assert refused == await _login_error(direct)


async def test_logins_arriving_during_a_lookup_share_the_next_one(pooled, fid_pg) -> None:  # type: ignore[no-untyped-def]
    """A storm costs one lookup at a time per role: the lookup is held on an advisory lock
    the test owns while 12 logins arrive; the first login's lookup and one more answer them all."""
    query = "SELECT verifier FROM pgguard.lookup_role($1), pg_advisory_xact_lock_shared(4711)"
    g = await pooled("[server]\nclient_login_timeout = 60.0\n", pool=f'auth_query = "{query}"')
    holder = await asyncpg.connect(fid_pg.dsn(), timeout=30)
    await holder.execute("SELECT pg_advisory_lock(4711)")
    logins = [asyncio.ensure_future(asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=60)) for _ in range(12)]
    try:
        await await_until(
            lambda: sum(c.state is State.LOGIN for c in g.server.clients.values()) == 12
            and _pool(g).verifiers.lookups == 1,
            timeout=30, what="12 logins waiting for the first lookup",
        )  # fmt: skip
        await holder.execute("SELECT pg_advisory_unlock(4711)")
        conns = await asyncio.gather(*logins)
    finally:
        await holder.close()
    assert _pool(g).verifiers.lookups == 2
    for conn in conns:
        await conn.close()


async def test_a_flood_of_wrong_passwords_costs_a_bounded_number_of_lookups(pooled) -> None:  # type: ignore[no-untyped-def]
    interval = 0.25
    g = await pooled(pool=f"auth_retry_interval = {interval}")
    began = time.monotonic()
    for _ in range(12):
        refused = await _login_error(g.dsn(ROLE, password="wrong"))
        assert refused == ("28P01", f'password authentication failed for user "{ROLE}"')
    elapsed = time.monotonic() - began
    lookups = _pool(g).verifiers.lookups
    assert lookups <= elapsed / interval + 1, (lookups, elapsed)
    assert await _login_error(g.dsn(ROLE, password=PASSWORD)) is None  # the right one still works


# -------------------------------------------------- 4. logins pgguard cannot check itself


async def test_without_monitor_dsn_password_roles_log_in_to_the_server(pooled, fid_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled(monitor=False, pool=f'trusted_roles = ["{NOPASS}"]')
    conn = await asyncpg.connect(g.dsn(ROLE, password=PASSWORD), timeout=30)
    assert await conn.fetchval("SELECT current_user") == ROLE
    await conn.close()
    refused = await _login_error(g.dsn(ROLE, password="wrong"))
    assert refused == await _login_error(fid_pg.dsn(ROLE, password="wrong"))  # the server's own answer
    trusted = await asyncpg.connect(g.dsn(NOPASS), timeout=30)  # the trusted role is reused
    await trusted.close()
    await _warm(g, 1)
    assert [row[0] for row in _pool(g).rows()] == [NOPASS]  # the password role had sessions of its own
    assert _pool(g).direct_logins == 2


async def test_a_role_without_a_verifier_logs_in_as_the_server_says(pooled, fid_pg) -> None:  # type: ignore[no-untyped-def]
    g = await pooled()
    conn = await asyncpg.connect(g.dsn(NOPASS), timeout=30)  # trust: no password asked
    assert await conn.fetchval("SELECT current_user") == NOPASS
    await conn.close()
    await g.wait_idle()
    assert _pool(g).rows() == []


async def test_a_server_that_trusts_pgguard_still_has_the_stored_password_checked(pooled) -> None:  # type: ignore[no-untyped-def]
    """pg_hba.conf trusts pgguard's own login (as a server often trusts the Unix socket pgguard
    uses on its host): the role has a password stored, so pgguard checks it and reuses the
    session; the trust says nothing of what the server would ask a client over the network."""
    g = await pooled()
    for _ in range(2):
        conn = await asyncpg.connect(g.dsn(TRUSTING, password="trusting-pass"), timeout=30)
        await conn.close()
        await _warm(g, 1)
    assert _reused(g) == 1
    refused = await _login_error(g.dsn(TRUSTING, password="wrong"))
    assert refused == ("28P01", f'password authentication failed for user "{TRUSTING}"')


@pytest.fixture(scope="module")
def cleartext_pg() -> Iterator[PostgresCluster]:
    """A server of its own whose pg_hba.conf asks the role for a cleartext password (``password``),
    which pgguard cannot give from a SCRAM verifier."""
    with PostgresCluster(max_connections=30) as cluster:
        cluster.create_role("clear_user", password="clear-pass")
        hba = cluster.data_dir / "pg_hba.conf"
        hba.write_text(hba.read_text().replace('"clear_user" 127.0.0.1/32 scram-sha-256', '"clear_user" 127.0.0.1/32 password'))
        cluster.reload()
        cluster.create_auth_lookup()
        yield cluster


async def test_a_method_pgguard_cannot_answer_sends_the_next_logins_to_the_server(guard, cleartext_pg) -> None:  # type: ignore[no-untyped-def]
    g = await guard(
        f'[backend]\nport = {cleartext_pg.port}\nmonitor_dsn = "{cleartext_pg.dsn()}"\n[pool]\nreuse = true\n'
    )
    refused = await _login_error(g.dsn("clear_user", password="clear-pass"))
    assert refused is not None and refused[0] == "28000", refused  # never a 28P01 for a right password
    assert "authentication method" in refused[1]
    assert await _login_error(g.dsn("clear_user", password="clear-pass")) is None  # to the server now
    wrong = await _login_error(g.dsn("clear_user", password="wrong"))
    assert wrong == await _login_error(cleartext_pg.dsn("clear_user", password="wrong"))
    await g.wait_idle()
    assert _pool(g).direct_logins == 2
    _pool(g).close()
