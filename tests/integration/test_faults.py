"""Fault rules observed through real clients: reject next N / a fraction, delay, drop, terminate."""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import psycopg
import pytest
from console_client import ADMIN_TOML, psql, psql_rows

from pgguard import config as config_mod
from pgguard.errors import ConfigError
from pgguard.testing.wait import await_until


async def _connect(g, user: str = "app", database: str = "postgres") -> asyncpg.Connection:
    return await asyncpg.connect(g.dsn(user, database), timeout=30)


async def _psycopg(g, user: str = "app", database: str = "postgres", **extra: str):
    return await psycopg.AsyncConnection.connect(
        g.conninfo(
            user, database, sslmode="disable", gssencmode="disable", connect_timeout="30", **extra
        )
    )


def _live(g) -> int:
    """Fault rules that can still fire."""
    return sum(row["state"] == "live" for row in g.api.faults())


async def test_reject_next_n_answers_53300_for_that_role_only(guard) -> None:
    g = await guard()
    assert g.api.faults() == []
    rule = g.api.inject("REJECT NEXT 2 ROLE app")
    assert _live(g) == 1
    other = await _connect(g, user="other")  # another role passes untouched
    for _ in range(2):
        with pytest.raises(
            asyncpg.TooManyConnectionsError, match='too many connections for role "app"'
        ):
            await _connect(g)
    conn = await _connect(g)  # the third is the real thing
    assert await conn.fetchval("SELECT current_user") == "app"
    assert (rule.fired, rule.state, _live(g)) == (2, "spent", 0)
    stats = g.api.stats()
    assert stats["faults"]["reject"] == 2 and stats["rejections"]["fault"] == 2
    row = g.api.faults()[0]
    assert (row["id"], row["kind"], row["role"], row["database"]) == (rule.id, "reject", "app", "")
    assert (row["remaining"], row["fired"], row["state"], row["source"]) == ("0", 2, "spent", "api")
    await conn.close()
    await other.close()


async def test_reject_with_any_sqlstate_and_message_for_a_database(guard) -> None:
    g = await guard()
    g.api.inject("REJECT NEXT 1 DATABASE limdb SQLSTATE 57P03")
    g.api.inject("REJECT NEXT 1 DATABASE limdb SQLSTATE 3D000 MESSAGE 'no {database} for {role} today'")
    with pytest.raises(psycopg.OperationalError, match="the database system is shutting down"):
        await _psycopg(g, database="limdb")
    with pytest.raises(asyncpg.InvalidCatalogNameError, match="no limdb for app today") as info:
        await _connect(g, database="limdb")
    assert info.value.sqlstate == "3D000"
    conn = await _psycopg(g, database="limdb")
    await conn.close()


async def test_reject_fraction_is_seeded_and_reproducible(guard) -> None:
    text = "REJECT FRACTION 0.5 ROLE app"
    g = await guard(f"[faults]\nseed = 42\nrules = [{text!r}]".replace("'", '"'))
    rng = random.Random(f"42/{text}")
    expected = [rng.random() < 0.5 for _ in range(16)]
    seen = []
    for _ in range(16):
        try:
            conn = await _connect(g)
        except asyncpg.TooManyConnectionsError:
            seen.append(True)
        else:
            seen.append(False)
            await conn.close()
    assert seen == expected
    assert 0 < sum(seen) < 16
    (row,) = g.api.faults()
    assert (row["source"], row["fired"]) == ("config", sum(expected))


async def test_delay_holds_the_client_without_a_slot_then_admits_it(guard) -> None:
    g = await guard()
    rule = g.api.inject("DELAY 0.4 NEXT 1 ROLE app")
    t0 = time.monotonic()
    task = asyncio.create_task(_connect(g))
    await await_until(lambda: rule.fired == 1, what="the delay rule to fire")
    stats = g.api.stats()
    assert stats["active"] == 0 and stats["waiting"] == 0
    conn = await task
    assert time.monotonic() - t0 >= 0.4
    assert rule.state == "spent"
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_random_delay_stays_within_its_bounds(guard) -> None:
    g = await guard()
    g.api.inject("DELAY 0.1..0.3 NEXT 2 SEED 5")
    for _ in range(2):
        t0 = time.monotonic()
        conn = await _connect(g)
        assert time.monotonic() - t0 >= 0.1
        await conn.close()


async def test_delayed_client_that_leaves_holds_nothing(guard) -> None:
    g = await guard()
    rule = g.api.inject("DELAY 0.3 NEXT 1")
    task = asyncio.create_task(_connect(g))
    await await_until(lambda: rule.fired == 1, what="the delay rule to fire")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await await_until(lambda: not g.server.clients, what="the cancelled client to be gone")
    await asyncio.sleep(0.4)  # past the delay: its timer must find the client gone
    stats = g.api.stats()
    assert stats["active"] == 0 and stats["admissions"] == 0


async def test_drop_closes_the_connection_mid_startup(guard) -> None:
    g = await guard()
    rule = g.api.inject("DROP NEXT 1 ROLE app")
    with pytest.raises(psycopg.OperationalError, match="closed the connection unexpectedly"):
        await _psycopg(g)
    assert rule.fired == 1
    conn = await _psycopg(g)
    await conn.close()
    stats = g.api.stats()
    assert stats["active"] <= 1 and not stats["rejections"]


async def test_terminate_sends_57p01_to_the_role_and_frees_its_slots(guard, pg) -> None:
    g = await guard("[roles.app]\nmax_connections = 2")
    a = await _connect(g)
    p = await _psycopg(g)
    other = await _connect(g, user="other")
    rule = g.api.inject("TERMINATE ROLE app")
    assert (rule.fired, rule.state) == (2, "done")
    with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError)):
        await a.fetchval("SELECT 1")
    with pytest.raises(
        psycopg.OperationalError, match="terminating connection due to administrator command"
    ):
        await p.execute("SELECT 1")
    assert await other.fetchval("SELECT current_user") == "other"
    await await_until(
        lambda: g.role_active("app") == 0, what="app's slots to be released"
    )
    assert pg.connection_count(users=["app"]) == 0
    await other.close()
    await p.close()


async def test_terminate_after_a_delay(guard) -> None:
    g = await guard()
    conn = await _psycopg(g)
    rule = g.api.inject("TERMINATE ROLE app AFTER 0.3 MESSAGE 'bye {role}'")
    assert rule.state == "pending"
    await conn.execute("SELECT 1")  # still alive before the delay
    await await_until(lambda: rule.state == "done", what="the terminate rule to fire")
    assert rule.fired == 1
    with pytest.raises(psycopg.OperationalError, match="bye app"):
        await conn.execute("SELECT 1")
    await conn.close()


async def test_clear_cancels_a_pending_terminate(guard) -> None:
    g = await guard()
    conn = await _connect(g)
    g.api.inject("TERMINATE AFTER 0.2")
    g.api.inject("REJECT")
    assert len(g.api.faults()) == 2 and g.api.clear_faults() == 2 and g.api.faults() == []
    await asyncio.sleep(0.3)  # past the AFTER: nothing may fire
    assert await conn.fetchval("SELECT 1") == 1
    assert g.api.stats()["faults"] == {}
    await conn.close()


async def test_reload_replaces_config_rules_and_keeps_runtime_ones(guard, pg) -> None:
    g = await guard('[faults]\nrules = ["REJECT ROLE app2"]')
    runtime = g.api.inject("DELAY 0.01 ROLE app")
    new = config_mod.loads(_config_text(pg, 'rules = ["DROP ROLE app2"]'), "<reload>")
    assert g.server.reload(new)
    rows = g.api.faults()
    assert [(r["kind"], r["source"]) for r in rows] == [("delay", "api"), ("drop", "config")]
    assert rows[0]["id"] == runtime.id


def _config_text(pg, faults_body: str) -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
[backend]
port = {pg.port}
[faults]
{faults_body}
"""


def test_bad_fault_rule_in_config_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.loads('[faults]\nrules = ["REJECT NEXT zero"]', "pgguard.toml")
    assert info.value.key == "faults.rules"
    assert "NEXT needs a number" in info.value.problem


async def test_console_inject_show_and_clear(guard) -> None:
    g = await guard(ADMIN_TOML)
    rows = await psql_rows(g.port, "INJECT REJECT NEXT 1 ROLE app SQLSTATE 57p03")
    assert rows == [
        {"id": "1", "rule": "REJECT NEXT 1 ROLE app SQLSTATE 57P03", "state": "live", "fired": "0"}
    ]
    with pytest.raises(asyncpg.CannotConnectNowError, match="shutting down"):
        await _connect(g)
    await psql_rows(g.port, "INJECT REJECT")  # every client, yet the console stays reachable
    rows = await psql_rows(g.port, "SHOW FAULTS")
    assert [(r["id"], r["fired"], r["state"], r["source"], r["remaining"]) for r in rows] == [
        ("1", "1", "spent", "console", "0"),
        ("2", "0", "live", "console", ""),
    ]
    code, _, err = await psql(g.port, "INJECT REJECT NEXT zero")
    assert code != 0 and "NEXT needs a number" in err
    code, _, err = await psql(g.port, "CLEAR FAULT 2", "CLEAR FAULT 2")
    assert code != 0 and "no fault rule 2" in err
    assert [r["id"] for r in await psql_rows(g.port, "SHOW FAULTS")] == ["1"]
    code, out, err = await psql(g.port, "CLEAR FAULTS")
    assert code == 0, err
    assert await psql_rows(g.port, "SHOW FAULTS") == []
    conn = await _connect(g)
    await conn.close()
