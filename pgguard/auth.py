"""Role verifiers for reused sessions: looked up through ``[backend] monitor_dsn``, cached briefly.

pgguard authenticates a client of a reused (role, database) itself (pool.py), against the
verifier the server stores for the role (``pg_authid.rolpassword``), read with
``[pool] auth_query`` on one asyncpg connection of pgguard's own, straight to the server.
Lookups for the same role share one query (a storm of logins costs one), each answer is
kept ``auth_cache_ttl`` seconds, and a failed login forgets it (a changed password is seen at
the next attempt). Unknown roles are cached too, as None, so a flood of made-up names costs
one query per name per TTL; the cache is cleared when it reaches ``CACHE_MAX`` names.

When the lookup itself fails (``monitor_dsn`` unreachable, the function missing, a timeout),
``get`` raises ``LookupUnavailable`` and the client logs in as without reuse: PostgreSQL
checks its password (pool.ClientLogin, proxy.ClientConnection.verifier_unavailable). For
``REFRESH_MIN`` after a failure no lookup is tried, so a storm of logins does not queue
behind connection attempts that time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

from .config import Config
from .log import log_event

__all__ = ["Verifiers", "LookupUnavailable", "CACHE_MAX"]

# Role names come from clients: the cache is bounded (cleared when full).
CACHE_MAX: Final = 10000
# A failed login forgets a verifier looked up at least this long ago: a flood of wrong
# passwords costs one lookup per second per role, not one per attempt.
REFRESH_MIN: Final = 1.0


class LookupUnavailable(Exception):
    """The role's verifier could not be read (the lookup failed, or failed a moment ago)."""


class Verifiers:
    """The verifier cache and its lookup connection."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._cache: dict[str, tuple[str | None, float, float]] = {}  # verifier, expires, fetched
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._conn: Any = None  # asyncpg.Connection
        self._lock = asyncio.Lock()
        self._failing = False
        self._retry_at = 0.0  # after a failure, no lookup is tried before this (monotonic)
        self.lookups = 0
        self.lookup_failures = 0

    def cached(self, role: str) -> tuple[bool, str | None]:
        """(True, verifier) when the cache answers for ``role`` now, else (False, None)."""
        hit = self._cache.get(role)
        if hit is not None and hit[1] > time.monotonic():
            return True, hit[0]
        return False, None

    async def get(self, role: str) -> str | None:
        """The role's stored verifier text, or None (unknown role, no password). Raises
        LookupUnavailable when the lookup failed (or failed less than REFRESH_MIN ago)."""
        hit = self._cache.get(role)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        if self._failing and time.monotonic() < self._retry_at:
            raise LookupUnavailable
        pending = self._pending.get(role)
        if pending is not None:
            return await asyncio.shield(pending)
        future = self._pending[role] = asyncio.get_running_loop().create_future()
        try:
            verifier, ok = await self._lookup(role)
        except asyncio.CancelledError:
            future.cancel()
            raise
        finally:
            self._pending.pop(role, None)
        if not ok:
            future.set_exception(LookupUnavailable())
            future.exception()  # retrieved here: the logins sharing it get it from their await
            raise LookupUnavailable
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        now = time.monotonic()
        self._cache[role] = (verifier, now + self.config.pool.auth_cache_ttl, now)
        future.set_result(verifier)
        return verifier

    def forget(self, role: str) -> None:
        """A login with a real verifier failed: the next one looks it up again (the password
        may have changed), unless it was looked up less than REFRESH_MIN ago."""
        hit = self._cache.get(role)
        if hit is not None and time.monotonic() - hit[2] >= REFRESH_MIN:
            del self._cache[role]

    async def _lookup(self, role: str) -> tuple[str | None, bool]:
        """(verifier, True), or (None, False) when the lookup itself failed (logged)."""
        import asyncpg  # type: ignore[import-untyped]

        dsn = self.config.backend.monitor_dsn
        if not dsn:
            return None, True
        timeout = self.config.backend.connect_timeout
        async with self._lock:
            self.lookups += 1
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        dsn, timeout=timeout, statement_cache_size=0,
                        server_settings={"application_name": "pgguard auth"},
                    )  # fmt: skip
                value = await self._conn.fetchval(self.config.pool.auth_query, role, timeout=timeout)
            except Exception as exc:  # a bad DSN, a missing function, a timeout: logins fail
                self.lookup_failures += 1
                self._retry_at = time.monotonic() + REFRESH_MIN
                await self._disconnect()
                if not self._failing:
                    self._failing = True
                    log_event(logging.WARNING, "auth_lookup_failed", error=str(exc) or type(exc).__name__)
                return None, False
        if self._failing:
            self._failing = False
            log_event(logging.INFO, "auth_lookup_recovered")
        return (value if isinstance(value, str) and value else None), True

    def close(self) -> None:
        """Drop the lookup connection (pgguard stops)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()
