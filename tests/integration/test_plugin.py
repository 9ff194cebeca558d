"""The pytest plugin as a user meets it: a suite of their own, run by pytester, passes and fails as it should."""

from __future__ import annotations

from importlib.metadata import entry_points

# pytester runs the user's suite in this process and afterwards drops the modules that
# suite imported; C extensions imported there and again in a later run crash (asyncpg's
# protocol segfaults). Imported here, they stay loaded across runs.
import asyncpg  # noqa: F401
import psycopg  # noqa: F401
import pytest
import uvloop  # noqa: F401

from pgguard.testing.cluster import PostgresCluster

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""

USER_SUITE = """
import asyncio

import asyncpg
import psycopg
import pytest


async def connect_with_retry(dsn, attempts=5):  # the application under test
    for _ in range(attempts):
        try:
            return await asyncpg.connect(dsn)
        except asyncpg.TooManyConnectionsError:
            await asyncio.sleep(0.01)
    raise RuntimeError("gave up")


@pytest.mark.pgguard(reject_next=2)
async def test_app_retries_on_53300(pgguard):
    conn = await connect_with_retry(pgguard.dsn)
    await conn.close()
    assert pgguard.faults()[0]["fired"] == 2


@pytest.mark.pgguard(reject_next=2)
async def test_app_without_retry_fails(pgguard):
    conn = await asyncpg.connect(pgguard.dsn)
    await conn.close()


def test_marker_rules_do_not_leak_into_the_next_test(pgguard):
    assert pgguard.faults() == []
    assert pgguard.stats()["rejections"] == {}
    with psycopg.connect(pgguard.dsn, sslmode="disable") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.pgguard(limit=1, policy="reject")
def test_limit_marker_applies_to_the_dsn_user(pgguard):
    with psycopg.connect(pgguard.dsn, sslmode="disable"):
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            psycopg.connect(pgguard.dsn, sslmode="disable")


@pytest.mark.pgguard("DELAY 0.2 NEXT 1", "REJECT NEXT 1 SQLSTATE 57P03")
async def test_text_rules_in_order(pgguard):
    conn = await asyncpg.connect(pgguard.dsn)  # the first matching rule acts: delayed
    await conn.close()
    with pytest.raises(asyncpg.CannotConnectNowError):
        await asyncpg.connect(pgguard.dsn)
"""


def test_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("pgguard") == "pgguard.testing.plugin"


def test_user_suite_passes_and_fails_as_it_should(
    pytester: pytest.Pytester, pg, monkeypatch
) -> None:
    # A DSN is given: the plugin must not start a throwaway cluster.
    monkeypatch.setattr(PostgresCluster, "start", _no_cluster)
    pytester.makeini(INI)
    pytester.makepyfile(test_pytester_user=USER_SUITE)
    result = pytester.runpytest("--pgguard-backend-dsn", pg.dsn("app"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(
        [
            '*TooManyConnectionsError: too many connections for role "app"',
            "FAILED test_pytester_user.py::test_app_without_retry_fails*",
        ]
    )


def test_backend_dsn_from_the_environment(pytester: pytest.Pytester, pg, monkeypatch) -> None:
    monkeypatch.setattr(PostgresCluster, "start", _no_cluster)
    monkeypatch.setenv("PGGUARD_BACKEND_DSN", pg.dsn("other", "limdb"))
    pytester.makeini(INI)
    pytester.makepyfile(
        test_pytester_env="""
        import psycopg

        def test_it(pgguard):
            assert pgguard.cluster is None
            with psycopg.connect(pgguard.dsn, sslmode="disable") as conn:
                row = conn.execute("SELECT current_user, current_database()").fetchone()
            assert row == ("other", "limdb")
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_loading_the_plugin_starts_nothing(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setattr(PostgresCluster, "start", _no_cluster)
    monkeypatch.delenv("PGGUARD_BACKEND_DSN", raising=False)
    pytester.makeini(INI)
    pytester.makepyfile(test_pytester_plain="def test_plain():\n    assert True\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_throwaway_cluster_when_no_dsn_is_given(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.delenv("PGGUARD_BACKEND_DSN", raising=False)
    pytester.makeini(INI)
    pytester.makepyfile(
        test_pytester_cluster="""
        import asyncpg
        import pytest

        @pytest.mark.pgguard(limit={"app": 0}, policy={"app": "reject"})
        async def test_it(pg_cluster, pgguard):
            pg_cluster.create_role("app")
            assert pgguard.cluster is pg_cluster
            with pytest.raises(asyncpg.TooManyConnectionsError):
                await asyncpg.connect(pgguard.dsn_for("app"))
            conn = await asyncpg.connect(pgguard.dsn)  # postgres: not limited
            await conn.close()
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def _no_cluster(self: PostgresCluster) -> None:
    raise AssertionError("the plugin started a throwaway cluster nobody asked for")
