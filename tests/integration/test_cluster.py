"""The throwaway PostgreSQL cluster: lifecycle, roles with SCRAM, counting and ending sessions."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from pgguard.testing import PostgresCluster
from pgguard.testing import cluster as cluster_module
from pgguard.testing.cluster import ClusterError, free_port

PASSWORD = "s3cret with 'quote', colon: at@ slash/ and % sign"


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresCluster]:
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def no_ambient_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep libpq from finding a password in our environment or ~/.pgpass."""
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-pgpass"))


def test_psql_select_one_returns_1(pg: PostgresCluster) -> None:
    assert pg.psql("select 1") == "1"
    assert pg.psql("show max_connections") == "300"
    assert pg.psql("show fsync") == "off"


def test_psql_failure_raises_cluster_error_with_stderr(pg: PostgresCluster) -> None:
    with pytest.raises(ClusterError, match='relation "no_such_table" does not exist'):
        pg.psql("select * from no_such_table")


def test_password_role_needs_its_password_over_tcp(pg: PostgresCluster) -> None:
    pg.create_role("scram_app", password=PASSWORD)

    verifier = pg.psql("select rolpassword from pg_authid where rolname = 'scram_app'")
    assert verifier.startswith("SCRAM-SHA-256$")
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(pg.dsn(user="scram_app"), connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(user="scram_app", password="wrong"), connect_timeout=10)
    with psycopg.connect(pg.dsn(user="scram_app", password=PASSWORD), connect_timeout=10) as conn:
        row = conn.execute("select current_user").fetchone()
    assert row == ("scram_app",)
    # Other roles still get in on trust.
    pg.create_role("trusting_app")
    with psycopg.connect(pg.dsn(user="trusting_app"), connect_timeout=10) as conn:
        assert conn.execute("select current_user").fetchone() == ("trusting_app",)


def test_create_role_without_password_turns_scram_off_again(pg: PostgresCluster) -> None:
    pg.create_role("flip_app", password=PASSWORD)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(pg.dsn(user="flip_app"), connect_timeout=10)

    pg.create_role("flip_app", connection_limit=2)

    assert pg.psql("select rolconnlimit from pg_roles where rolname = 'flip_app'") == "2"
    with psycopg.connect(pg.dsn(user="flip_app"), connect_timeout=10) as conn:
        assert conn.execute("select current_user").fetchone() == ("flip_app",)


def test_create_role_quotes_odd_names(pg: PostgresCluster) -> None:
    name = 'Odd "Name"; drop'
    pg.create_role(name, login=False, connection_limit=3)
    pg.create_role(name, login=False, connection_limit=3)

    assert (
        pg.psql(
            "select rolcanlogin, rolconnlimit from pg_roles where rolname = 'Odd \"Name\"; drop'"
        )
        == "f|3"
    )


def test_connection_count_follows_an_open_connection(pg: PostgresCluster) -> None:
    pg.create_role("counted_app", password=PASSWORD)
    assert pg.connection_count(users=["counted_app"]) == 0

    conn = psycopg.connect(pg.dsn(user="counted_app", password=PASSWORD), connect_timeout=10)
    try:
        # The backend is in pg_stat_activity before it sends ReadyForQuery.
        assert pg.connection_count(users=["counted_app"]) == 1
        assert pg.connection_count(users=["counted_app"], databases=["postgres"]) == 1
        assert pg.connection_count(users=["counted_app"], databases=["template1"]) == 0
        assert pg.connection_count() >= 1
    finally:
        conn.close()

    wait_until(
        lambda: pg.connection_count(users=["counted_app"]) == 0,
        "the closed counted_app session to leave pg_stat_activity",
    )
    assert pg.connection_count(users=[]) == 0


def test_terminate_ends_the_roles_sessions(pg: PostgresCluster) -> None:
    pg.create_role("doomed_app")
    conn = psycopg.connect(pg.dsn(user="doomed_app"), connect_timeout=10)
    try:
        assert pg.terminate(users=["doomed_app"]) == 1
        wait_until(
            lambda: pg.connection_count(users=["doomed_app"]) == 0,
            "the terminated doomed_app session to exit",
        )
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()


def test_create_database_is_idempotent(pg: PostgresCluster) -> None:
    pg.create_role("db_owner")
    pg.create_database("guard db", owner="db_owner", connection_limit=5)
    pg.create_database("guard db", owner="db_owner", connection_limit=7)

    row = pg.psql(
        "select pg_get_userbyid(datdba), datconnlimit from pg_database where datname = 'guard db'"
    )
    assert row == "db_owner|7"
    assert pg.psql("select current_database()", user="db_owner", database="guard db") == (
        "guard db"
    )
    with psycopg.connect(pg.dsn(user="db_owner", database="guard db"), connect_timeout=10) as conn:
        assert conn.execute("select current_database()").fetchone() == ("guard db",)


def test_dsn_quotes_every_part(pg: PostgresCluster) -> None:
    dsn = pg.dsn(user="a b", database="d/b", password="p@ss:w/rd%")
    assert dsn == f"postgresql://a%20b:p%40ss%3Aw%2Frd%25@127.0.0.1:{pg.port}/d%2Fb"


def test_log_records_startup(pg: PostgresCluster) -> None:
    assert pg.log_path.parent == pg.data_dir
    assert "database system is ready to accept connections" in pg.read_log()


def test_constructor_settings_reach_the_server() -> None:
    settings: dict[str, str | bool] = {
        "cluster_name": "it's me",
        "work_mem": "3MB",
        "log_connections": True,
    }
    with PostgresCluster(max_connections=25, settings=settings) as pg:
        assert pg.psql("show max_connections") == "25"
        assert pg.psql("show cluster_name") == "it's me"
        assert pg.psql("show work_mem") == "3MB"
        assert pg.psql("show log_connections") == "on"


def test_stop_removes_the_directory_and_frees_the_port() -> None:
    pg = PostgresCluster()
    pg.start()
    pg.start()  # idempotent
    base, port = pg.socket_dir, pg.port
    assert (pg.data_dir / "PG_VERSION").is_file()

    pg.stop()
    pg.stop()  # idempotent

    assert not base.exists()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
    with pytest.raises(ClusterError, match="not started"):
        _ = pg.port


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_missing_bindir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="no initdb, pg_ctl and postgres in"):
        PostgresCluster(bindir=tmp_path)


def test_start_retries_when_the_picked_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        real_free_port = cluster_module.free_port
        monkeypatch.setattr(
            cluster_module,
            "free_port",
            lambda host="127.0.0.1": next(picks, None) or real_free_port(host),
        )

        with PostgresCluster() as pg:
            assert pg.port != taken
            assert pg.psql("select 1") == "1"


def test_failed_start_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(prefix: str | None = None, dir: str | None = None) -> str:
        made.append(Path(real_mkdtemp(prefix=prefix, dir=dir)))
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        pg = PostgresCluster(port=squatter.getsockname()[1])

        with pytest.raises(ClusterError, match="could not bind"):
            pg.start()

    assert not pg.running
    assert len(made) == 1
    assert not made[0].exists()
