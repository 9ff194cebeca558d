"""Limits end to end: real PostgreSQL, real clients (asyncpg, psycopg, psql) through pgguard."""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg
import psycopg
import pytest

from pgguard.testing.wait import await_until

ROLE_MSG = 'too many connections for role "app"'

pytestmark = pytest.mark.asyncio


def _psql_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = "/nonexistent/pgpass"
    env["PGCONNECT_TIMEOUT"] = "20"
    return env


async def psql(conninfo: str, sql: str = "select 1") -> tuple[int, str, str]:
    """Run psql as a subprocess without blocking the loop pgguard runs on."""
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-A", "-t", "-w", "-d", conninfo, "-c", sql,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_psql_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode()


async def connect(g, user: str = "app", database: str = "postgres", **kw) -> asyncpg.Connection:  # type: ignore[no-untyped-def]
    kw.setdefault("timeout", 30)
    return await asyncpg.connect(g.dsn(user, database), **kw)


async def _count(pg, user: str) -> int:  # type: ignore[no-untyped-def]
    return await asyncio.to_thread(pg.connection_count, users=[user])


# ------------------------------------------------------------------ rejections


async def test_role_limit_rejects_with_53300_asyncpg(pg, guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.app]\nmax_connections = 1\npolicy = "reject"')
    held = await connect(g)
    with pytest.raises(asyncpg.TooManyConnectionsError) as info:
        await connect(g)
    assert info.value.sqlstate == "53300"
    assert str(info.value) == ROLE_MSG
    assert await _count(pg, "app") == 1
    assert await held.fetchval("select current_user") == "app"
    other = await connect(g, "app2")  # another role is not limited
    await other.close()
    await held.close()
    await g.wait_idle()
    assert g.server.stats.rejections["limit"] == 1


async def test_role_limit_rejects_psycopg(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.app]\nmax_connections = 1\npolicy = "reject"')
    held = await psycopg.AsyncConnection.connect(g.conninfo("app"), connect_timeout=20)
    with pytest.raises(psycopg.OperationalError, match=f"FATAL:  {ROLE_MSG}"):
        await psycopg.AsyncConnection.connect(g.conninfo("app"), connect_timeout=20)
    await held.close()
    await g.wait_idle()


async def test_role_limit_rejects_psql(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.app]\nmax_connections = 1\npolicy = "reject"')
    held = await connect(g)
    code, _, err = await psql(g.conninfo("app"))
    assert code != 0
    assert f"FATAL:  {ROLE_MSG}" in err
    await held.close()
    code, out, err = await psql(g.conninfo("app"), "select current_user")
    assert (code, out) == (0, "app"), err


async def test_database_limit_rejects_across_roles(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[limits]\npolicy = "reject"\n[databases.limdb]\nmax_connections = 1')
    held = await connect(g, "app", "limdb")
    with pytest.raises(asyncpg.TooManyConnectionsError, match='^too many connections for database "limdb"$'):
        await connect(g, "app2", "limdb")
    code, _, err = await psql(g.conninfo("other", "limdb"))
    assert code != 0 and 'FATAL:  too many connections for database "limdb"' in err
    elsewhere = await connect(g, "app2", "otherdb")
    await elsewhere.close()
    await held.close()
    await g.wait_idle()


async def test_total_limit_rejects_like_max_connections(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[limits]\nmax_connections = 2\npolicy = "reject"')
    a = await connect(g, "app")
    b = await connect(g, "app2", "limdb")
    with pytest.raises(asyncpg.TooManyConnectionsError, match="^sorry, too many clients already$"):
        await connect(g, "other", "otherdb")
    with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
        await psycopg.AsyncConnection.connect(g.conninfo("other"), connect_timeout=20)
    await a.close()
    c = await connect(g, "other", "otherdb")
    for conn in (b, c):
        await conn.close()
    await g.wait_idle()


async def test_detail_names_the_limit_when_enabled(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[errors]\ndetail = true\n[roles.app]\nmax_connections = 0\npolicy = "reject"')
    with pytest.raises(asyncpg.TooManyConnectionsError) as info:
        await connect(g)
    assert info.value.detail == "pgguard: role_max_connections=0; policy is reject"


async def test_exempt_role_is_never_limited(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[limits]\nmax_connections = 1\npolicy = "reject"\nexempt_roles = ["boss"]')
    app = await connect(g, "app")
    bosses = [await connect(g, "boss") for _ in range(3)]
    assert g.server.control.counts().sessions_active == 4
    with pytest.raises(asyncpg.TooManyConnectionsError, match="sorry, too many clients already"):
        await connect(g, "app2")
    for conn in [app, *bosses]:
        await conn.close()
    await g.wait_idle()


# ---------------------------------------------------------------------- queueing


async def test_queued_clients_admitted_in_fifo_order(pg, guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.app]\nmax_connections = 1\npolicy = "queue"\nqueue_timeout = 60')
    control = g.server.control
    held = await connect(g)
    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(connect(g, timeout=90)))
        await await_until(lambda i=i: control.counts().clients_waiting == i + 1, what=f"client {i} to queue")
    current = held
    for i, task in enumerate(tasks):
        assert not any(t.done() for t in tasks[i:]), "admitted while the slot was held"
        assert await _count(pg, "app") == 1
        await current.close()
        current = await asyncio.wait_for(task, 30)
        assert await current.fetchval("select 1") == 1
        assert g.role_active("app") == 1
    await current.close()
    await g.wait_idle()
    assert g.server.stats.queued == 4


async def test_queue_timeout_rejects_with_53300(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.app]\nmax_connections = 1\nqueue_timeout = 0.5')
    held = await connect(g)
    start = time.monotonic()
    with pytest.raises(asyncpg.TooManyConnectionsError, match=f"^{ROLE_MSG}$"):
        await connect(g)
    assert 0.4 <= time.monotonic() - start < 10
    with pytest.raises(psycopg.OperationalError, match=ROLE_MSG):
        await psycopg.AsyncConnection.connect(g.conninfo("app"), connect_timeout=20)
    assert g.server.stats.queue_timeouts == 2
    assert g.server.control.counts().clients_waiting == 0
    await held.close()
    await g.wait_idle()


async def test_max_queue_rejects_at_once(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.app]\nmax_connections = 0\nmax_queue = 1\nqueue_timeout = 60')
    waiting = asyncio.create_task(connect(g, timeout=90))
    await await_until(lambda: g.server.control.counts().clients_waiting == 1, what="the first client to queue")
    with pytest.raises(asyncpg.TooManyConnectionsError, match=ROLE_MSG):
        await connect(g)
    g.server.control.set_limit("role", "app", 1)
    conn = await asyncio.wait_for(waiting, 30)
    await conn.close()
    await g.wait_idle()


async def test_client_that_leaves_the_queue_is_forgotten(pg, guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.app]\nmax_connections = 1\nqueue_timeout = 60')
    control = g.server.control
    held = await connect(g)
    # asyncpg gives up after its own timeout and closes the socket while queued.
    with pytest.raises(TimeoutError):
        await connect(g, timeout=0.5)
    await await_until(lambda: control.counts().clients_waiting == 0, what="the departed client to leave the queue")
    assert g.role_active("app") == 1
    # psql gives up too (connect_timeout is at least 2 s in libpq).
    code, _, err = await psql(g.conninfo("app", connect_timeout="2"))
    assert code != 0 and "timeout" in err
    await await_until(lambda: control.counts().clients_waiting == 0, what="psql to leave the queue")
    await held.close()
    await g.wait_idle()
    assert await _count(pg, "app") == 0
    # The next client gets the slot at once: nobody ghost is ahead of it.
    start = time.monotonic()
    conn = await connect(g)
    assert time.monotonic() - start < 5
    await conn.close()
    await g.wait_idle()


# ------------------------------------------------------------------ authentication


async def test_scram_password_passes_through(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.scram_user]\nmax_connections = 2\npolicy = "reject"')
    conn = await asyncpg.connect(g.dsn("scram_user", password="s3cret pass"), timeout=30)
    assert await conn.fetchval("select current_user") == "scram_user"
    aconn = await psycopg.AsyncConnection.connect(
        g.conninfo("scram_user", password="'s3cret pass'"), connect_timeout=20
    )
    cur = await aconn.execute("select current_user")
    assert await cur.fetchone() == ("scram_user",)
    await aconn.close()
    await conn.close()
    await g.wait_idle()


async def test_wrong_password_gives_28p01_and_frees_the_slot(guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[roles.scram_user]\nmax_connections = 1\npolicy = "reject"')
    for _ in range(3):
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await asyncpg.connect(g.dsn("scram_user", password="wrong"), timeout=30)
        assert info.value.sqlstate == "28P01"
        await g.wait_idle()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await psycopg.AsyncConnection.connect(
            g.conninfo("scram_user", password="wrong"), connect_timeout=20
        )
    await g.wait_idle()
    conn = await asyncpg.connect(g.dsn("scram_user", password="s3cret pass"), timeout=30)
    assert await conn.fetchval("select 1") == 1
    await conn.close()
    await g.wait_idle()


# ------------------------------------------------- sharing a limit between tenants (23.3)


async def test_quiet_tenant_is_served_before_the_noisy_backlog_drains(pg, guard) -> None:  # type: ignore[no-untyped-def]
    """Total 10, 40 clients of role app (noisy) each holding a session, then 3 of role other
    (quiet): each quiet client gets one of the next freed slots (round-robin between the
    waiting pairs), not one after the 30 queued noisy ones (arrival order did that)."""
    g = await guard("[limits]\nmax_connections = 10\n")
    admitted: list[str] = []  # roles, in the order their sessions started
    release = asyncio.Event()

    async def session(role: str, hold: float) -> None:
        conn = await connect(g, role, timeout=60)
        admitted.append(role)
        try:
            if role == "app" and not release.is_set():
                await release.wait()  # the first ten hold until every client is queued
            await conn.execute(f"select pg_sleep({hold})")
        finally:
            await conn.close()

    noisy = [asyncio.create_task(session("app", 0.05)) for _ in range(40)]
    await await_until(lambda: g.server.control.counts().clients_waiting == 30, timeout=60, what="30 noisy clients queued")
    await await_until(lambda: len(admitted) == 10, timeout=60, what="the first ten noisy clients connected")
    quiet = [asyncio.create_task(session("other", 0.05)) for _ in range(3)]
    await await_until(lambda: g.server.control.counts().clients_waiting == 33, timeout=60, what="3 quiet clients queued")
    assert admitted == ["app"] * 10
    release.set()
    await asyncio.wait_for(asyncio.gather(*noisy, *quiet), 120)
    last_quiet = max(i for i, role in enumerate(admitted) if role == "other")
    noisy_after = admitted[last_quiet:].count("app")
    # Round-robin: the 3 quiet take 3 of the first 6 freed slots; 27 noisy remain behind them.
    assert noisy_after >= 20, admitted
    assert len(admitted) == 43 and await _count(pg, "app") == 0
    await g.wait_idle()


async def test_reserved_slots_keep_room_for_their_role(pg, guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard('[limits]\nmax_connections = 3\npolicy = "reject"\n[roles.other]\nreserved = 1\n')
    held = [await connect(g, "app"), await connect(g, "app")]
    with pytest.raises(asyncpg.TooManyConnectionsError, match="sorry, too many clients already"):
        await connect(g, "app")
    assert await _count(pg, "app") == 2
    quiet = await connect(g, "other")  # its reserved slot was kept
    assert await quiet.fetchval("select current_user") == "other"
    for conn in (*held, quiet):
        await conn.close()
    await g.wait_idle()


# ------------------------------------------------------ per client address limits (21.2)

TOO_MANY = "sorry, too many clients already"


async def test_client_address_limit_counts_each_source_address(pg, guard) -> None:  # type: ignore[no-untyped-def]
    """Clients from 127.0.0.2 and 127.0.0.3 (raw sockets bound to those sources): two each;
    a third from 127.0.0.2 gets PostgreSQL's FATAL 53300 total text; SHOW CLIENTS counts
    per address; a freed address slot is usable again."""
    from console_client import ADMIN_TOML, admin_connect, fetch
    from raw_client import raw_login

    g = await guard('[limits]\nclient_address_max_connections = 2\npolicy = "reject"\n' + ADMIN_TOML)
    held = []
    for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"):
        session, error = await raw_login(g.port, source)
        assert error is None, error
        held.append(session)
    extra, error = await raw_login(g.port, "127.0.0.2")
    assert error is not None and (error["S"], error["C"], error["M"]) == ("FATAL", "53300", TOO_MANY)
    await extra.close()
    assert await _count(pg, "app") == 4
    plain = await connect(g)  # 127.0.0.1: its own count
    console = await admin_connect(g.port)

    async def per_address() -> dict[str, str]:
        rows = [r for r in await fetch(console, "SHOW CLIENTS") if r["role"] == "app"]
        return {r["address"].rpartition(":")[0]: r["address_sessions"] for r in rows}

    assert await per_address() == {"127.0.0.2": "2", "127.0.0.3": "2", "127.0.0.1": "1"}
    await held[0].close()

    async def freed() -> bool:
        return (await per_address()).get("127.0.0.2") == "1"

    await await_until(freed, timeout=20, what="127.0.0.2 down to one session")
    again, error = await raw_login(g.port, "127.0.0.2")
    assert error is None, error
    for session in (*held[1:], again):
        await session.close()
    await plain.close()
    await console.close()
    await g.wait_idle()
    assert g.server.stats.rejections["limit"] == 1


async def test_address_network_queues_its_hosts_without_blocking_others(pg, guard) -> None:  # type: ignore[no-untyped-def]
    """[addresses."127.0.0.2/32"] max_connections = 1, policy queue: a second client from
    127.0.0.2 waits (its network's own queue) while a client from 127.0.0.3 of the same
    role is admitted at once, and gets its session when the first one leaves."""
    from raw_client import RawSession, raw_login

    g = await guard('[addresses."127.0.0.2/32"]\nmax_connections = 1\npolicy = "queue"\n')
    first, error = await raw_login(g.port, "127.0.0.2")
    assert error is None, error
    second = await RawSession.open(g.port, "127.0.0.2")
    login = asyncio.create_task(second.login("app"))
    await await_until(lambda: g.server.control.counts().clients_waiting == 1, timeout=20, what="the second client queued")
    other, error = await raw_login(g.port, "127.0.0.3")
    assert error is None, error
    assert await _count(pg, "app") == 2 and not login.done()
    await first.close()
    assert await asyncio.wait_for(login, 30) is None
    await second.query("select 1")
    assert await _count(pg, "app") == 2
    for session in (second, other):
        await session.close()

# ------------------------------------------------------- over-long names (issue 23)

LONG_ROLE = "long_role_" + "r" * 53  # 63 bytes: NAMEDATALEN - 1
LONG_DB = "long_db_" + "d" * 55


async def _refusal(dsn: str) -> str:
    with pytest.raises(asyncpg.TooManyConnectionsError) as info:
        await asyncpg.connect(dsn, timeout=30)
    assert info.value.sqlstate == "53300"
    return str(info.value)


async def test_over_long_role_is_counted_as_its_first_63_bytes_like_postgresql(pg, guard) -> None:  # type: ignore[no-untyped-def]
    """A client naming the 63-byte role plus 20 bytes logs in as that role (the postmaster
    cuts the name), so pgguard refuses it with PostgreSQL's own text for that role."""
    assert len(LONG_ROLE.encode()) == 63
    sent = LONG_ROLE + "x" * 20
    # PostgreSQL itself, with CONNECTION LIMIT 1 and one session held.
    await asyncio.to_thread(pg.create_role, LONG_ROLE, connection_limit=1)
    held = await asyncpg.connect(pg.dsn(LONG_ROLE), timeout=30)
    try:
        expected = await _refusal(pg.dsn(sent))
    finally:
        await held.close()
    assert expected == f'too many connections for role "{LONG_ROLE}"'
    # pgguard with the same limit (the server's own limit off, so only pgguard can refuse).
    await asyncio.to_thread(pg.create_role, LONG_ROLE, connection_limit=-1)
    g = await guard(f'[roles.{LONG_ROLE}]\nmax_connections = 1\npolicy = "reject"')
    held = await connect(g, LONG_ROLE)
    assert await _refusal(g.dsn(sent, "postgres")) == expected
    assert await _count(pg, LONG_ROLE) == 1
    # SHOW CLIENTS / the testing API name the role the server logged in as.
    assert {c.role for c in g.api.clients()} == {LONG_ROLE}
    await held.close()
    # Once the slot is free the long name logs in, as the 63-byte role.
    conn = await connect(g, sent)
    assert await conn.fetchval("select current_user") == LONG_ROLE
    await conn.close()
    await g.wait_idle()


async def test_over_long_database_is_counted_as_its_first_63_bytes_like_postgresql(pg, guard) -> None:  # type: ignore[no-untyped-def]
    assert len(LONG_DB.encode()) == 63
    sent = LONG_DB + "y" * 20
    await asyncio.to_thread(pg.create_database, LONG_DB, connection_limit=1)
    held = await asyncpg.connect(pg.dsn("app", LONG_DB), timeout=30)
    try:
        expected = await _refusal(pg.dsn("app2", sent))
    finally:
        await held.close()
    assert expected == f'too many connections for database "{LONG_DB}"'
    await asyncio.to_thread(pg.create_database, LONG_DB, connection_limit=-1)
    g = await guard(f'[limits]\npolicy = "reject"\n[databases.{LONG_DB}]\nmax_connections = 1')
    held = await connect(g, "app", LONG_DB)
    assert await _refusal(g.dsn("app2", sent)) == expected
    assert await asyncio.to_thread(pg.connection_count, databases=[LONG_DB]) == 1
    await held.close()
    await g.wait_idle()
