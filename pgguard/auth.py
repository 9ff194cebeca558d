"""Role verifiers for reused sessions: looked up through ``[backend] monitor_dsn`` at each login.

pgguard authenticates a client of a reused (role, database) itself (pool.py), against the
verifier the server stores for the role (``pg_authid.rolpassword``), read with
``[pool] auth_query`` on one asyncpg connection of pgguard's own, straight to the server.

Theory
------
PostgreSQL reads ``pg_authid`` at every login, so a password changed with ``ALTER ROLE``, a
role made ``NOLOGIN``, a ``VALID UNTIL`` passed or a ``DROP ROLE`` takes effect at the next
login. pgguard keeps that meaning: a login is checked against a verifier read by a lookup
that *started after the login arrived* (``auth_cache_ttl`` = 0, the default; a positive value
lets a lookup that started less than that long ago answer instead, trading that much
staleness for fewer lookups). A SCRAM exchange cannot be re-checked against a verifier read
later (the client's proof is bound to the salt it was sent), so freshness has to come first.

Lookups of one role run one at a time (single flight): a login arriving while one runs waits
for the next, which starts when the running one ends and answers every login that arrived
meanwhile. So a storm of logins of a role costs one lookup at a time, about two per storm
for logins that arrive together, not one per login. After a failed login (a wrong password)
the role's next lookup starts no sooner than ``auth_retry_interval`` after the one whose
verifier the failed login used: a flood of wrong passwords costs at most
``1 / auth_retry_interval`` lookups per second per role.

``get`` answers None when pgguard cannot check the role itself (no ``monitor_dsn``; no
verifier: an unknown role, one without a password, one the lookup function hides as
``NOLOGIN`` or past ``VALID UNTIL``): the login then goes to the server as without reuse,
which answers it exactly as PostgreSQL does (pool.ClientLogin).

When the lookup itself fails (``monitor_dsn`` unreachable, the function missing, a timeout),
``get`` raises ``LookupUnavailable`` and the client logs in as without reuse too. For
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

# Role names come from clients: the per-role maps are bounded (cleared when full).
CACHE_MAX: Final = 10000
# After a failed lookup (not a failed login), no lookup is tried for this long: logins go to
# the server meanwhile instead of each waiting for a connection attempt that times out.
REFRESH_MIN: Final = 1.0

# What a lookup answers: the verifier text (None: pgguard cannot check the role) and when the
# lookup started (monotonic).
Lookup = tuple[str | None, float]


class LookupUnavailable(Exception):
    """The role's verifier could not be read (the lookup failed, or failed a moment ago)."""


class Verifiers:
    """Single-flight verifier lookups per role, and their connection."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._cache: dict[str, Lookup] = {}  # only with auth_cache_ttl > 0
        self._running: dict[str, asyncio.Future[Lookup]] = {}  # the lookup of a role in flight
        self._queued: dict[str, asyncio.Future[Lookup]] = {}  # the next one, for logins since
        self._hold: dict[str, float] = {}  # after a failed login: no lookup of the role before this
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn: Any = None  # asyncpg.Connection
        self._statement: tuple[str, Any] | None = None  # (auth_query, its PreparedStatement)
        self._lock = asyncio.Lock()
        self._failing = False
        self._retry_at = 0.0  # after a failure, no lookup is tried before this (monotonic)
        self.lookups = 0
        self.lookup_failures = 0

    def cached(self, role: str) -> tuple[bool, Lookup]:
        """(True, lookup) when ``auth_cache_ttl`` lets a recent lookup answer for ``role`` now."""
        hit = self._cache.get(role)
        ttl = self.config.pool.auth_cache_ttl
        if hit is not None and ttl > 0 and time.monotonic() - hit[1] < ttl:
            return True, hit
        return False, (None, 0.0)

    async def get(self, role: str) -> Lookup:
        """The role's stored verifier text (None: pgguard cannot check the role itself) from a
        lookup that started after this call (or within ``auth_cache_ttl``), and when it started.
        Raises LookupUnavailable when the lookup failed (or failed less than REFRESH_MIN ago)."""
        hit, lookup = self.cached(role)
        if hit:
            return lookup
        if self._failing and time.monotonic() < self._retry_at:
            raise LookupUnavailable
        running = self._running.get(role)
        if running is not None and self.config.pool.auth_cache_ttl > 0:
            return await asyncio.shield(running)
        flight = self._queued.get(role)
        if flight is None:
            if len(self._queued) >= CACHE_MAX:
                raise LookupUnavailable  # as many distinct roles waiting at once: the server decides
            flight = self._queued[role] = asyncio.get_running_loop().create_future()
            if running is None:
                self._launch(role)
        return await asyncio.shield(flight)

    def failed(self, role: str, started: float) -> None:
        """A login checked against the lookup that ``started`` then failed (a wrong password):
        the role's next lookup waits until ``auth_retry_interval`` after it."""
        if len(self._hold) >= CACHE_MAX:
            self._hold.clear()
        self._hold[role] = max(self._hold.get(role, 0.0), started + self.config.pool.auth_retry_interval)
        hit = self._cache.get(role)
        if hit is not None and hit[1] == started:
            del self._cache[role]  # the password may have changed: the next login looks again

    def _launch(self, role: str) -> None:
        future = self._queued.pop(role)
        self._running[role] = future
        task = asyncio.get_running_loop().create_task(self._fly(role, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fly(self, role: str, future: asyncio.Future[Lookup]) -> None:
        try:
            hold = self._hold.pop(role, 0.0) - time.monotonic()
            if hold > 0:
                await asyncio.sleep(hold)  # a rate bound (auth_retry_interval), not a synchronisation
            started = time.monotonic()
            if self._failing and started < self._retry_at:
                verifier, ok = None, False
            else:
                verifier, ok = await self._lookup(role)
            if not ok:
                future.set_exception(LookupUnavailable())
                future.exception()  # retrieved here: the logins sharing it get it from their await
                return
            if self.config.pool.auth_cache_ttl > 0:
                if len(self._cache) >= CACHE_MAX:
                    self._cache.clear()
                self._cache[role] = (verifier, started)
            future.set_result((verifier, started))
        except asyncio.CancelledError:
            future.cancel()
            raise
        finally:
            del self._running[role]
            if role in self._queued:
                self._launch(role)

    async def _lookup(self, role: str) -> tuple[str | None, bool]:
        """(verifier, True), or (None, False) when the lookup itself failed (logged)."""
        import asyncpg  # type: ignore[import-untyped]

        dsn = self.config.backend.monitor_dsn
        if not dsn:
            return None, True  # nothing to read verifiers with: the server checks every login
        timeout = self.config.backend.connect_timeout
        async with self._lock:
            self.lookups += 1
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        dsn, timeout=timeout, statement_cache_size=0,
                        server_settings={"application_name": "pgguard auth"},
                    )  # fmt: skip
                    self._statement = None
                query = self.config.pool.auth_query
                if self._statement is None or self._statement[0] != query:
                    # Prepared once per connection: each lookup is then one round trip
                    # (Bind/Execute), not two (Parse/Describe first), as every login has one.
                    self._statement = (query, await self._conn.prepare(query, timeout=timeout))
                value = await self._statement[1].fetchval(role, timeout=timeout)
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
        """Drop the lookup connection and every lookup in flight (pgguard stops)."""
        for task in list(self._tasks):
            task.cancel()
        for future in list(self._queued.values()):
            future.cancel()
        self._queued.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._statement = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()
