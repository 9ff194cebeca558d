"""The pool advice of docs/semantics.md, shown with SQLAlchemy (psycopg) against a role limit of 5.

An application pool larger than the role's limit does not queue politely: a pooled
connection keeps its slot while idle in the pool, so with policy queue the checkouts beyond
the limit wait ``queue_timeout`` and then get 53300. A pool sized to the limit never reaches
pgguard's queue: the surplus waits in the pool instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import psycopg
import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

LIMIT = 5
TOML = f"[roles.app]\nmax_connections = {LIMIT}\npolicy = \"queue\"\nqueue_timeout = 1.0\n"


async def checkouts(engine, n: int) -> list[BaseException | None]:  # type: ignore[no-untyped-def]
    """``n`` threads each check a connection out and hold it until all ``n`` have an answer."""
    done = threading.Barrier(n, timeout=60)
    results: list[BaseException | None] = [None] * n

    def one(i: int) -> None:
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
                done.wait()
        except sqlalchemy.exc.OperationalError as exc:
            results[i] = exc
            done.wait()

    # One thread each (the default executor has fewer than n on a small machine).
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, one, i) for i in range(n)))
    return results


async def test_a_pool_larger_than_the_limit_gets_53300_after_queue_timeout(guard) -> None:
    g = await guard(TOML)
    engine = sqlalchemy.create_engine(
        g.dsn("app").replace("postgresql://", "postgresql+psycopg://"), pool_size=10, max_overflow=0
    )
    try:
        results = await checkouts(engine, 10)
        refused = [r for r in results if r is not None]
        assert len(refused) == 10 - LIMIT
        for exc in refused:
            assert isinstance(exc.orig, psycopg.OperationalError)
            assert 'too many connections for role "app"' in str(exc.orig)
        assert g.server.stats.queue_timeouts == 10 - LIMIT
        # The five that got in are idle in the pool now, and still hold every slot.
        assert g.role_active("app") == LIMIT
    finally:
        await asyncio.to_thread(engine.dispose)


async def test_a_pool_sized_to_the_limit_never_queues_at_pgguard(guard) -> None:
    g = await guard(TOML)
    engine = sqlalchemy.create_engine(
        g.dsn("app").replace("postgresql://", "postgresql+psycopg://"),
        pool_size=LIMIT, max_overflow=0, pool_timeout=60,
    )  # fmt: skip

    def work() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sqlalchemy.text("SELECT 1")).scalar_one())

    try:
        assert await asyncio.gather(*(asyncio.to_thread(work) for _ in range(20))) == [1] * 20
        assert g.server.stats.queued == 0 and g.server.stats.rejections.total() == 0
    finally:
        await asyncio.to_thread(engine.dispose)
