"""Replication connections are counted as PostgreSQL counts them: on no connection limit.

PostgreSQL bounds walsenders (``replication=true|on|yes|1|database`` in the startup packet) by
``max_wal_senders``, not by max_connections or a role's or database's CONNECTION LIMIT, so
``pg_basebackup -X stream`` (two walsenders) works for a role whose limit is full. pgguard
admits them without taking a slot, in configured limits and in mirror mode alike. The
throwaway cluster allows replication from loopback (pg_hba ``host replication all ... trust``)
and keeps PostgreSQL's default ``max_wal_senders = 10`` and ``wal_level = replica``.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from pgguard.testing.cluster import PostgresCluster
from pgguard.wire import StartupMessage

ROLE = "replicator"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True), ("on", True), ("yes", True), ("1", True), ("database", True),
        ("TRUE", True), ("t", True), ("y", True),
        ("false", False), ("off", False), ("no", False), ("0", False),
        ("Database", False), ("o", False), ("maybe", False), ("", False),
    ],
)  # fmt: skip
def test_replication_parameter_is_read_as_postgresql_reads_it(value: str, expected: bool) -> None:
    packet = StartupMessage(196608, {"user": "u", "replication": value}, b"")
    assert packet.is_replication is expected
    assert not StartupMessage(196608, {"user": "u"}, b"").is_replication


@pytest.fixture
def replicator(pg: PostgresCluster):  # type: ignore[no-untyped-def]
    pg.execute(
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN "
        f"CREATE ROLE {ROLE} LOGIN REPLICATION; END IF; END$$"
    )
    yield ROLE
    pg.terminate(users=[ROLE])
    pg.execute(f"ALTER ROLE {ROLE} CONNECTION LIMIT -1")


def client_tool(pg: PostgresCluster, name: str) -> str:
    """The client program of the server's own version (pg_basebackup refuses a newer server)."""
    beside = pg.bindir / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


async def run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def basebackup(pg: PostgresCluster, port: int, target: Path) -> tuple[int, str]:
    return await run(
        client_tool(pg, "pg_basebackup"), "-h", "127.0.0.1", "-p", str(port), "-U", ROLE, "-w",
        "-D", str(target), "-X", "stream", "-c", "fast", "--no-sync",
    )  # fmt: skip


async def test_pg_basebackup_through_pgguard_with_the_role_limit_full(
    guard, pg: PostgresCluster, replicator: str, tmp_path: Path
) -> None:
    g = await guard(f'[roles.{ROLE}]\nmax_connections = 1\npolicy = "reject"\n')
    held = await asyncpg.connect(g.dsn(ROLE), timeout=30)
    try:
        # The limit is full for ordinary sessions ...
        with pytest.raises(asyncpg.TooManyConnectionsError, match=f'role "{ROLE}"'):
            await asyncpg.connect(g.dsn(ROLE), timeout=30)
        # ... and a streaming base backup (two walsenders) still runs, as it would direct.
        code, out = await basebackup(pg, g.port, tmp_path / "backup")
        assert code == 0, out
        assert (tmp_path / "backup" / "PG_VERSION").read_text().strip() == str(pg.version[0])
        # A logical walsender (replication=database) takes no slot either.
        code, out = await run(
            client_tool(pg, "psql"), "-X", "-A", "-t", "-w",
            "-d", g.conninfo(ROLE, replication="database"), "-c", "IDENTIFY_SYSTEM",
        )  # fmt: skip
        assert code == 0, out
        assert g.role_active(ROLE) == 1
    finally:
        await held.close()


async def test_mirror_mode_does_not_count_walsenders_either(
    guard, pg: PostgresCluster, replicator: str, tmp_path: Path
) -> None:
    """rolconnlimit 1 on the server and in pgguard's mirror: pg_basebackup works direct and
    through pgguard while an ordinary session holds the role's one connection."""
    pg.execute(f"ALTER ROLE {ROLE} CONNECTION LIMIT 1")
    g = await guard(
        f'[backend]\nmonitor_dsn = "{pg.dsn()}"\n'
        "[limits]\nmirror_catalog = true\nmirror_interval = 0.2\npolicy = \"reject\"\n"
    )
    assert g.server.control.role_limit(ROLE) == (1, "catalog")
    held = await asyncpg.connect(g.dsn(ROLE), timeout=30)
    try:
        code, out = await basebackup(pg, pg.port, tmp_path / "direct")
        assert code == 0, out
        code, out = await basebackup(pg, g.port, tmp_path / "through")
        assert code == 0, out
        with pytest.raises(asyncpg.TooManyConnectionsError, match=f'role "{ROLE}"'):
            await asyncpg.connect(g.dsn(ROLE), timeout=30)
    finally:
        await held.close()
