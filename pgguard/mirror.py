"""Mirror mode: read ``rolconnlimit`` and ``datconnlimit`` from the server and enforce them at pgguard.

With ``[limits] mirror_catalog = true`` and ``[backend] monitor_dsn``, a ``CatalogMirror``
keeps one asyncpg connection to the server (straight to it, not through pgguard) and every
``mirror_interval`` seconds reads the limits set with ``ALTER ROLE ... CONNECTION LIMIT``
and ``ALTER DATABASE ... CONNECTION LIMIT``. They become the gate's catalog layer: a limit
in the pgguard config or set with the console wins over them, and they win over the
``[limits]`` defaults. SHOW LIMITS shows them with source ``catalog``.

Only limits that are set (``>= 0``) are mirrored. Superusers are skipped: PostgreSQL does
not hold them to ``rolconnlimit`` either. When the server cannot be read, the last limits
read stay in force and the next interval tries again; one log line marks the failure and
one the recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final

from .log import log_event

if TYPE_CHECKING:
    from .control import Control

__all__ = ["CatalogMirror", "CATALOG_QUERY"]

log = logging.getLogger("pgguard")

CATALOG_QUERY: Final = """
SELECT 'role' AS kind, rolname AS name, rolconnlimit AS value
  FROM pg_catalog.pg_roles WHERE rolconnlimit >= 0 AND NOT rolsuper
UNION ALL
SELECT 'database', datname, datconnlimit
  FROM pg_catalog.pg_database WHERE datconnlimit >= 0
"""


class CatalogMirror:
    """Periodic catalog reads for one server; ``start`` does the first read before returning."""

    def __init__(self, server: Control, dsn: str, interval: float) -> None:
        self.server = server
        self.dsn = dsn
        self.interval = interval
        self.roles: dict[str, int] = {}
        self.databases: dict[str, int] = {}
        self._conn: Any = None  # asyncpg.Connection
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._wake = asyncio.Event()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._disconnect()

    def refresh_soon(self) -> None:
        """Read the catalog now instead of at the end of the interval."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.refresh()

    async def refresh(self) -> bool:
        """Read the limits once and apply them; False (and the old limits kept) on failure."""
        import asyncpg  # type: ignore[import-untyped]

        stats = self.server.stats
        timeout = self.server.config.backend.connect_timeout
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self.dsn, timeout=timeout, statement_cache_size=0,
                    server_settings={"application_name": "pgguard mirror"},
                )  # fmt: skip
            rows = await self._conn.fetch(CATALOG_QUERY, timeout=timeout)
        except Exception as exc:  # the task's boundary: a bad DSN, a refused login, a timeout...
            stats.mirror_failures += 1
            await self._disconnect()
            if not self._failing:
                self._failing = True
                log_event(logging.WARNING, "mirror_failed", error=str(exc) or type(exc).__name__)
            return False
        stats.mirror_refreshes += 1
        if self._failing:
            self._failing = False
            log_event(logging.INFO, "mirror_recovered")
        roles = {r["name"]: r["value"] for r in rows if r["kind"] == "role"}
        databases = {r["name"]: r["value"] for r in rows if r["kind"] == "database"}
        if roles != self.roles or databases != self.databases:
            self.roles, self.databases = roles, databases
            self.server.apply_catalog(roles, databases)
            log_event(
                logging.INFO,
                "mirror",
                roles=",".join(f"{k}={v}" for k, v in sorted(roles.items())) or "none",
                databases=",".join(f"{k}={v}" for k, v in sorted(databases.items())) or "none",
            )
        return True

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()
