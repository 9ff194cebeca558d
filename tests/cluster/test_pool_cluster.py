"""[pool] with [cluster]: a warm session keeps its slot's lease, and when that lease is given
away (the cut-off rule) the warm session is what gets closed, not the client that left it.

Two pgguards in this test's event loop (in-process, to see the pool), one reaching a real
redis-server through a freezable forwarder (``procs.Forwarder``), the other directly; a real
PostgreSQL, asyncpg clients, role ``app`` trusted by pgguard (no password to look up)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from procs import Forwarder

from pgguard.testing.wait import await_until

LIMIT = 2


def _config(redis_url: str, prefix: str, name: str) -> str:
    return f"""
[cluster]
redis = "{redis_url}"
instance = "{name}"
prefix = "{prefix}"
lease_ttl = 2.0
timeout = 1.0

[pool]
reuse = true
trusted_roles = ["app"]

[roles.app]
max_connections = {LIMIT}
queue_timeout = 60.0
"""


async def test_a_lost_lease_closes_the_warm_session_holding_it(guard, pg, redis_server) -> None:
    forwarder = Forwarder(redis_server.port)
    await forwarder.start()
    prefix = f"p{uuid.uuid4().hex[:8]}"
    cut = await guard(_config(forwarder.url, prefix, "cut"))
    other = await guard(_config(redis_server.url, prefix, "other"))
    pool = cut.server.control.pool
    assert pool is not None
    admitted: list[asyncpg.Connection] = []
    try:
        # Two clients come and go on the first pgguard: their sessions stay warm, with the leases.
        first = [await asyncpg.connect(cut.dsn("app"), ssl=False, timeout=20) for _ in range(LIMIT)]
        for conn in first:
            await conn.close()
        await await_until(lambda: pool.warm() == LIMIT, timeout=20, what="both sessions warm")
        assert cut.server.control.cluster is not None and cut.server.control.cluster.leases == LIMIT

        # Cut off: lease_ttl later the store gives both slots to the other pgguard's clients.
        forwarder.freeze()
        waiting = [asyncio.create_task(asyncpg.connect(other.dsn("app"), ssl=False, timeout=60)) for _ in range(LIMIT)]
        admitted = list(await asyncio.wait_for(asyncio.gather(*waiting), 60))

        # Back: the first pgguard's leases no longer fit, so its warm sessions must close.
        forwarder.thaw()
        await await_until(lambda: pool.warm() == 0, timeout=30, what="the warm sessions to close")

        async def server_sees_the_limit() -> bool:
            return await asyncio.to_thread(pg.connection_count, users=["app"]) == LIMIT

        await await_until(server_sees_the_limit, timeout=30, what="the server to see only the limit")
        assert cut.server.control.cluster.lost_sessions == LIMIT
        for conn in admitted:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        for conn in admitted:
            await conn.close()
        for g in (cut, other):  # warm sessions hold slots: close them before the leak check
            if g.server.control.pool is not None:
                g.server.control.pool.close()
        await forwarder.close()
