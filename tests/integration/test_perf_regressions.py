"""Behaviour the benchmark harness found costly when it broke: keep it from coming back."""

from __future__ import annotations

import psycopg
import pytest

pytestmark = pytest.mark.asyncio


async def test_libpq_client_leaving_cleanly_sends_no_cancel(guard) -> None:  # type: ignore[no-untyped-def]
    """libpq sends Terminate and closes at once, so pgguard sees the client gone before the
    server: that goodbye is not a running query. A CancelRequest here would cost the server
    one more process per disconnect (pgbench -C through pgguard fell from 0.88x to 0.65x
    of direct)."""
    g = await guard()
    for _ in range(3):
        conn = await psycopg.AsyncConnection.connect(g.conninfo("app"), autocommit=True)
        await conn.execute("select 1")
        await conn.close()
    await g.wait_idle()
    assert g.server.stats.cancels_forwarded == 0
