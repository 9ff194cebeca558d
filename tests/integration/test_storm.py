"""Connection storms: hundreds of concurrent clients against a small role limit.

The server's own view (pg_stat_activity, sampled through a superuser session straight to
PostgreSQL) must never show more sessions of the role than the limit, every client must end
served (queue) or with 53300 (reject), and nothing may be held afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pgguard import wire
from pgguard.testing.wait import await_until

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

CLIENTS = 300
LIMIT = 5
COUNT_SQL = (
    "select count(*) from pg_stat_activity where usename = $1 and backend_type = 'client backend'"
)


class Sampler:
    """Polls pg_stat_activity for one role as fast as one direct session allows."""

    def __init__(self, conn: asyncpg.Connection, role: str) -> None:
        self.conn, self.role = conn, role
        self.samples: list[int] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(int(await self.conn.fetchval(COUNT_SQL, self.role)))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Sampler]:
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            self._stop.set()
            await task


async def abrupt_client(g) -> None:  # type: ignore[no-untyped-def]
    """Log in, send a 50 ms query and vanish without waiting: the server session outlives the
    client by those 50 ms, and pgguard must hold the slot until the server has closed it."""
    reader, writer = await asyncio.open_connection(g.host, g.port)
    writer.write(wire.build_startup_message({"user": "app", "database": "postgres"}))
    messages = wire.MessageReader()
    while True:
        data = await asyncio.wait_for(reader.read(65536), 150)
        assert data, "pgguard closed the session during login"
        messages.feed(data)
        tags = []
        while (m := messages.next_message()) is not wire.NEED_DATA:
            assert isinstance(m, tuple)
            tags.append(m[0])
        assert b"E" not in tags
        if b"Z" in tags:
            break
    writer.write(wire.build_message(b"Q", b"select pg_sleep(0.05)\0"))
    writer.close()  # FIN right behind the query: no wait for its result


@pytest.fixture
async def direct(pg) -> AsyncIterator[asyncpg.Connection]:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(pg.dsn(), timeout=30)
    yield conn
    await conn.close()


async def _server_sessions(direct: asyncpg.Connection, role: str) -> int:
    return int(await direct.fetchval(COUNT_SQL, role))


async def test_queue_storm_never_exceeds_the_limit(guard, direct: asyncpg.Connection) -> None:  # type: ignore[no-untyped-def]
    g = await guard(f'[roles.app]\nmax_connections = {LIMIT}\npolicy = "queue"\nqueue_timeout = 120\nmax_queue = 1000')
    control = g.server.control
    proxy_peak = 0

    async def client(i: int) -> int:
        nonlocal proxy_peak
        if i % 3 == 0:
            await abrupt_client(g)
            return i
        conn = await asyncpg.connect(g.dsn("app"), timeout=150)
        try:
            proxy_peak = max(proxy_peak, g.role_active("app"))
            await conn.execute("select pg_sleep(0.01)")
            return i
        finally:
            await conn.close()

    async with Sampler(direct, "app").running() as sampler:
        served = await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    assert sorted(served) == list(range(CLIENTS))
    assert len(sampler.samples) > 10, "the sampler barely ran"
    assert max(sampler.samples) <= LIMIT, f"pg_stat_activity showed {max(sampler.samples)} app sessions"
    assert max(sampler.samples) >= 2, "the storm never ran concurrently"
    assert proxy_peak <= LIMIT

    await await_until(
        lambda: _zero(direct, "app"), timeout=30, what="no app session left on the server"
    )
    await g.wait_idle()
    assert control.counts().sessions_active == 0 and control.counts().clients_waiting == 0 and not g.server.control.queue_rows()
    stats = g.server.stats
    assert stats.admissions == CLIENTS and sum(stats.rejections.values()) == 0
    assert stats.queued > 0


async def _zero(direct: asyncpg.Connection, role: str) -> bool:
    return await _server_sessions(direct, role) == 0


async def test_reject_storm_ends_served_or_53300(guard, direct: asyncpg.Connection) -> None:  # type: ignore[no-untyped-def]
    g = await guard(f'[roles.app]\nmax_connections = {LIMIT}\npolicy = "reject"')
    outcomes: Counter[str] = Counter()

    async def client() -> None:
        try:
            conn = await asyncpg.connect(g.dsn("app"), timeout=60)
        except asyncpg.TooManyConnectionsError as exc:
            assert str(exc) == 'too many connections for role "app"'
            outcomes["rejected"] += 1
            return
        try:
            await conn.execute("select pg_sleep(0.01)")
            outcomes["served"] += 1
        finally:
            await conn.close()

    async with Sampler(direct, "app").running() as sampler:
        await asyncio.gather(*(client() for _ in range(200)))
    assert outcomes["served"] + outcomes["rejected"] == 200
    assert outcomes["served"] >= LIMIT and outcomes["rejected"] > 0
    assert max(sampler.samples) <= LIMIT
    await await_until(lambda: _zero(direct, "app"), timeout=30, what="no app session left on the server")
    await g.wait_idle()
    assert g.server.stats.rejections["limit"] == outcomes["rejected"]
