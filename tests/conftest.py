"""Shared fixtures: one throwaway PostgreSQL for the whole run, and a fresh pgguard per test.

``pg`` is session-scoped (initdb once). ``guard`` is a factory: ``g = await guard('''[roles.app]
max_connections = 1''')`` starts a ``Server`` on the test's event loop on a free port in front of
``pg`` and returns a ``Guard`` handle; every guard is closed after the test, and the test fails if
a slot or a waiter is still held 10 s after its clients are gone.

``g.api`` is the same server seen through the handle pgguard ships for other projects' suites
(``pgguard.testing.AsyncGuard``: ``set_limit``, ``inject``, ``faults``, ``stats``...): tests
change and read pgguard through it, or through the console and ``/metrics``, rather than
through the server's internals, so the shipped API is exercised by every such test.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings

from pgguard import config as config_mod
from pgguard.server import Server
from pgguard.stats import Counts
from pgguard.testing.cluster import PostgresCluster
from pgguard.testing.guard import AsyncGuard
from pgguard.testing.wait import await_until

# Hypothesis on a busy machine (CI shares two cores with PostgreSQL and pgguard): no per-example
# deadline, no too_slow/data health checks, and a fixed derandomised seed so a run is repeatable.
# PGGUARD_HYPOTHESIS=dev turns randomness back on for local exploration.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("PGGUARD_HYPOTHESIS", "ci"))

ROLES = ("app", "app2", "other", "boss")
DATABASES = ("limdb", "otherdb")


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """Tests run pgguard on uvloop, the loop `pgguard run` uses (PGGUARD_TEST_LOOP=asyncio: asyncio's).

    The two differ where it matters here (uvloop raises on a write into a closed transport,
    asyncio only counts it), so the suite must see what production sees.
    """
    if os.environ.get("PGGUARD_TEST_LOOP") == "asyncio":
        return asyncio.DefaultEventLoopPolicy()
    import uvloop

    return uvloop.EventLoopPolicy()


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    with PostgresCluster(settings={"max_connections": 400}) as cluster:
        for role in ROLES:
            cluster.create_role(role, superuser=(role == "boss"))
        cluster.create_role("scram_user", password="s3cret pass")
        for db in DATABASES:
            cluster.create_database(db)
        cluster.execute("GRANT ALL ON SCHEMA public TO PUBLIC")
        for db in DATABASES:
            cluster.psql("GRANT ALL ON SCHEMA public TO PUBLIC", database=db)
        yield cluster


@dataclass
class Guard:
    """A pgguard running in the test's event loop in front of the ``pg`` cluster."""

    server: Server
    pg: PostgresCluster

    @property
    def api(self) -> AsyncGuard:
        """The shipped testing handle on this server (same loop, direct calls)."""
        return AsyncGuard(self.server, {"user": "app", "database": "postgres"}, self.pg)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, user: str = "app", database: str = "postgres", password: str | None = None) -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def conninfo(self, user: str = "app", database: str = "postgres", **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "user": user, "dbname": database, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def role_active(self, role: str) -> int:
        """Slots ``role`` holds now (SHOW LIMITS' view)."""
        return self._role_row(role)[0]

    def role_waiting(self, role: str) -> int:
        return self._role_row(role)[1]

    def _role_row(self, role: str) -> tuple[int, int]:
        for row in self.server.control.limit_rows():
            if row.kind == "role" and row.name == role:
                return row.active, row.waiting
        return 0, 0

    async def wait_idle(self, timeout: float = 15.0) -> None:
        """Wait until no slot is held and nobody waits (every session fully gone)."""
        control = self.server.control
        await await_until(
            lambda: _holds_nothing(control.counts()),
            timeout=timeout,
            what="pgguard to hold no slots, no waiters, no login slots",
        )


def _holds_nothing(counts: Counts) -> bool:
    return not (
        counts.sessions_active or counts.clients_waiting or counts.logins_in_flight or counts.logins_waiting
    )


def make_config(pg: PostgresCluster, toml: str = "") -> config_mod.Config:
    base = f"""
[server]
listen = "127.0.0.1:0"
client_login_timeout = 5.0
[backend]
host = "127.0.0.1"
port = {pg.port}
close_timeout = 5.0
"""
    # PGGUARD_SECTION__KEY variables apply as they do to `pgguard run` (test_relay.py sets
    # PGGUARD_SERVER__RELAY_AFTER for its native runs).
    return config_mod.loads(_merge(base, toml), "<test>", env=os.environ)


def _merge(base: str, extra: str) -> str:
    """Let a test's TOML add keys to the [server]/[backend] tables the base already opened."""
    import tomllib

    data = tomllib.loads(base)
    more = tomllib.loads(extra)
    for section, body in more.items():
        if isinstance(body, dict) and isinstance(data.get(section), dict):
            data[section].update(body)
        else:
            data[section] = body
    return _dump(data)


def _dump(data: dict[str, object], prefix: str = "") -> str:
    import json

    lines: list[str] = []
    tables: list[tuple[str, dict[str, object]]] = []
    for key, value in data.items():
        qkey = json.dumps(key) if not key.replace("_", "").isalnum() else key
        if isinstance(value, dict):
            tables.append((f"{prefix}{qkey}", value))
        else:
            lines.append(f"{qkey} = {json.dumps(value)}")
    out = "\n".join(lines) + "\n"
    for name, body in tables:
        if all(isinstance(v, dict) for v in body.values()) and body:
            out += _dump(body, f"{name}.")
        else:
            out += f"[{name}]\n" + _dump(body, f"{name}.")
    return out


GuardFactory = Callable[..., Awaitable[Guard]]


@pytest.fixture
async def guard(pg: PostgresCluster) -> AsyncIterator[GuardFactory]:
    started: list[Guard] = []

    async def start(toml: str = "") -> Guard:
        server = Server(make_config(pg, toml), loop=asyncio.get_running_loop())
        await server.start()
        g = Guard(server, pg)
        started.append(g)
        return g

    yield start
    leaks = []
    for g in started:
        # Every client of the test is gone by now (their fixtures closed first): whatever the
        # guard still holds once the server has closed those sessions is a leaked slot.
        try:
            if not g.server.draining:
                await g.wait_idle(timeout=10)
        except TimeoutError:
            control = g.server.control
            leaks.append(f"{control.counts()}, clients {list(g.server.clients.values())}")
        await g.server.close()
    if leaks:
        pytest.fail("pgguard leaked after the test: " + "; ".join(leaks))


class _LogScan(logging.Handler):
    """Collects every ERROR (or worse) and every traceback pgguard or asyncio logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture(autouse=True)
def _no_errors_logged(request: pytest.FixtureRequest) -> Iterator[_LogScan]:
    """Fail a test during which pgguard (or its event loop) logged an error or a traceback.

    A traceback in pgguard's log is a bug, whatever a peer did. A test that provokes an error
    on purpose (a bad config on reload) says which with ``@pytest.mark.log_errors("event=...")``:
    records containing one of those strings are allowed, and nothing else is.
    """
    scan = _LogScan()
    loggers = [logging.getLogger("pgguard"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(scan)
    try:
        yield scan
    finally:
        for logger in loggers:
            logger.removeHandler(scan)
    marker = request.node.get_closest_marker("log_errors")
    allowed = tuple(marker.args) if marker else ()
    unexpected = [
        r for r in scan.records if not any(a in r.getMessage() for a in allowed)
    ]
    if unexpected:
        lines = []
        for r in unexpected[:5]:
            text = f"{r.name} {r.levelname}: {r.getMessage()}"
            if r.exc_info and r.exc_info[1] is not None:
                text += f" ({type(r.exc_info[1]).__name__}: {r.exc_info[1]})"
            lines.append(text)
        pytest.fail(
            f"{len(unexpected)} unexpected error(s)/traceback(s) logged:\n" + "\n".join(lines)
        )


@pytest.fixture(autouse=True)
def _reset_server_sessions(pg: PostgresCluster) -> Iterator[None]:
    """Leave no test sessions behind on the server for the next test."""
    yield
    pg.terminate(users=list(ROLES) + ["scram_user"])
