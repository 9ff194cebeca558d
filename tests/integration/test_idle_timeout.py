"""Leak diagnostics: idle_timeout closes sessions left waiting on their client, like idle_session_timeout."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
from console_client import sample, scrape

from pgguard.testing.wait import await_until

IDLE = "[limits]\nidle_timeout = 0.3\n"


async def test_idle_session_is_closed_with_57p05_and_counted(guard, pg) -> None:
    g = await guard(IDLE + '[metrics]\nlisten = "127.0.0.1:0"\n')
    conn = await psycopg.AsyncConnection.connect(g.conninfo("app"), autocommit=True)
    await conn.execute("SELECT 1")
    await await_until(lambda: g.server.stats.idle_timeouts == 1, what="the idle sweep to close it")
    with pytest.raises(
        psycopg.errors.IdleSessionTimeout, match="terminating connection due to idle-session timeout"
    ):
        await conn.execute("SELECT 1")
    await g.wait_idle()
    await await_until(lambda: pg.connection_count(users=["app"]) == 0, what="the server session to end")
    s = await scrape(g.server.metrics.address)
    assert sample(s, "pgguard_idle_timeouts_total") == 1
    await conn.close()


async def test_a_running_query_is_not_idle(guard) -> None:
    """No bytes flow while pg_sleep runs, but the server is busy, not waiting on the client."""
    g = await guard(IDLE)
    conn = await asyncpg.connect(g.dsn("app"))
    assert await conn.fetchval("SELECT 1 FROM pg_sleep(1.0)") == 1
    assert g.server.stats.idle_timeouts == 0
    await conn.close()


async def test_idle_in_transaction_is_closed_with_25p03(guard) -> None:
    g = await guard(IDLE)
    conn = await psycopg.AsyncConnection.connect(g.conninfo("app"))  # not autocommit: BEGIN
    await conn.execute("SELECT 1")
    await await_until(lambda: g.server.stats.idle_timeouts == 1, what="the idle sweep to close it")
    with pytest.raises(
        psycopg.errors.IdleInTransactionSessionTimeout,
        match="terminating connection due to idle-in-transaction timeout",
    ):
        await conn.execute("SELECT 1")
    await g.wait_idle()
    await conn.close()


async def test_role_idle_timeout_overrides_the_default(guard) -> None:
    g = await guard(IDLE + "[roles.app2]\nidle_timeout = 0.0\n")  # 0: never, for app2 only
    kept = await asyncpg.connect(g.dsn("app2"))
    closed = await asyncpg.connect(g.dsn("app"))
    await await_until(lambda: g.server.stats.idle_timeouts == 1, what="app's session to be closed")
    await asyncio.sleep(0)  # let the client see its socket close
    assert await kept.fetchval("SELECT 1") == 1  # idle as long, and still there
    assert [c.role for c in g.server.clients.values()] == ["app2"]
    await kept.close()
    closed.terminate()


async def test_a_session_that_never_sent_a_query_is_idle(guard) -> None:
    """The leak that matters most: connect, then forget the connection before any query."""
    g = await guard(IDLE)
    conn = await psycopg.AsyncConnection.connect(g.conninfo("app"), autocommit=True)
    await await_until(lambda: g.server.stats.idle_timeouts == 1, what="the idle sweep to close it")
    await g.wait_idle()
    await conn.close()
