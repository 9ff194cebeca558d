"""Health checks that tell the truth: pg_isready through pgguard, and /healthz, /readyz.

libpq's PQping (pg_isready) reports "rejecting connections" only for SQLSTATE 57P03 and
"accepting connections" for any other startup error, so pgguard answers a client whose
server cannot be reached with 57P03. The "server down" here is a real one: a loopback port
nothing listens on (connection refused), and a throwaway cluster stopped mid-test.
"""

from __future__ import annotations

import asyncio
import shutil
import urllib.error

import asyncpg
import psycopg
import pytest
from console_client import http_get

from pgguard.testing.cluster import PostgresCluster, free_port
from pgguard.testing.wait import await_until

METRICS = '[metrics]\nlisten = "127.0.0.1:0"\n'
PG_ISREADY = shutil.which("pg_isready")
needs_pg_isready = pytest.mark.skipif(PG_ISREADY is None, reason="pg_isready is not installed")


async def pg_isready(port: int) -> tuple[int, str]:
    assert PG_ISREADY is not None
    proc = await asyncio.create_subprocess_exec(
        PG_ISREADY, "-h", "127.0.0.1", "-p", str(port), "-U", "app", "-d", "postgres", "-t", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip()


async def get_status(address: tuple[str, int], path: str) -> tuple[int, str]:
    try:
        return 200, await http_get(address, path)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@needs_pg_isready
async def test_pg_isready_through_pgguard_accepting_while_the_server_is_up(guard) -> None:
    g = await guard()
    code, out = await pg_isready(g.port)
    assert (code, out) == (0, f"127.0.0.1:{g.port} - accepting connections")


@needs_pg_isready
async def test_pg_isready_through_pgguard_rejecting_while_the_server_is_down(guard) -> None:
    g = await guard(f"[backend]\nport = {free_port()}\n")
    code, out = await pg_isready(g.port)
    assert (code, out) == (1, f"127.0.0.1:{g.port} - rejecting connections")
    await g.wait_idle()


async def test_unreachable_server_is_57p03_with_the_reason_in_detail(guard) -> None:
    g = await guard(f"[backend]\nport = {free_port()}\n")
    with pytest.raises(asyncpg.CannotConnectNowError) as info:
        await asyncpg.connect(g.dsn("app"), timeout=30)
    assert info.value.sqlstate == "57P03"
    assert info.value.severity == "FATAL"
    assert info.value.message == "the database system is not accepting connections"
    assert info.value.detail.startswith("pgguard could not connect to the server: ")
    # libpq (psycopg) shows the same message; the detail travels with it.
    with pytest.raises(psycopg.OperationalError, match="the database system is not accepting connections"):
        await psycopg.AsyncConnection.connect(g.conninfo("app"), connect_timeout=20)
    await g.wait_idle()


async def test_healthz_is_200_and_readyz_follows_the_server(guard) -> None:
    """A throwaway cluster of its own, stopped mid-test: /readyz goes 503 and pg_isready says
    rejecting; /healthz stays 200 (pgguard itself still serves)."""
    cluster = PostgresCluster(max_connections=20)
    await asyncio.to_thread(cluster.start)
    try:
        await asyncio.to_thread(cluster.create_role, "app")
        g = await guard(METRICS + f"[backend]\nport = {cluster.port}\n")
        address = g.server.metrics.address
        assert await get_status(address, "/healthz") == (200, "ok\n")
        assert await get_status(address, "/readyz") == (200, "ready\n")
        conn = await asyncpg.connect(g.dsn("app"), timeout=30)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        await g.wait_idle()
        port = cluster.port
        await asyncio.to_thread(cluster.stop)

        async def not_ready() -> bool:
            status, _ = await get_status(address, "/readyz")
            return status == 503

        # The ready answer is cached for READY_CACHE (1 s); poll until it is re-probed.
        await await_until(not_ready, timeout=20, what="/readyz to report the stopped server")
        status, body = await get_status(address, "/readyz")
        assert status == 503 and body.startswith(f"not ready: server 127.0.0.1:{port}: ")
        assert await get_status(address, "/healthz") == (200, "ok\n")
        if PG_ISREADY is not None:
            assert (await pg_isready(g.port))[0] == 1
        await g.wait_idle()
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_readyz_is_503_while_draining(guard) -> None:
    g = await guard(METRICS)
    address = g.server.metrics.address
    held = await asyncpg.connect(g.dsn("app"), timeout=30)
    drain = asyncio.create_task(g.server.drain(timeout=30))
    await await_until(lambda: g.server.draining, what="pgguard to start draining")
    assert await get_status(address, "/readyz") == (503, "not ready: draining\n")
    assert await get_status(address, "/healthz") == (200, "ok\n")
    await held.close()
    assert await asyncio.wait_for(drain, 30) is True
