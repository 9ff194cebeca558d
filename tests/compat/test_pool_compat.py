"""pgjdbc and node-postgres with warm server-session reuse on ([pool]): the same scenario as
test_pgjdbc.py / test_node_pg.py (query, named prepared statement, transaction, 53300,
queueing), with every role's sessions reused. The roles are in ``trusted_roles`` (the
suite's server trusts them): what is under test is the reset and hand-over each driver sees
(pgjdbc sends DateStyle, TimeZone, extra_float_digits and more at startup), not the login.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from compat_harness import GUARD_TOML, check_scenario, run_scenario
from test_node_pg import node_pg  # noqa: F401  (fixture)
from test_pgjdbc import pgjdbc  # noqa: F401  (fixture)

HERE = Path(__file__).parent
POOL_TOML = GUARD_TOML + '[pool]\nreuse = true\ntrusted_roles = ["other", "app", "app2"]\n'


async def _scenario(guard, argv: Callable[[Any], list[str]], env: dict[str, str] | None = None) -> None:  # type: ignore[no-untyped-def]
    g = await guard(POOL_TOML)
    check_scenario(await run_scenario(g, argv(g), env))
    pool = g.server.control.pool
    assert pool is not None
    assert sum(int(row[6]) for row in pool.rows()) >= 1  # the queued app2 client got the released session
    pool.close()  # warm sessions hold their slots: gone before the leak check
    await g.wait_idle()


async def test_pgjdbc_with_reuse(guard, pgjdbc: tuple[str, str]) -> None:  # noqa: F811
    java, jar = pgjdbc
    await _scenario(guard, lambda g: [java, "-Xshare:auto", "-cp", jar, str(HERE / "Compat.java"), g.host, str(g.port)])


async def test_node_postgres_with_reuse(guard, node_pg: tuple[str, Path]) -> None:  # noqa: F811
    node, modules = node_pg
    await _scenario(guard, lambda g: [node, str(HERE / "compat.js")], {"NODE_PATH": str(modules)})
