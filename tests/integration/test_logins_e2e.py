"""[backend] max_logins_in_flight against a real PostgreSQL: server logins capped, the rest wait.

A login is held open from the outside with a client that never answers the server's SCRAM
request: PostgreSQL (not a fake) has forked a backend for it and waits for its password, so
that login is in flight for as long as the test wants, and every "asked for a password"
message a test reads proves that one login reached the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct

import asyncpg
import pytest
from console_client import ADMIN_TOML, admin_connect, fetch, sample, scrape

from pgguard import wire
from pgguard.testing.cluster import PostgresCluster
from pgguard.testing.wait import await_until

SLOW = "login_slow"  # a scram role whose logins the tests hold open
POOLED = "login_pooled"  # a scram role with [pool] reuse
PASSWORD = "slow pass"
METRICS = '[metrics]\nlisten = "127.0.0.1:0"\n'


@pytest.fixture(scope="module")
def roles(pg: PostgresCluster) -> PostgresCluster:
    for role in (SLOW, POOLED):
        pg.create_role(role, password=PASSWORD)
    pg.create_auth_lookup()
    return pg


@pytest.fixture(autouse=True)
def _end_server_sessions(roles: PostgresCluster):  # type: ignore[no-untyped-def]
    yield
    roles.terminate(users=[SLOW, POOLED])


class Staller:
    """A raw client that sends its StartupMessage, reads the server's SCRAM request, never answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Staller:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(wire.build_startup_message({"user": SLOW, "database": "postgres"}))
        await writer.drain()
        return cls(reader, writer)

    async def asked(self) -> None:
        """Until the server asks for a password: this client's login is in flight at the server."""
        head = await self.reader.readexactly(5)
        body = await self.reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
        assert head[:1] == b"R" and struct.unpack("!I", body[:4])[0] == wire.AUTH_SASL, (head, body)

    def close(self) -> None:
        self.writer.close()


def _cap(n: int, connect_timeout: float = 60.0) -> str:
    return f"[backend]\nmax_logins_in_flight = {n}\nconnect_timeout = {connect_timeout}\n"


async def test_no_more_server_logins_than_max_logins_in_flight(guard, roles) -> None:  # type: ignore[no-untyped-def]
    """20 clients at once, cap 2: at no point have more than 2 of them been asked for a password
    by the server without having left; all 20 reach the server in the end."""
    g = await guard(_cap(2))
    stallers = await asyncio.gather(*(Staller.open(g.port) for _ in range(20)))
    asks = {asyncio.create_task(s.asked()): s for s in stallers}
    await await_until(
        lambda: (g.api.stats()["logins_in_flight"], g.api.stats()["logins_waiting"]) == (2, 18),
        timeout=30, what="2 logins in flight, 18 waiting",
    )
    pending, asked, closed = set(asks), 0, 0
    while pending:
        done, pending = await asyncio.wait(pending, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no login reached the server within 30 s"
        asked += len(done)
        # Only a client holding a login slot can have been asked; a slot is freed only once
        # pgguard has seen its client leave, which happens below, after this count.
        assert asked - closed <= 2
        assert g.api.stats()["logins_in_flight"] <= 2
        for task in done:
            task.result()
            asks[task].close()
            closed += 1
    assert asked == 20
    stats = g.api.stats()
    assert stats["login_waits"] == 18 and stats["login_timeouts"] == 0


async def test_waiting_clients_shown_then_all_served(guard, roles, pg) -> None:  # type: ignore[no-untyped-def]
    g = await guard(ADMIN_TOML + METRICS + _cap(2))
    stallers = [await Staller.open(g.port) for _ in range(2)]
    await asyncio.gather(*(s.asked() for s in stallers))
    clients = [asyncio.create_task(asyncpg.connect(g.dsn("app"))) for _ in range(18)]
    await await_until(lambda: g.api.stats()["logins_waiting"] == 18, timeout=30, what="18 clients waiting for a login slot")
    assert pg.connection_count(users=["app"]) == 0  # none of them has reached the server

    admin = await admin_connect(g.port)
    try:
        states = [r["state"] for r in await fetch(admin, "SHOW CLIENTS") if r["role"] == "app"]
        assert states == ["login_wait"] * 18
        stats = {r["stat"]: r["value"] for r in await fetch(admin, "SHOW STATS")}
        assert (stats["logins_in_flight"], stats["logins_waiting"]) == ("2", "18")
        s = await scrape(g.server.metrics.address)
        assert sample(s, "pgguard_logins_in_flight") == 2
        assert sample(s, "pgguard_logins_waiting") == 18
        assert sample(s, "pgguard_clients_connected", state="login_wait") == 18

        for staller in stallers:
            staller.close()
        conns = await asyncio.gather(*clients)
        assert [await c.fetchval("SELECT 1") for c in conns] == [1] * 18
        await asyncio.gather(*(c.close() for c in conns))
        stats = {r["stat"]: r["value"] for r in await fetch(admin, "SHOW STATS")}
        assert stats["login_waits"] == "18" and stats["login_timeouts"] == "0"
    finally:
        await admin.close()


async def test_login_slot_wait_bounded_by_connect_timeout(guard, roles) -> None:  # type: ignore[no-untyped-def]
    """A client that gets no login slot within connect_timeout gets what a dial timeout gives: 57P03."""
    g = await guard(_cap(1, connect_timeout=0.5))
    staller = await Staller.open(g.port)
    await staller.asked()
    with pytest.raises(asyncpg.CannotConnectNowError) as info:
        await asyncpg.connect(g.dsn("app"), timeout=30)
    assert info.value.sqlstate == "57P03"
    assert info.value.args[0] == "the database system is not accepting connections"
    assert info.value.detail == "pgguard could not connect to the server: timeout expired"
    stats = g.api.stats()
    assert (stats["login_timeouts"], stats["logins_waiting"], stats["logins_in_flight"]) == (1, 0, 1)
    staller.close()


async def test_warm_session_needs_no_login_slot_new_reused_login_does(guard, roles) -> None:  # type: ignore[no-untyped-def]
    """[pool]: a warm session is handed out while the only login slot is held; a client that
    needs a new server session (pool.Pool.connect logs it in) waits for the slot."""
    g = await guard(
        _cap(1) + f'monitor_dsn = "{roles.dsn()}"\n[roles.{POOLED}]\nreuse = true\n'
    )
    pool = g.server.control.pool
    assert pool is not None
    try:
        first = await asyncpg.connect(g.dsn(POOLED, password=PASSWORD))
        await first.close()
        await await_until(lambda: pool.warm() == 1, timeout=15, what="1 warm session in the pool")

        staller = await Staller.open(g.port)
        await staller.asked()  # holds the only login slot
        warm = await asyncpg.connect(g.dsn(POOLED, password=PASSWORD), timeout=30)
        assert await warm.fetchval("SELECT 1") == 1
        assert g.api.stats()["login_waits"] == 0

        new = asyncio.create_task(asyncpg.connect(g.dsn(POOLED, password=PASSWORD), timeout=30))
        await await_until(lambda: g.api.stats()["logins_waiting"] == 1, timeout=30, what="a new reused login waiting")
        assert [c.state for c in g.api.clients(role=POOLED)].count("login_wait") == 1
        staller.close()
        conn = await new
        assert await conn.fetchval("SELECT 1") == 1
        await asyncio.gather(warm.close(), conn.close())
        assert g.api.stats()["login_waits"] == 1
    finally:
        pool.close()


async def test_waiter_that_leaves_holds_nothing_and_order_is_kept(guard, roles) -> None:  # type: ignore[no-untyped-def]
    g = await guard(_cap(1))
    holder = await Staller.open(g.port)
    await holder.asked()
    waiters = [await Staller.open(g.port) for _ in range(3)]
    await await_until(lambda: g.api.stats()["logins_waiting"] == 3, timeout=30, what="3 logins waiting")
    waiters[1].close()  # the middle one leaves while it waits
    await await_until(lambda: g.api.stats()["logins_waiting"] == 2, timeout=30, what="the leaver gone from the queue")
    holder.close()
    await waiters[0].asked()  # the oldest waiter logs in next
    assert (g.api.stats()["logins_in_flight"], g.api.stats()["logins_waiting"]) == (1, 1)
    waiters[0].close()
    await waiters[2].asked()
    waiters[2].close()
    await await_until(
        lambda: (g.api.stats()["logins_in_flight"], g.api.stats()["logins_waiting"]) == (0, 0),
        timeout=30, what="no login slot held or waited for",
    )


async def test_failed_server_login_gives_its_slot_back(guard, roles) -> None:  # type: ignore[no-untyped-def]
    """The server's ErrorResponse ends the login: with a cap of 1, failures never block the next."""
    g = await guard(_cap(1, connect_timeout=5.0))
    for _ in range(3):
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await asyncpg.connect(g.dsn("app", database="no_such_db"))
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(g.dsn(SLOW, password="wrong"))
    conn = await asyncpg.connect(g.dsn("app"))
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    stats = g.api.stats()
    assert (stats["login_waits"], stats["login_timeouts"]) == (0, 0)


async def test_reload_raising_the_cap_starts_waiting_logins(guard, roles, pg) -> None:  # type: ignore[no-untyped-def]
    g = await guard(_cap(1))
    holder = await Staller.open(g.port)
    await holder.asked()
    clients = [asyncio.create_task(asyncpg.connect(g.dsn("app"), timeout=30)) for _ in range(3)]
    await await_until(lambda: g.api.stats()["logins_waiting"] == 3, timeout=30, what="3 logins waiting")
    config = g.server.config
    assert g.server.reload(dataclasses.replace(
        config, backend=dataclasses.replace(config.backend, max_logins_in_flight=4)
    ))
    conns = await asyncio.gather(*clients)  # served while the holder still holds its slot
    assert [await c.fetchval("SELECT 1") for c in conns] == [1, 1, 1]
    await asyncio.gather(*(c.close() for c in conns))
    holder.close()
