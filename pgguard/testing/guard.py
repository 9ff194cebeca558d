"""An in-process pgguard for test suites, with a handle to change limits, inject faults and look inside.

Two forms, one handle::

    with pgguard.testing.guard(backend_dsn="postgresql://app@127.0.0.1:5432/app") as g:
        ...                      # pgguard runs on its own (uv)loop in a background thread

    async with pgguard.testing.aguard(backend_dsn=...) as g:
        ...                      # pgguard runs on the current event loop

Either way ``g.dsn`` is the backend DSN with host and port pointing at pgguard (same user,
password, database and parameters), and ``g.dsn_for(user, database)`` builds others. Without
``backend_dsn`` (and without ``cluster``) the guard starts a throwaway PostgreSQL
(``PostgresCluster``) and stops it on exit; ``g.cluster`` is it.

Threads: the server and its gate live on the guard's loop. The background form runs every
call on that loop (``asyncio.run_coroutine_threadsafe``) and waits for the result, so the
handle may be used from any thread, including from an asyncio test whose own loop is a
different one. The in-loop form calls directly. Both are the same class of calls:
``set_limit``, ``set_database_limit``, ``set_total_limit``, ``set_policy``, ``pause``,
``resume``, ``inject``, ``clear_faults``, ``faults``, ``clients``, ``stats``, ``reset``; only
``wait_idle`` and ``settle`` differ (blocking in the sync form, awaitable in the async one).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import threading
import time
import tomllib
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from .. import config as config_mod
from ..errors import ConfigError
from ..faults import FaultRule, parse_rule, rule_from_kwargs
from ..limits import Policy
from ..server import Server, new_event_loop
from .cluster import PostgresCluster

__all__ = ["ClientInfo", "Guard", "AsyncGuard", "guard", "aguard", "GuardConfig"]

T = TypeVar("T")
GuardConfig = str | Mapping[str, Any] | None

# Bound on one call into the guard's loop from another thread; a call takes microseconds.
CALL_TIMEOUT: Final = 30.0
START_TIMEOUT: Final = 30.0
IDLE_POLL: Final = 0.01


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """One connection pgguard holds, as ``g.clients()`` reports it."""

    id: int
    role: str
    database: str
    state: str  # startup, login, admitting, queued, login_wait, dialing, authenticating, active, closed
    peer: str
    backend_pid: int | None
    connected_at: float


class _Handle:
    """What both forms share: the server, addresses and the in-loop operations."""

    def __init__(
        self, server: Server, backend: dict[str, str], cluster: PostgresCluster | None
    ) -> None:
        self.server = server
        self.cluster = cluster
        self._backend = backend  # parsed backend DSN: user, password, database, params

    # Subclasses run ``fn`` on the server's loop and return its result.
    def _call(self, fn: Callable[[], T]) -> T:
        raise NotImplementedError

    # ------------------------------------------------------------- addresses

    @property
    def host(self) -> str:
        return self.server.addresses[0][0]

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def dsn(self) -> str:
        """The backend DSN's user, password, database and parameters, at pgguard's address."""
        b = self._backend
        return self.dsn_for(b.get("user"), b.get("database"), b.get("password"))

    def dsn_for(
        self, user: str | None = None, database: str | None = None, password: str | None = None
    ) -> str:
        """A ``postgresql://`` URL to pgguard for ``user`` on ``database`` (defaults: the backend DSN's)."""
        user = user if user is not None else self._backend.get("user")
        database = database if database is not None else self._backend.get("database")
        auth = ""
        if user:
            auth = urllib.parse.quote(user, safe="")
            if password is not None:
                auth += ":" + urllib.parse.quote(password, safe="")
            auth += "@"
        path = "/" + urllib.parse.quote(database, safe="") if database else ""
        query = self._backend.get("query", "")
        return f"postgresql://{auth}{self.host}:{self.port}{path}" + (f"?{query}" if query else "")

    # ---------------------------------------------------------------- limits

    def set_limit(self, role: str, value: int) -> None:
        """Set role ``role``'s max_connections at run time (-1 unlimited, 0 nobody)."""
        c = self.server.control
        self._call(lambda: c.set_limit("role", role, value))

    def set_database_limit(self, database: str, value: int) -> None:
        c = self.server.control
        self._call(lambda: c.set_limit("database", database, value))

    def set_total_limit(self, value: int) -> None:
        c = self.server.control
        self._call(lambda: c.set_limit("total", "", value))

    def set_policy(self, role: str, policy: str) -> None:
        """``queue`` or ``reject`` for ``role`` over its limit."""
        p = Policy(policy)
        c = self.server.control
        self._call(lambda: c.set_policy(role, p))

    def pause(self) -> None:
        """Admit nobody new (they queue) until ``resume``."""
        self._call(self.server.control.pause)

    def resume(self) -> None:
        self._call(self.server.control.resume)

    # ---------------------------------------------------------------- faults

    def inject(self, rule: str | None = None, **kwargs: Any) -> FaultRule:
        """Add a fault rule: text (``"REJECT NEXT 3 ROLE app"``) or keywords (``reject_next=3``).

        Keywords: ``reject_next``, ``reject_fraction``, ``delay`` (seconds or ``(a, b)``),
        ``drop_next``, ``drop_fraction``, ``terminate=True`` (with ``after``), and the
        filters and details ``role``, ``database``, ``sqlstate``, ``message``, ``count``,
        ``fraction``, ``seed``. Returns the live rule (its ``fired`` counts firings).
        Raises ``FaultSpecError`` for a bad rule.
        """
        if rule is not None and kwargs:
            raise TypeError("inject() takes rule text or keywords, not both")
        spec = parse_rule(rule) if rule is not None else rule_from_kwargs(**kwargs)
        c = self.server.control
        return self._call(lambda: c.inject(spec, source="api"))

    def clear_faults(self) -> int:
        """Remove every fault rule (a pending TERMINATE never fires); returns how many."""
        return self._call(self.server.control.clear_faults)

    def faults(self) -> list[dict[str, Any]]:
        """The fault rules, as SHOW FAULTS lists them (``source``: config, runtime or api)."""
        keys = ("id", "kind", "role", "database", "remaining", "fired", "state", "source", "rule")
        rows = self._call(self.server.control.fault_rows)
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # ------------------------------------------------------------- observing

    def clients(self, role: str | None = None) -> list[ClientInfo]:
        """Connections pgguard holds now (of ``role`` if given), oldest first."""

        def snapshot() -> list[ClientInfo]:
            return [
                ClientInfo(
                    c.id, c.role, c.database, c.state.value, c.peer, c.backend_pid, c.connected_at
                )
                for c in self.server.clients.values()
                if role is None or c.role == role
            ]

        return self._call(snapshot)

    def stats(self) -> dict[str, Any]:
        """Counters since start plus the gate's current counts.

        Keys: ``active``, ``waiting``, ``role_active``, ``role_waiting`` (dicts by role),
        ``admissions``, ``queued``, ``rejections`` (by reason: limit, max_queue,
        queue_timeout, fault), ``queue_timeouts``, ``dial_failures``, ``backend_errors``,
        ``faults`` (firings by kind), ``wait_p50``, ``wait_p99``, ``wait_max`` (seconds),
        ``logins_in_flight``, ``logins_waiting`` (now), ``login_waits``, ``login_timeouts``
        (``[backend] max_logins_in_flight``).
        """

        def snapshot() -> dict[str, Any]:
            control = self.server.control
            s, counts = control.stats, control.counts()
            roles = [r for r in control.limit_rows() if r.kind == "role"]
            return {
                "active": counts.sessions_active,
                "waiting": counts.clients_waiting,
                "role_active": {r.name: r.active for r in roles if r.active},
                "role_waiting": {r.name: r.waiting for r in roles if r.waiting},
                "admissions": s.admissions,
                "queued": s.queued,
                "rejections": dict(s.rejections),
                "queue_timeouts": s.queue_timeouts,
                "dial_failures": s.dial_failures,
                "backend_errors": s.backend_errors,
                "faults": dict(control.faults.totals),
                "wait_p50": s.wait_percentile(50),
                "wait_p99": s.wait_percentile(99),
                "wait_max": s.wait_percentile(100),
                "logins_in_flight": counts.logins_in_flight,
                "logins_waiting": counts.logins_waiting,
                "login_waits": s.login_waits,
                "login_timeouts": s.login_timeouts,
            }

        return self._call(snapshot)

    def _idle(self) -> bool:
        return self.server.control.idle()

    def _settled(self) -> bool:
        # Every slot belongs to a connected client: none is still held for a session whose
        # client has left while its backend closes (that takes milliseconds). A client whose
        # socket the kernel already shows hung up counts as gone even before pgguard's relay
        # has told the loop, so a test that closed its connections can rely on their slots.
        control = self.server.control
        held = sum(
            1 for c in control.clients.values() if c.ticket is not None and not _hung_up(c)
        )
        return control.counts().sessions_active <= held

    def reset(self) -> None:
        """Back to the configuration: run-time limits and policies dropped, faults cleared,
        resumed, and the counters of ``stats()`` zeroed. Live sessions are left alone."""
        self._call(self.server.control.reset)


class Guard(_Handle):
    """A pgguard on a background thread's event loop; every call is safe from any thread."""

    def __init__(
        self,
        server: Server,
        backend: dict[str, str],
        cluster: PostgresCluster | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(server, backend, cluster)
        self.loop = loop

    def _call(self, fn: Callable[[], T]) -> T:
        if _running_loop() is self.loop:
            return fn()

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(CALL_TIMEOUT)

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Block until pgguard holds no connection, no slot and no waiter; TimeoutError names it."""
        self._wait(self._idle, timeout, "pgguard to hold no connections")

    def settle(self, timeout: float = 15.0) -> None:
        """Block until no slot is held for a client that already left (its backend closing)."""
        self._wait(self._settled, timeout, "the slots of departed clients to be released")

    def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self._call(check):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what} ({self.stats()})"
                )
            time.sleep(IDLE_POLL)


class AsyncGuard(_Handle):
    """A pgguard on the current event loop; use it from that loop only."""

    def _call(self, fn: Callable[[], T]) -> T:
        return fn()

    async def wait_idle(self, timeout: float = 15.0) -> None:
        """Wait until pgguard holds no connection, no slot and no waiter; TimeoutError names it."""
        await self._wait(self._idle, timeout, "pgguard to hold no connections")

    async def settle(self, timeout: float = 15.0) -> None:
        """Wait until no slot is held for a client that already left (its backend closing)."""
        await self._wait(self._settled, timeout, "the slots of departed clients to be released")

    async def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what} ({self.stats()})"
                )
            await asyncio.sleep(IDLE_POLL)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@contextlib.contextmanager
def guard(
    backend_dsn: str | None = None,
    *,
    config: GuardConfig = None,
    cluster: PostgresCluster | None = None,
) -> Iterator[Guard]:
    """Run pgguard in front of ``backend_dsn`` (or ``cluster``, or a new throwaway cluster).

    ``config`` is TOML text or a dict of the same shape (``{"roles": {"app":
    {"max_connections": 1}}}``); ``[server] listen`` defaults to a free loopback port and
    ``[backend]`` to the DSN's host and port. Raises ``ConfigError`` for a bad config and
    ``ClusterError`` if a throwaway cluster cannot start.
    """
    with _backend(backend_dsn, cluster) as (backend, owned):
        cfg = _config(backend, config)
        loop = new_event_loop()
        ready = threading.Event()
        box: dict[str, Any] = {}

        def main() -> None:
            asyncio.set_event_loop(loop)

            async def start() -> None:
                server = Server(cfg, loop=loop)
                await server.start()
                box["server"] = server

            try:
                loop.run_until_complete(start())
            except BaseException as exc:  # reported to the caller's thread below
                box["error"] = exc
                ready.set()
                return
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=main, name="pgguard-testing", daemon=True)
        thread.start()
        try:
            if not ready.wait(START_TIMEOUT):
                raise TimeoutError(f"pgguard did not start within {START_TIMEOUT}s")
            if "error" in box:
                raise box["error"]
            server: Server = box["server"]
            g = Guard(server, backend, owned, loop)
            try:
                yield g
            finally:
                asyncio.run_coroutine_threadsafe(server.close(), loop).result(CALL_TIMEOUT)
        finally:
            if loop.is_running():
                loop.call_soon_threadsafe(loop.stop)
            thread.join(CALL_TIMEOUT)
            if not thread.is_alive():
                loop.close()


@contextlib.asynccontextmanager
async def aguard(
    backend_dsn: str | None = None,
    *,
    config: GuardConfig = None,
    cluster: PostgresCluster | None = None,
) -> AsyncIterator[AsyncGuard]:
    """``guard`` on the current event loop: ``async with aguard(dsn) as g``. Same arguments."""
    with _backend(backend_dsn, cluster) as (backend, owned):
        server = Server(_config(backend, config), loop=asyncio.get_running_loop())
        await server.start()
        try:
            yield AsyncGuard(server, backend, owned)
        finally:
            await server.close()


@contextlib.contextmanager
def _backend(
    backend_dsn: str | None, cluster: PostgresCluster | None
) -> Iterator[tuple[dict[str, str], PostgresCluster | None]]:
    """The parsed backend DSN, and the cluster (started here and stopped after, if we own it)."""
    if backend_dsn is not None and cluster is not None:
        raise TypeError("give backend_dsn or cluster, not both")
    if backend_dsn is not None:
        yield parse_dsn(backend_dsn), None
        return
    if cluster is not None:
        yield parse_dsn(cluster.dsn()), cluster
        return
    with PostgresCluster() as owned:
        yield parse_dsn(owned.dsn()), owned


def parse_dsn(dsn: str) -> dict[str, str]:
    """``postgresql://user:pw@host:port/db?k=v`` or ``host=.. port=.. user=..`` -> parts.

    Keys: host, port, user, password, database, query (the URL's query string, kept as is).
    """
    out: dict[str, str] = {}
    if "://" in dsn:
        url = urllib.parse.urlsplit(dsn)
        if url.hostname:
            out["host"] = url.hostname
        if url.port:
            out["port"] = str(url.port)
        if url.username:
            out["user"] = urllib.parse.unquote(url.username)
        if url.password is not None:
            out["password"] = urllib.parse.unquote(url.password)
        if url.path.strip("/"):
            out["database"] = urllib.parse.unquote(url.path.lstrip("/"))
        if url.query:
            out["query"] = url.query
        return out
    import shlex

    for item in shlex.split(dsn):
        key, _, value = item.partition("=")
        key = {"dbname": "database"}.get(key, key)
        if key in ("host", "port", "user", "password", "database"):
            out[key] = value
    return out


def _config(backend: Mapping[str, str], config: GuardConfig) -> config_mod.Config:
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0"},
        "backend": {
            "host": backend.get("host", "127.0.0.1"),
            "port": int(backend.get("port", 5432)),
        },
    }
    if isinstance(config, str):
        try:
            extra: Mapping[str, Any] = tomllib.loads(config)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("<guard config>", "", f"invalid TOML: {exc}") from None
    else:
        extra = _plain(config or {})
    for section, body in extra.items():
        if isinstance(body, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **body}
        else:
            data[section] = body
    # The same validation as a file gets (config.loads parses TOML, then builds from this shape).
    return config_mod.from_dict(data, "<guard config>")


def _plain(value: Any) -> Any:
    """Mappings to dicts, all the way down (the validator wants TOML's own shapes)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def _hung_up(client: Any) -> bool:
    """True when the client's socket has seen its peer's FIN or reset (poll, no read)."""
    transport = client.transport
    if transport is None:
        return True
    fd = transport.get_extra_info("fileno")
    if fd is None:
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else None
    if fd is None or fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True
