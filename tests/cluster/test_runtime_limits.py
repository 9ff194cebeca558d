"""Run-time limits in cluster mode: SET LIMIT on one pgguard applies on all, and a RELOAD
(or SIGHUP) or RESET LIMIT on any one takes every pgguard back to its file's values, both in
SHOW LIMITS and in what admission enforces. Three real ``python -m pgguard run`` processes,
a real redis-server, a real PostgreSQL, asyncpg clients."""

from __future__ import annotations

import signal
import uuid

import asyncpg
import pytest
from procs import ROLE_LIMIT, Instance, three

from pgguard.leases import LeaseStore
from pgguard.limits import Limit
from pgguard.testing.wait import await_until

BODY = f'[roles.app]\nmax_connections = {ROLE_LIMIT}\npolicy = "reject"\n'


async def _console(g: Instance, statement: str) -> None:
    console = await g.console()
    try:
        await console.execute(statement)
    finally:
        await console.close()


async def _everywhere(guards: list[Instance], value: int, source: str) -> None:
    async def seen() -> bool:
        for g in guards:
            rows = await g.show("LIMITS")
            if not any(r["kind"] == "role" and r["name"] == "app" and r["limit"] == str(value)
                       and r["source"] == source for r in rows):
                return False
        return True

    await await_until(seen, timeout=20, what=f"every instance to show app = {value} ({source})")


async def _admits_exactly(guards: list[Instance], n: int) -> None:
    """``n`` sessions spread over the instances are admitted, the next one gets 53300."""
    held = [await asyncpg.connect(guards[i % 3].dsn(), ssl=False, timeout=20) for i in range(n)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError, match='too many connections for role "app"'):
            await asyncpg.connect(guards[n % 3].dsn(), ssl=False, timeout=20)
    finally:
        for conn in held:
            await conn.close()


async def _stored(g: Instance, url: str) -> int | None:
    store = LeaseStore(url, instance="observer", prefix=g.prefix)
    await store.start(background=False)
    try:
        return (await store.usage([(Limit.ROLE, "app")]))[0].runtime
    finally:
        await store.close()


async def test_reload_reset_and_sighup_take_every_instance_back_to_the_file(tmp_path, pg, redis_server) -> None:
    async with three(tmp_path, pg, redis_server.url, BODY) as guards:
        await _console(guards[0], "SET LIMIT ROLE app = 2")
        await _everywhere(guards, 2, "runtime")
        await _admits_exactly(guards, 2)

        # RELOAD on another instance: the stored value goes, every instance back to 5.
        await _console(guards[1], "RELOAD")
        await _everywhere(guards, ROLE_LIMIT, "config")
        assert await _stored(guards[0], redis_server.url) is None
        await _admits_exactly(guards, ROLE_LIMIT)

        # RESET LIMIT on a third one removes just that limit, everywhere.
        await _console(guards[2], "SET LIMIT ROLE app = 1")
        await _everywhere(guards, 1, "runtime")
        await _console(guards[0], "RESET LIMIT ROLE app")
        await _everywhere(guards, ROLE_LIMIT, "config")
        await _admits_exactly(guards, ROLE_LIMIT)

        # SIGHUP is a reload too.
        await _console(guards[0], "SET LIMIT ROLE app = 3")
        await _everywhere(guards, 3, "runtime")
        guards[2].proc.send_signal(signal.SIGHUP)
        await _everywhere(guards, ROLE_LIMIT, "config")
        assert await _stored(guards[0], redis_server.url) is None
        await _admits_exactly(guards, ROLE_LIMIT)


async def test_a_reload_while_redis_does_not_answer_is_stored_when_it_does(guard, own_redis) -> None:
    """Two pgguards in this test's loop (for their gates); Redis paused (SIGSTOP: it keeps
    its data, as a partition would) while one of them reloads."""
    prefix = f"r{uuid.uuid4().hex[:8]}"

    def cluster(name: str) -> str:
        return (
            f'[cluster]\nredis = "{own_redis.url}"\ninstance = "{name}"\nprefix = "{prefix}"\n'
            f"lease_ttl = 30.0\ntimeout = 0.5\n\n{BODY}"
        )

    a = await guard(cluster("a"))
    b = await guard(cluster("b"))
    a.server.control.set_limit("role", "app", 2)
    await await_until(lambda: b.server.control.role_limit("app") == (2, "runtime"), timeout=20, what="b to hear")
    own_redis.pause()
    try:
        assert a.server.reload(a.server.config)
        assert a.server.control.role_limit("app") == (ROLE_LIMIT, "config")  # here at once
        await await_until(lambda: not a.server.control.cluster.store.up, timeout=20, what="a to see Redis gone")
        assert b.server.control.role_limit("app") == (2, "runtime")  # not stored yet
    finally:
        own_redis.resume()
    await await_until(
        lambda: b.server.control.role_limit("app") == (ROLE_LIMIT, "config"), timeout=30,
        what="the reload to reach b once Redis answers",
    )  # fmt: skip
    assert a.server.control.role_limit("app") == (ROLE_LIMIT, "config")
