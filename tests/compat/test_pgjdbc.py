"""pgjdbc (Debian ``libpostgresql-jdbc-java``) through pgguard: query, prepared statement,
transaction, 53300 and queueing. ``Compat.java`` runs as a single-file program (Java 11+), so
nothing is compiled into the tree; the test skips when java or the driver jar is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from compat_harness import GUARD_TOML, check_scenario, run_scenario

HERE = Path(__file__).parent
JARS = ("/usr/share/java/postgresql.jar", "/usr/share/java/postgresql-jdbc4.jar")


@pytest.fixture(scope="module")
def pgjdbc() -> tuple[str, str]:
    java = shutil.which("java")
    if java is None:
        pytest.skip("java is not installed")
    jar = next((j for j in JARS if Path(j).exists()), None)
    if jar is None:
        pytest.skip(f"the PostgreSQL JDBC driver is not installed ({' or '.join(JARS)})")
    print(f"pgjdbc {Path(jar).resolve().name}")
    return java, jar


async def test_pgjdbc_through_pgguard(guard, pgjdbc: tuple[str, str]) -> None:
    java, jar = pgjdbc
    g = await guard(GUARD_TOML)
    argv = [java, "-Xshare:auto", "-cp", jar, str(HERE / "Compat.java"), g.host, str(g.port)]
    check_scenario(await run_scenario(g, argv))
    await g.wait_idle()
