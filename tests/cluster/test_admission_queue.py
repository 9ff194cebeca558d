"""Cluster mode's wait queue: two pgguards in this test's event loop (in-process, for direct
access to their counts) sharing one ``[cluster]`` on a real redis-server, real PostgreSQL,
asyncpg clients. The multi-process behaviour is in test_admission.py."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from pgguard.testing.wait import await_until


def _cluster(redis_url: str, prefix: str, name: str, role: str) -> str:
    return f"""
[cluster]
redis = "{redis_url}"
instance = "{name}"
prefix = "{prefix}"
lease_ttl = 2.0

{role}
"""


async def _pair(guard, redis_server, role: str):
    prefix = f"q{uuid.uuid4().hex[:8]}"
    a = await guard(_cluster(redis_server.url, prefix, "a", role))
    b = await guard(_cluster(redis_server.url, prefix, "b", role))
    return a, b


async def _waiting(g, n: int) -> None:
    await await_until(
        lambda: g.server.control.counts().clients_waiting == n, timeout=20, what=f"{n} clients waiting"
    )


async def test_waiters_on_another_instance_are_admitted_in_fifo_order(guard, redis_server) -> None:
    a, b = await _pair(guard, redis_server, "[roles.app]\nmax_connections = 1\nqueue_timeout = 60.0\n")
    held = await asyncpg.connect(a.dsn(), ssl=False)
    tasks = []
    for n in range(1, 4):
        tasks.append(asyncio.create_task(asyncpg.connect(b.dsn(), ssl=False, server_settings={"application_name": f"c{n}"})))
        await _waiting(b, n)
    await held.close()
    for n, task in enumerate(tasks, 1):
        conn = await asyncio.wait_for(task, 30)
        assert await conn.fetchval("SHOW application_name") == f"c{n}"
        assert all(not t.done() for t in tasks[n:])  # the limit is 1: nobody else got in
        await conn.close()


async def test_cluster_waiter_times_out_with_53300(guard, redis_server) -> None:
    a, b = await _pair(guard, redis_server, "[roles.app]\nmax_connections = 1\nqueue_timeout = 0.5\n")
    held = await asyncpg.connect(a.dsn(), ssl=False)
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError, match='too many connections for role "app"'):
            await asyncpg.connect(b.dsn(), ssl=False, timeout=20)
        assert b.server.control.stats.queue_timeouts == 1
        await _waiting(b, 0)
        assert b.server.control.counts().sessions_active == 0  # its local slot was given back
    finally:
        await held.close()


async def test_cluster_wait_queue_is_bounded_by_max_queue(guard, redis_server) -> None:
    a, b = await _pair(guard, redis_server, "[roles.app]\nmax_connections = 2\nqueue_timeout = 60.0\nmax_queue = 1\n")
    held = [await asyncpg.connect(a.dsn(), ssl=False) for _ in range(2)]
    first = asyncio.create_task(asyncpg.connect(b.dsn(), ssl=False))
    await _waiting(b, 1)
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await asyncpg.connect(b.dsn(), ssl=False, timeout=20)
    await held[0].close()
    conn = await asyncio.wait_for(first, 30)
    await conn.close()
    await held[1].close()


ADMIN = '\n[admin]\nusers = ["admin"]\nauth = "trust"\n'


async def test_clients_waiting_for_the_store_show_in_queues_stats_limits_and_metrics(guard, redis_server) -> None:
    """b's first client passes b's gate (limit 1) and waits for the store (a holds the slot);
    its second waits in b's gate. Every view of b says two waiting, none active."""
    from pgguard.testing.cluster import free_port

    metrics_port = free_port()
    role = "[roles.app]\nmax_connections = 1\nqueue_timeout = 60.0\n" + ADMIN
    prefix = f"q{uuid.uuid4().hex[:8]}"
    a = await guard(_cluster(redis_server.url, prefix, "a", role))
    b = await guard(_cluster(redis_server.url, prefix, "b", role) + f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    held = await asyncpg.connect(a.dsn(), ssl=False)
    first = asyncio.create_task(asyncpg.connect(b.dsn(), ssl=False))
    await await_until(lambda: b.server.control.cluster.waiting == 1, timeout=20, what="a client waiting for the store")
    second = asyncio.create_task(asyncpg.connect(b.dsn(), ssl=False))
    await _waiting(b, 2)
    console = await asyncpg.connect(
        host="127.0.0.1", port=b.port, user="admin", database="pgguard", statement_cache_size=0, ssl=False
    )
    try:
        queues = [dict(r) for r in await console.fetch("SHOW QUEUES")]
        assert len(queues) == 1
        row = queues[0]
        assert (row["role"], row["database"], row["waiting"], row["policy"], row["cluster_waiting"]) == (
            "app", "postgres", "2", "queue", "1"
        )
        assert float(row["next_timeout"]) > 0
        stats = {r["stat"]: r["value"] for r in await console.fetch("SHOW STATS")}
        assert (stats["clients_waiting"], stats["sessions_active"], stats["queued"]) == ("2", "0", "2")
        limits = {(r["kind"], r["name"]): r for r in await console.fetch("SHOW LIMITS")}
        assert (limits[("role", "app")]["active"], limits[("role", "app")]["waiting"]) == ("0", "2")
        assert (limits[("total", "")]["active"], limits[("total", "")]["waiting"]) == ("0", "2")
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
        assert 'pgguard_clients_waiting{database="postgres",role="app"} 2.0' in text
        assert 'pgguard_sessions_active{database="postgres",role="app"}' not in text
        assert "pgguard_cluster_waiting 1.0" in text
        assert "pgguard_queued_total 2.0" in text
        await held.close()
        conn = await asyncio.wait_for(first, 30)
        await conn.close()  # the limit is 1: the second waits for the first
        conn = await asyncio.wait_for(second, 30)
        assert [dict(r) for r in await console.fetch("SHOW QUEUES")] == []
        stats = {r["stat"]: r["value"] for r in await console.fetch("SHOW STATS")}
        assert (stats["admissions"], stats["queued"]) == ("2", "2")  # each counted once
        await conn.close()
    finally:
        await console.close()
        if not held.is_closed():
            await held.close()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
