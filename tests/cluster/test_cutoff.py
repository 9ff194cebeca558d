"""The cut-off rule end to end: one pgguard cannot reach Redis for longer than lease_ttl while
Redis stays up for the others, which are given its slots; when it reaches Redis again it
keeps only the sessions that still fit, oldest first, and closes the rest with FATAL 57P01.

Three real ``python -m pgguard run`` processes and a real redis-server; the cut-off is a TCP
forwarder between the first pgguard and Redis that stops forwarding (``procs.Forwarder``),
so Redis itself never stops. psycopg holds the first pgguard's sessions (libpq reads the
FATAL that pgguard sends), asyncpg the others; ``pg_stat_activity`` is the server's view."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack

import asyncpg
import psycopg
from procs import ROLE_LIMIT, Forwarder, Instance, Sampler, _client, instance

from pgguard.testing.wait import await_until

BODY = f"[roles.app]\nmax_connections = {ROLE_LIMIT}\nqueue_timeout = 60.0\n"
OTHERS = 3  # sessions the other pgguards get while the first is cut off


async def _store_waiting(guards: list[Instance]) -> int:
    total = 0
    for g in guards:
        total += sum(int(r["cluster_waiting"]) for r in await g.show("QUEUES"))
    return total


async def test_cut_off_pgguard_keeps_what_fits_oldest_first_and_closes_the_rest(tmp_path, pg, redis_server) -> None:
    forwarder = Forwarder(redis_server.port)
    await forwarder.start()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        stack.push_async_callback(forwarder.close)
        cut = await stack.enter_async_context(instance(tmp_path, pg, forwarder.url, prefix, "cut", BODY))
        others = [
            await stack.enter_async_context(instance(tmp_path, pg, redis_server.url, prefix, f"o{i}", BODY))
            for i in range(2)
        ]
        # The cut-off pgguard holds every slot, its sessions opened one after the other.
        held = []
        for n in range(ROLE_LIMIT):
            conninfo = f"host=127.0.0.1 port={cut.port} user=app dbname=postgres application_name=s{n}"
            held.append(await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=20))
            stack.push_async_callback(held[-1].close)
        waiting = [
            asyncio.create_task(asyncpg.connect(others[i % 2].dsn(), ssl=False, timeout=60)) for i in range(OTHERS)
        ]

        async def all_waiting() -> bool:
            return await _store_waiting(others) == OTHERS

        await await_until(all_waiting, timeout=30, what="clients waiting for the store elsewhere")
        sampler = Sampler(pg)
        sampling = asyncio.create_task(sampler.run())

        forwarder.freeze()
        # lease_ttl after its last renewal the store expires it; the others' waiters get in.
        admitted = await asyncio.wait_for(asyncio.gather(*waiting), 60)
        for conn in admitted:
            stack.push_async_callback(conn.close)
        await await_until(
            lambda: "event=cluster_fallback" in cut.log_text, timeout=30, what="the cut-off pgguard to fall back"
        )
        sampler.stop()
        await sampling
        during = sampler.peak

        forwarder.thaw()
        await await_until(
            lambda: "event=cluster_sessions_lost" in cut.log_text, timeout=30, what="the re-register after the cut-off"
        )

        async def closed_at_server() -> bool:  # in a thread: this loop runs the forwarder
            return await asyncio.to_thread(pg.connection_count, users=["app"]) == ROLE_LIMIT

        await await_until(closed_at_server, timeout=30, what="the closed sessions to end at the server")
        outcomes = []
        for conn in held:
            try:
                await conn.execute("SELECT 1")
                outcomes.append("kept")
            except psycopg.errors.AdminShutdown as exc:  # 57P01, with pgguard's reason
                assert "lost its slot in the cluster store" in str(exc), str(exc)
                outcomes.append("closed")
        kept = ROLE_LIMIT - OTHERS
        print(f"cut-off: peak {during} during it (limit {ROLE_LIMIT}); after: {outcomes}")
        assert outcomes == ["kept"] * kept + ["closed"] * OTHERS  # the oldest are kept
        assert "count=3 kept=2" in cut.log_text

        # Recovered: a storm over all three never shows more than the limit at the server.
        sampler = Sampler(pg)
        sampling = asyncio.create_task(sampler.run())
        results: list[str] = []
        storm = [asyncio.create_task(_client((cut, *others)[i % 3].dsn(), results)) for i in range(30)]
        for conn in held[:kept]:
            await conn.close()
        for conn in admitted:
            await conn.close()
        await asyncio.wait_for(asyncio.gather(*storm), 120)
        sampler.stop()
        await sampling
        print(f"after recovery: 30 clients, peak {sampler.peak} in {sampler.samples} samples")
        assert results == ["served"] * 30
        assert sampler.peak <= ROLE_LIMIT
