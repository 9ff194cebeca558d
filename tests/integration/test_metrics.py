"""The Prometheus endpoint, scraped over HTTP while real clients are admitted, queued and rejected."""

from __future__ import annotations

import asyncio
import urllib.error

import asyncpg
import pytest
from console_client import http_get, sample, scrape

from pgguard.metrics import METRIC_NAMES
from pgguard.testing.cluster import free_port
from pgguard.testing.wait import await_until

METRICS = '[metrics]\nlisten = "127.0.0.1:0"\n'


async def test_sessions_admissions_and_rejections_are_exported(guard) -> None:
    g = await guard(METRICS + '[roles.app]\nmax_connections = 1\npolicy = "reject"\n')
    address = g.server.metrics.address
    held = await asyncpg.connect(g.dsn("app"))
    await held.fetchval("SELECT 1")
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await asyncpg.connect(g.dsn("app"))
    s = await scrape(address)
    assert sample(s, "pgguard_sessions_active", role="app", database="postgres") == 1
    assert sample(s, "pgguard_admissions_total") == 1
    assert sample(s, "pgguard_rejections_total", reason="limit") == 1
    assert sample(s, "pgguard_rejections_total", reason="queue_timeout") == 0
    assert sample(s, "pgguard_limit_connections", kind="role", name="app") == 1
    assert sample(s, "pgguard_limit_connections", kind="total", name="") == -1
    assert sample(s, "pgguard_clients_connected", state="active") == 1
    assert sample(s, "pgguard_bytes_relayed_total", direction="client_to_server") > 0
    assert sample(s, "pgguard_bytes_relayed_total", direction="server_to_client") > 0
    await held.close()
    await g.wait_idle()
    s = await scrape(address)
    assert sample(s, "pgguard_sessions_active", role="app", database="postgres") == 0
    # Closed sessions' bytes stay counted.
    assert sample(s, "pgguard_bytes_relayed_total", direction="server_to_client") > 0


async def test_queue_wait_histogram_and_waiting_gauge(guard) -> None:
    g = await guard(METRICS + "[roles.app]\nmax_connections = 1\n")
    address = g.server.metrics.address
    held = await asyncpg.connect(g.dsn("app"))
    waiter = asyncio.create_task(asyncpg.connect(g.dsn("app", "limdb")))
    await await_until(lambda: g.server.control.counts().clients_waiting == 1, what="the second client to queue")
    s = await scrape(address)
    assert sample(s, "pgguard_clients_waiting", role="app", database="limdb") == 1
    assert sample(s, "pgguard_queue_wait_seconds_count") == 1  # only the first, admitted at once
    await held.close()
    second = await asyncio.wait_for(waiter, 20)
    s = await scrape(address)
    assert sample(s, "pgguard_clients_waiting", role="app", database="limdb") == 0
    assert sample(s, "pgguard_queue_wait_seconds_count") == 2
    assert sample(s, "pgguard_queued_total") == 1
    assert sample(s, "pgguard_queue_wait_seconds_bucket", le="0.001") == 1
    assert sample(s, "pgguard_queue_wait_seconds_bucket", le="+Inf") == 2
    assert sample(s, "pgguard_queue_wait_seconds_sum") > 0
    await second.close()


async def test_dial_failures_are_counted(guard) -> None:
    g = await guard(METRICS + f"[backend]\nport = {free_port()}\nconnect_timeout = 5.0\n")
    with pytest.raises(asyncpg.CannotConnectNowError) as info:
        await asyncpg.connect(g.dsn("app"))
    assert info.value.detail.startswith("pgguard could not connect to the server: ")
    s = await scrape(g.server.metrics.address)
    assert sample(s, "pgguard_backend_dial_failures_total") == 1
    assert sample(s, "pgguard_sessions_active", role="app", database="postgres") == 0


async def test_every_documented_metric_is_exported_and_other_paths_are_404(guard) -> None:
    g = await guard(METRICS)
    address = g.server.metrics.address
    text = await http_get(address, "/metrics")
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    openmetrics = await http_get(
        address, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert openmetrics.rstrip().endswith("# EOF")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        await http_get(address, "/")


async def test_address_sessions_are_labelled_per_configured_network_only(guard) -> None:  # type: ignore[no-untyped-def]
    """Clients from 127.0.0.2 and 127.0.0.3 (raw sockets): /metrics counts them under the
    configured network, never under their own addresses, and the count drops as they leave."""
    from raw_client import raw_login

    g = await guard(METRICS + '[addresses."127.0.0.0/29"]\nmax_connections = 5\n')
    sessions = []
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.3"):
        session, error = await raw_login(g.port, source)
        assert error is None, error
        sessions.append(session)
    plain = await asyncpg.connect(g.dsn("app"))  # 127.0.0.1 is in the /29 too
    s = await scrape(g.server.metrics.address)
    assert sample(s, "pgguard_address_sessions", network="127.0.0.0/29") == 4
    assert sample(s, "pgguard_limit_connections", kind="address", name="127.0.0.0/29") == 5
    text = await http_get(g.server.metrics.address, "/metrics")
    assert "127.0.0.2" not in text and "127.0.0.3" not in text
    for session in sessions:
        await session.close()
    await plain.close()
    await g.wait_idle()
    s = await scrape(g.server.metrics.address)
    assert sample(s, "pgguard_address_sessions", network="127.0.0.0/29") == 0
