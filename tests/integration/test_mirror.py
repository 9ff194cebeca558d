"""Mirror mode: pgguard follows ALTER ROLE/DATABASE ... CONNECTION LIMIT and enforces it itself."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest
from console_client import ADMIN_TOML, admin_connect, by, fetch

from pgguard.testing.cluster import free_port
from pgguard.testing.wait import await_until

ROLE = "mirrored"


@pytest.fixture
def mirrored_role(pg):
    pg.create_role(ROLE, connection_limit=2)
    yield ROLE
    pg.terminate(users=[ROLE])
    pg.execute(f"ALTER ROLE {ROLE} CONNECTION LIMIT -1")
    pg.execute("ALTER DATABASE otherdb CONNECTION LIMIT -1")


def _mirror_toml(dsn: str) -> str:
    return (
        ADMIN_TOML
        + f'[backend]\nmonitor_dsn = "{dsn}"\n'
        + "[limits]\nmirror_catalog = true\nmirror_interval = 0.2\nqueue_timeout = 60.0\n"
    )


async def test_a_storm_queues_at_pgguard_under_the_catalog_limit(guard, pg, mirrored_role) -> None:
    g = await guard(_mirror_toml(pg.dsn()))
    control = g.server.control
    assert control.role_limit(ROLE) == (2, "catalog")  # read before the first client was accepted

    async def client() -> int:
        conn = await asyncpg.connect(g.dsn(ROLE), timeout=60)
        try:
            peak = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", ROLE
            )
            await conn.execute("SELECT pg_sleep(0.02)")
            return int(peak)
        finally:
            await conn.close()

    # 20 clients against rolconnlimit 2: straight to the server, 18 would get 53300.
    peaks = await asyncio.wait_for(asyncio.gather(*(client() for _ in range(20))), 120)
    assert max(peaks) <= 2
    assert g.server.stats.rejections.total() == 0 and g.server.stats.queued > 0


async def test_limits_follow_alter_role_and_alter_database(guard, pg, mirrored_role) -> None:
    g = await guard(_mirror_toml(pg.dsn()))
    control = g.server.control
    console = await admin_connect(g.port)
    assert by(await fetch(console, "SHOW LIMITS"), kind="role", name=ROLE)["source"] == "catalog"
    held = [await asyncpg.connect(g.dsn(ROLE)) for _ in range(2)]
    third = asyncio.create_task(asyncpg.connect(g.dsn(ROLE)))
    await await_until(lambda: control.counts().clients_waiting == 1, what="the third client to queue at pgguard")

    pg.execute(f"ALTER ROLE {ROLE} CONNECTION LIMIT 3")
    held.append(await asyncio.wait_for(third, 20))  # admitted as soon as the mirror read 3
    assert control.role_limit(ROLE) == (3, "catalog")

    pg.execute("ALTER DATABASE otherdb CONNECTION LIMIT 4")
    await await_until(
        lambda: control.database_limit("otherdb") == (4, "catalog"), what="otherdb's limit mirrored"
    )
    pg.execute(f"ALTER ROLE {ROLE} CONNECTION LIMIT -1")
    await await_until(
        lambda: control.role_limit(ROLE) == (-1, "default"), what="the role's limit to be lifted"
    )
    # A limit set in pgguard wins over the catalog.
    await console.execute("SET LIMIT DATABASE otherdb = 1")
    assert by(await fetch(console, "SHOW LIMITS"), kind="database", name="otherdb")["source"] == "runtime"
    await asyncio.gather(*(c.close() for c in held), console.close())


async def test_an_unreachable_server_is_logged_and_retried(guard, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pgguard")
    g = await guard(_mirror_toml(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"))
    await await_until(lambda: g.server.stats.mirror_failures >= 2, what="a second mirror attempt")
    assert caplog.text.count("event=mirror_failed") == 1  # one line per failure streak
    assert g.server.control.role_limit(ROLE) == (-1, "default")
