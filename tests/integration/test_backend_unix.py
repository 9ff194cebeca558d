"""``[backend] host`` naming a socket directory: pgguard reaches the server over its Unix socket."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

pytestmark = pytest.mark.asyncio


async def test_backend_unix_socket_relays_and_forwards_cancel(pg, guard) -> None:  # type: ignore[no-untyped-def]
    g = await guard(f'[backend]\nhost = "{pg.socket_dir}"\n[roles.app]\nmax_connections = 1')
    conn = await asyncpg.connect(g.dsn("app"), timeout=30)
    try:
        # The server sees a Unix-socket session: no client address.
        assert await conn.fetchval("SELECT client_addr FROM pg_stat_activity WHERE pid = pg_backend_pid()") is None
        started = time.monotonic()
        # asyncpg answers its own timeout with a CancelRequest, which pgguard forwards over
        # the same socket; without it the statement would run its full 60 s.
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("SELECT pg_sleep(60)", timeout=0.5)
        assert time.monotonic() - started < 30
        assert await conn.fetchval("SELECT 1") == 1
        assert g.server.stats.cancels_forwarded == 1
    finally:
        await conn.close()
    await g.wait_idle()
