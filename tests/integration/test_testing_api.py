"""pgguard.testing's guard API through real clients: sync (background loop) and async (in-loop) forms."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

import pgguard.testing
from pgguard.errors import ConfigError
from pgguard.rules import FaultSpecError
from pgguard.testing import aguard, guard
from pgguard.testing.guard import parse_dsn
from pgguard.testing.wait import await_until


def test_sync_guard_limits_a_role_and_points_its_dsn_at_pgguard(pg) -> None:
    with guard(pg.dsn("app"), config={"roles": {"app": {"policy": "reject"}}}) as g:
        assert g.dsn == f"postgresql://app@127.0.0.1:{g.port}/postgres"
        assert g.dsn_for("other", "limdb", password="p w") == (
            f"postgresql://other:p%20w@127.0.0.1:{g.port}/limdb"
        )
        g.set_limit("app", 1)
        with psycopg.connect(g.dsn, sslmode="disable") as held:
            assert held.execute("SELECT current_user").fetchone() == ("app",)
            with pytest.raises(
                psycopg.OperationalError, match='too many connections for role "app"'
            ):
                psycopg.connect(g.dsn, sslmode="disable")
            (info,) = g.clients()
            assert (info.role, info.database, info.state) == ("app", "postgres", "active")
            assert info.backend_pid == held.info.backend_pid
            with psycopg.connect(g.dsn_for("other"), sslmode="disable"):
                assert len(g.clients(role="other")) == 1
        g.wait_idle()
        stats = g.stats()
        assert stats["admissions"] == 2 and stats["rejections"] == {"limit": 1}
        assert stats["active"] == 0 and stats["waiting"] == 0
        assert pg.connection_count(users=["app"]) == 0


def test_sync_guard_inject_and_clear_faults_from_an_asyncio_test(pg) -> None:
    async def scenario(g: pgguard.testing.Guard) -> None:
        rule = g.inject(reject_next=2, role="app", sqlstate="57P03")
        for _ in range(2):
            with pytest.raises(asyncpg.CannotConnectNowError, match="shutting down"):
                await asyncpg.connect(g.dsn)
        conn = await asyncpg.connect(g.dsn)
        await conn.close()
        assert rule.fired == 2
        g.inject("REJECT ROLE app")
        assert [f["state"] for f in g.faults()] == ["spent", "live"]
        assert g.clear_faults() == 2 and g.faults() == []
        conn = await asyncpg.connect(g.dsn)
        await conn.close()
        assert g.stats()["faults"] == {"reject": 2}

    with guard(pg.dsn("app")) as g:
        assert threading.current_thread() is threading.main_thread()
        asyncio.run(scenario(g))  # a loop of its own; pgguard runs on the guard's thread


def test_reset_returns_to_the_config(pg) -> None:
    with guard(pg.dsn("app"), config='[roles.app]\nmax_connections = 3\npolicy = "reject"') as g:
        g.set_limit("app", 0)
        g.inject(drop_next=5)
        g.pause()
        g.reset()
        assert g.faults() == [] and not g.server.control.counts().paused
        assert g.server.control.role_limit("app") == (3, "config")
        with psycopg.connect(g.dsn, sslmode="disable"):
            pass


def test_bad_config_and_bad_rules_are_refused(pg) -> None:
    with pytest.raises(ConfigError, match="roles.app.max_connections"):
        with guard(pg.dsn("app"), config={"roles": {"app": {"max_connections": "two"}}}):
            pass
    with guard(pg.dsn("app")) as g:
        with pytest.raises(FaultSpecError):
            g.inject(reject_next=0)
        with pytest.raises(FaultSpecError):
            g.inject(reject_next=1, delay=0.5)
        with pytest.raises(FaultSpecError):
            g.inject("EXPLODE")


async def test_async_guard_queues_in_the_current_loop(pg) -> None:
    async with aguard(pg.dsn("app"), config="[roles.app]\nmax_connections = 1") as g:
        assert g.server.loop is asyncio.get_running_loop()
        first = await asyncpg.connect(g.dsn)
        second = asyncio.create_task(asyncpg.connect(g.dsn))
        await await_until(lambda: g.stats()["waiting"] == 1, what="the second client to queue")
        assert sorted(c.state for c in g.clients()) == ["active", "queued"]
        await first.close()
        conn = await second
        assert pg.connection_count(users=["app"]) == 1
        await conn.close()
        await g.wait_idle()
        stats = g.stats()
        assert stats["queued"] == 1 and stats["wait_max"] > 0


async def test_async_guard_set_limit_admits_waiters(pg) -> None:
    async with aguard(pg.dsn("app")) as g:
        g.set_limit("app", 0)
        task = asyncio.create_task(asyncpg.connect(g.dsn))
        await await_until(lambda: g.stats()["role_waiting"].get("app") == 1, what="a waiter")
        g.set_limit("app", -1)
        conn = await task
        await conn.close()


def test_guard_without_a_backend_starts_and_stops_its_own_cluster() -> None:
    with guard() as g:
        cluster = g.cluster
        assert cluster is not None and cluster.running
        with psycopg.connect(g.dsn, sslmode="disable") as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        g.wait_idle()
    assert not cluster.running


def test_parse_dsn_url_and_keywords() -> None:
    assert parse_dsn("postgresql://a%40b:p%3Aw@h:5433/d%2Fb?sslmode=disable") == {
        "host": "h",
        "port": "5433",
        "user": "a@b",
        "password": "p:w",
        "database": "d/b",
        "query": "sslmode=disable",
    }
    assert parse_dsn("host=h port=1 user=u dbname='my db'") == {
        "host": "h",
        "port": "1",
        "user": "u",
        "database": "my db",
    }
