"""The control layer's snapshots: the console, /metrics and the testing API read the same numbers."""

from __future__ import annotations

import os
import signal

import asyncpg
import pytest
from console_client import ADMIN_TOML, admin_connect, fetch, scrape

from pgguard.testing.wait import await_until

pytestmark = pytest.mark.asyncio


async def test_metrics_and_show_stats_agree_on_a_slot_held_after_its_client_left(guard) -> None:  # type: ignore[no-untyped-def]
    """A client leaves; its server session has not closed yet, so its slot is still held.

    The backend is stopped (SIGSTOP) to hold it there: it cannot read the Terminate until it
    is continued. SHOW STATS and /metrics must both count the slot and no connected client.
    """
    g = await guard(
        ADMIN_TOML + '[metrics]\nlisten = "127.0.0.1:0"\n[backend]\nclose_timeout = 120\n'
    )
    conn = await asyncpg.connect(g.dsn("app"), timeout=30)
    pid = await conn.fetchval("select pg_backend_pid()")
    os.kill(pid, signal.SIGSTOP)
    try:
        conn.terminate()
        await await_until(lambda: not g.server.clients, what="the client to be gone")
        admin = await admin_connect(g.port)
        stats = {r["stat"]: r["value"] for r in await fetch(admin, "SHOW STATS")}
        samples = await scrape(g.server.metrics.address)
        held = sum(v for (name, _), v in samples.items() if name == "pgguard_sessions_active")
        connected = {
            dict(labels)["state"]: v
            for (name, labels), v in samples.items()
            if name == "pgguard_clients_connected"
        }
        assert (stats["sessions_active"], stats["clients_connected"]) == ("1", "0")
        assert held == 1
        assert connected.get("active", 0) == 0 and connected.get("admin") == 1
        assert g.server.control.counts().sessions_active == 1
        await admin.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    await g.wait_idle()
