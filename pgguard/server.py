"""Listeners and lifecycle: start, admit and release through the gate, reload, drain, stop, signals.

One ``Server`` owns the configuration, the ``limits.Gate``, the listening sockets and the
set of live ``ClientConnection`` objects. It turns the gate's decisions into actions:
a ticket starts a backend dial, a waiter waits (one timer serves every queue deadline),
a rejection becomes PostgreSQL's ErrorResponse. Signals: SIGHUP reloads, SIGTERM/SIGINT
drain (a second one stops at once).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import hmac
import logging
import resource
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from . import config as config_mod
from . import tls, wire
from .admin import ADMIN_DATABASE, AdminSession, check_admin_config
from .config import Config
from .errors import (
    AdminShutdown,
    ConfigError,
    IdleInTransactionTimeout,
    IdleSessionTimeout,
    PgGuardError,
    ShuttingDown,
    TooManyConnections,
)
from .faults import Faults
from .limits import Gate, Kind, Rejection, Ticket, Waiter
from .log import RateLimitedLog, log, log_event
from .proxy import ClientConnection, State

__all__ = ["Server", "Stats", "run", "new_event_loop", "log_event"]

# Admission waits kept for percentiles (a sliding window, newest kept).
WAIT_SAMPLES: Final = 10000
# Upper bounds (seconds) of the pgguard_queue_wait_seconds histogram buckets: from "admitted
# at once" to the default queue_timeout and beyond.
WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The idle sweep runs every quarter of the shortest idle_timeout, within these bounds, so a
# session is closed at most that much past its timeout, at the cost of one pass per sweep.
IDLE_SWEEP_MIN: Final = 0.05
IDLE_SWEEP_MAX: Final = 5.0
IDLE: Final = ord("I")  # ReadyForQuery status: idle, not in a transaction
# Under a flood of rejections a log line per client costs more than the rejection itself
# (a third of its CPU, measured) and floods the log: the first rejection per (role,
# database, reason) in each window is logged in full, the rest are counted and logged as
# one `reject_summary` line when the window ends.
REJECT_LOG_WINDOW: Final = 1.0
# The fields that name a rate-limited log's key, per event (see _log_limited).
_LOG_KEYS: Final = {"reject": ("role", "database", "reason"), "refuse": ("reason",)}
# File descriptors kept for what is not a client or its server socket (listeners, metrics,
# console, catalog mirror, forwarded cancels, log files) when max_client_connections is
# derived from the open-file limit.
FD_RESERVE: Final = 64
# CancelRequests matching no session of this process that may be in flight to the server at
# once (see forward_cancel); a flood of forged ones is dropped instead of passed on.
MAX_UNMATCHED_CANCELS: Final = 16
# PostgreSQL's words when it has no room for another connection at all (proc.c, InitProcess).
TOO_MANY_CLIENTS: Final = "sorry, too many clients already"


def client_cap(configured: int) -> int:
    """``[server] max_client_connections``, or (0) what the open-file limit leaves room for.

    Each client may need two descriptors (its own socket and its server's), so the derived
    cap is half of what remains of ``RLIMIT_NOFILE`` after ``FD_RESERVE``.
    """
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, (soft - FD_RESERVE) // 2)


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (as servers do); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def unix_socket_path(directory: str, port: int) -> str:
    """The server's Unix-domain socket in ``directory``: ``.s.PGSQL.<port>``, as libpq names it."""
    return f"{directory.rstrip('/') or '/'}/.s.PGSQL.{port}"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is importable, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@dataclass
class Stats:
    """Counters since start, for SHOW STATS, metrics and the testing API."""

    admissions: int = 0
    queued: int = 0
    rejections: Counter[str] = field(default_factory=Counter)  # by reason
    queue_timeouts: int = 0
    dial_failures: int = 0
    backend_errors: int = 0
    cancels_forwarded: int = 0
    cancels_dropped: int = 0  # unmatched CancelRequests past MAX_UNMATCHED_CANCELS in flight
    bytes_in: int = 0
    bytes_out: int = 0
    idle_timeouts: int = 0
    kills: int = 0
    reloads: int = 0
    reload_failures: int = 0
    mirror_refreshes: int = 0
    mirror_failures: int = 0
    fd_exhausted: int = 0  # accepts or dials that failed with EMFILE/ENFILE
    # Cumulative wait histogram for metrics: counts per WAIT_BUCKETS bound, the last for +Inf.
    wait_bounds: tuple[float, ...] = WAIT_BUCKETS
    wait_counts: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))
    wait_sum: float = 0.0
    # The newest admission waits, in seconds; O(1) to record, sorted only when asked.
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))

    def record_wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.wait_counts[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.wait_sum += seconds

    def wait_percentile(self, p: float) -> float:
        """The p-th percentile (0-100) of the recorded waits; 0.0 when none."""
        if not self.waits:
            return 0.0
        ordered = sorted(self.waits)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Server:
    """A running pgguard: listeners, gate, clients."""

    def __init__(self, config: Config, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_running_loop()
        self.gate = Gate(config.rules())
        # Client-side TLS context (None: clients get "N") and how to reach the server; built
        # from the files now and again on every reload, so a renewed certificate is picked up.
        self.client_tls, self.backend_tls = tls.load(config)
        self.stats = Stats()
        self.faults = Faults(self, config.faults)
        self.clients: dict[int, ClientConnection] = {}
        self.max_clients = client_cap(config.server.max_client_connections)
        # Server process id -> the session it serves, to tell known CancelRequests from others.
        self.backend_keys: dict[int, ClientConnection] = {}
        self._unmatched_cancels = 0
        self.addresses: list[tuple[str, int]] = []
        self.draining = False
        self.started_at = time.time()
        self._listeners: list[asyncio.base_events.Server] = []
        self._queue_timer: asyncio.TimerHandle | None = None
        self._queue_deadline: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()
        # Control plane: admin console sessions, metrics endpoint, catalog mirror, idle sweep.
        self.admin_sessions: dict[int, AdminSession] = {}
        self.reload_error: str | None = None
        self.metrics: Any = None  # metrics.MetricsServer, imported only when configured
        self.mirror: Any = None  # mirror.CatalogMirror, likewise
        self._idle_sweep: asyncio.TimerHandle | None = None
        # Floods are logged as one line per key per window plus a summary (see _log_limited):
        # rejections by (role, database, reason), refused sockets and fd exhaustion by reason.
        self._reject_log = RateLimitedLog("reject", REJECT_LOG_WINDOW, overflow=("", "", "other"))
        self._refuse_log = RateLimitedLog("refuse", REJECT_LOG_WINDOW, overflow=("other",))
        self._log_windows: dict[RateLimitedLog, asyncio.TimerHandle] = {}

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind every ``[server] listen`` address; port 0 picks a free one (see ``addresses``)."""
        self.loop.set_exception_handler(self._loop_exception)
        for item in self.config.server.listen:
            host, port = config_mod.parse_address(item)
            listener = await self.loop.create_server(
                lambda: ClientConnection(self), host, port, reuse_address=True, backlog=4096
            )
            self._listeners.append(listener)
            for sock in listener.sockets:
                addr = sock.getsockname()
                self.addresses.append((addr[0], addr[1]))
        log_event(
            logging.INFO,
            "start",
            listen=",".join(f"{h}:{p}" for h, p in self.addresses),
            backend=f"{self.config.backend.host}:{self.config.backend.port}",
            max_client_connections=self.max_clients,
        )
        await self._start_control()

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def reload(self, new: Config | None = None) -> bool:
        """Re-read the config file (or apply ``new``); a bad file keeps the old config."""
        if new is None:
            try:
                new = config_mod.load(self.config.path)
            except ConfigError as exc:
                log_event(logging.ERROR, "reload_failed", file=exc.file, key=exc.key, error=exc.problem)
                self.stats.reload_failures += 1
                self.reload_error = exc.message
                return False
        changed = [
            name
            for name in ("server", "backend", "limits", "roles", "databases", "faults", "tls")
            if getattr(new, name) != getattr(self.config, name)
        ]
        try:
            client_tls, backend_tls = tls.load(new)
        except ConfigError as exc:  # an unreadable certificate keeps the old one in force
            log_event(logging.ERROR, "reload_failed", file=exc.file, key=exc.key, error=exc.problem)
            self.stats.reload_failures += 1
            self.reload_error = exc.message
            return False
        self.client_tls, self.backend_tls = client_tls, backend_tls
        old, self.config = self.config, new
        self.max_clients = client_cap(new.server.max_client_connections)
        self.faults.configure(new.faults)
        self.admit_waiters(self.gate.reconfigure(new.rules()))
        log_event(logging.INFO, "reload", file=new.path, changed=",".join(changed) or "nothing")
        self.stats.reloads += 1
        self.reload_error = None
        self._control_reloaded(old)
        return True

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, answer waiters 57P03, let sessions finish, then close them.

        Returns True when every session ended by itself within ``timeout``
        (default ``[server] shutdown_timeout``).
        """
        if timeout is None:
            timeout = self.config.server.shutdown_timeout
        self.draining = True
        log_event(logging.INFO, "drain", sessions=self.gate.total_active, queued=self.gate.total_waiting)
        for listener in self._listeners:
            listener.close()
        for waiter in self.gate.clear_queues():
            client = waiter.context
            assert isinstance(client, ClientConnection)
            client.waiter = None
            self.stats.rejections["shutdown"] += 1
            client.reject(ShuttingDown())
        for client in list(self.clients.values()):
            if client.state is State.STARTUP:
                client.fail(ShuttingDown())
        clean = True
        try:
            async with asyncio.timeout(timeout):
                await self._wait_idle()
        except TimeoutError:
            clean = False
            log_event(logging.WARNING, "drain_timeout", sessions=len(self.clients))
            for client in list(self.clients.values()):
                client.terminate(AdminShutdown())  # PostgreSQL's fast-shutdown FATAL 57P01
        await self.close()
        return clean

    async def _wait_idle(self) -> None:
        while self.clients or self.gate.total_active:
            self._idle.clear()
            await self._idle.wait()

    async def close(self) -> None:
        """Stop at once: close listeners, every client and backend; cancel dials."""
        self.draining = True
        for listener in self._listeners:
            listener.close()
        for client in list(self.clients.values()):
            if client.transport is not None:
                client.transport.abort()
            if client.backend is not None:
                client.backend.abort()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:  # close() itself may run as one (a second signal)
                task.cancel()
        await self._stop_control()
        if self.loop.get_exception_handler() == self._loop_exception:
            self.loop.set_exception_handler(None)
        if self._queue_timer is not None:
            self._queue_timer.cancel()
        for limiter, timer in list(self._log_windows.items()):
            timer.cancel()
            self._end_log_window(limiter)
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await listener.wait_closed()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --------------------------------------------------------------- clients

    def client_opened(self, client: ClientConnection) -> bool:
        """Count a new client socket; False (and 53300 sent) past ``max_client_connections``."""
        if len(self.clients) + len(self.admin_sessions) >= self.max_clients:
            self.refuse(client, "max_client_connections", limit=self.max_clients)
            return False
        self.clients[client.id] = client
        self._idle.clear()
        return True

    def refuse(self, client: ClientConnection, reason: str, **fields: object) -> None:
        """Turn away a socket before its startup packet: PostgreSQL's "too many clients"."""
        self.stats.rejections[reason] += 1
        self._log_limited(self._refuse_log, (reason,), reason=reason, client=client.peer, **fields)
        client.refuse(TooManyConnections(TOO_MANY_CLIENTS))

    def fd_exhausted(self, where: str, exc: OSError) -> None:
        """The process ran out of file descriptors (EMFILE/ENFILE): count it, log it (limited)."""
        self.stats.fd_exhausted += 1
        self._log_limited(
            self._refuse_log, (where,), reason=where, error=exc.strerror or str(exc)
        )

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Loop-level errors: fd exhaustion on accept is counted and logged without a traceback."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.fd_exhausted("accept", exc)
            return
        loop.default_exception_handler(context)

    def client_closed(self, client: ClientConnection) -> None:
        if client.backend_pid is not None and self.backend_keys.get(client.backend_pid) is client:
            del self.backend_keys[client.backend_pid]
        self.stats.bytes_in += client.bytes_in
        self.stats.bytes_out += client.bytes_out
        self.clients.pop(client.id, None)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.clients and not self.gate.total_active:
            self._idle.set()

    # -------------------------------------------------------------- admission

    def admit(self, client: ClientConnection) -> None:
        """Route a client that sent its StartupMessage: a fault rule, else admit, queue or reject it."""
        if self.faults.active and not self.draining and self.faults.intercept(client):
            return  # rejected, dropped or delayed by a fault rule (a delayed one comes back below)
        self.admit_now(client)

    def admit_now(self, client: ClientConnection) -> None:
        """Admit, queue or reject ``client`` through the gate."""
        if self.draining:
            client.reject(ShuttingDown())
            return
        now = self.loop.time()
        replication = client.startup is not None and client.startup.is_replication
        decision = self.gate.arrive(
            client.role, client.database, now, client, replication=replication
        )
        if decision.kind is Kind.ADMIT:
            assert decision.ticket is not None
            self.stats.admissions += 1
            self.stats.record_wait(0.0)
            client.admitted(decision.ticket)
        elif decision.kind is Kind.QUEUE:
            assert decision.waiter is not None
            self.stats.queued += 1
            client.queued(decision.waiter)
            self._schedule_queue_timer(decision.waiter.deadline)
        else:
            assert decision.rejection is not None
            self._reject(client, decision.rejection)

    def _reject(self, client: ClientConnection, rejection: Rejection) -> None:
        self.stats.rejections[rejection.cause] += 1
        if rejection.cause == "queue_timeout":
            self.stats.queue_timeouts += 1
        if log.isEnabledFor(logging.INFO):
            self._log_limited(
                self._reject_log,
                (client.role, client.database, rejection.cause),
                role=client.role,
                database=client.database,
                limit=rejection.limit.value,
                value=rejection.value,
                reason=rejection.cause,
                client=client.peer,
            )
        client.reject(rejection.error(with_detail=self.config.errors.detail))

    def _log_limited(self, limiter: RateLimitedLog, key: tuple[object, ...], **fields: object) -> None:
        """Log ``fields`` unless ``key`` was logged in this window (then it is only counted)."""
        if limiter.event_now(key):
            log_event(logging.INFO, limiter.event, **fields)
            if limiter not in self._log_windows:
                self._log_windows[limiter] = self.loop.call_later(
                    limiter.window, self._end_log_window, limiter
                )

    def _end_log_window(self, limiter: RateLimitedLog) -> None:
        """Log how many events per key went unlogged in the window that just ended."""
        self._log_windows.pop(limiter, None)
        limiter.flush(_LOG_KEYS[limiter.event])

    def release(self, ticket: Ticket) -> None:
        """A session's backend is gone: free its slots and admit whoever now fits."""
        self.admit_waiters(self.gate.release(ticket))
        self._check_idle()

    def admit_waiters(self, waiters: list[Waiter]) -> None:
        """Start the sessions of waiters the gate just admitted (every Gate call that can
        admit returns them: release, set_*_limit, set_role_policy, resume, reconfigure)."""
        now = self.loop.time()
        for waiter in waiters:
            client = waiter.context
            assert isinstance(client, ClientConnection) and waiter.ticket is not None
            self.stats.admissions += 1
            self.stats.record_wait(now - waiter.arrived)
            client.admitted(waiter.ticket)

    def _schedule_queue_timer(self, deadline: float) -> None:
        if self._queue_deadline is not None and self._queue_deadline <= deadline:
            return
        if self._queue_timer is not None:
            self._queue_timer.cancel()
        self._queue_deadline = deadline
        self._queue_timer = self.loop.call_at(deadline, self._expire_waiters)

    def _expire_waiters(self) -> None:
        self._queue_timer = None
        self._queue_deadline = None
        for waiter, rejection in self.gate.expire(self.loop.time()):
            client = waiter.context
            assert isinstance(client, ClientConnection)
            client.waiter = None
            self._reject(client, rejection)
        deadline = self.gate.next_deadline()
        if deadline is not None:
            self._schedule_queue_timer(deadline)

    # --------------------------------------------------------------- backend

    async def open_backend(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """Connect to ``[backend]``, with TLS as ``sslmode`` says, and attach ``factory()``.

        With an sslmode that tries TLS, sends pgguard's own SSLRequest and reads the one-byte
        answer: ``S`` starts TLS (verifying as the mode says), ``N`` continues in clear for
        ``prefer``. Raises OSError (ssl.SSLError included) or BackendUnavailable.
        """
        cfg = self.config.backend
        backend_tls = self.backend_tls
        if cfg.host.startswith("/"):
            # A socket directory, as in libpq: the server's Unix-domain socket. No TLS there
            # (PostgreSQL offers none on it); each message costs the kernel less than over
            # loopback TCP (measured: pgguard's CPU per pgbench -S transaction -18%).
            path = unix_socket_path(cfg.host, cfg.port)
            transport, proto = await self.loop.create_unix_connection(factory, path)
            return transport, proto
        if backend_tls.context is None:
            transport, proto = await self.loop.create_connection(factory, cfg.host, cfg.port)
            return transport, proto
        raw, answer = await self.loop.create_connection(_SSLAnswer, cfg.host, cfg.port)
        assert isinstance(answer, _SSLAnswer)
        try:
            raw.write(tls.SSL_REQUEST)
            upgraded: asyncio.Transport | None = raw  # prefer, and the server said N: clear
            if tls.read_ssl_response(await answer.byte, backend_tls.sslmode):
                upgraded = await self.loop.start_tls(
                    raw,
                    answer,
                    backend_tls.context,
                    server_hostname=backend_tls.server_hostname,
                    ssl_handshake_timeout=cfg.connect_timeout,
                )
            if upgraded is None or upgraded.is_closing():
                raise ConnectionResetError("server closed the connection during SSL negotiation")
        except BaseException:
            raw.abort()
            raise
        proto = factory()
        upgraded.set_protocol(proto)
        proto.connection_made(upgraded)
        return upgraded, proto

    def dial_failed(self, client: ClientConnection, reason: str) -> None:
        self.stats.dial_failures += 1
        log_event(
            logging.WARNING,
            "dial_failure",
            backend=f"{self.config.backend.host}:{self.config.backend.port}",
            reason=reason,
            role=client.role,
            client=client.peer,
        )

    def backend_closed_early(self, client: ClientConnection) -> None:
        """The server closed a session before it started, without an ErrorResponse."""
        self.stats.backend_errors += 1
        log_event(
            logging.WARNING,
            "backend_closed",
            role=client.role,
            database=client.database,
            client=client.peer,
            reason="server closed the connection before the session started",
        )

    def backend_error(self, client: ClientConnection, fields: dict[str, str]) -> None:
        """An ErrorResponse during the backend's startup (a wrong password, a missing db)."""
        self.stats.backend_errors += 1
        log_event(
            logging.INFO,
            "backend_error",
            role=client.role,
            database=client.database,
            sqlstate=fields.get("C", ""),
            message=fields.get("M", ""),
        )

    def session_started(self, client: ClientConnection) -> None:
        """The backend sent its first ReadyForQuery: the session is live."""
        client.last_active = time.monotonic()  # idle time counts from here, not from arrival
        client.idle_status = IDLE  # the first ReadyForQuery is always 'I'

    def session_key(self, client: ClientConnection) -> None:
        """The server sent ``client`` its BackendKeyData: cancels naming it are known ones."""
        if client.backend_pid is not None:
            self.backend_keys[client.backend_pid] = client

    def forward_cancel(self, packet: wire.CancelRequest) -> None:
        """Send a CancelRequest to the server at once; it is never counted or queued.

        A cancel whose key matches a session pgguard relays always goes through. Others (a
        session of another pgguard process behind the same port, or a forged key) go through
        at most MAX_UNMATCHED_CANCELS at a time: each costs the server a connection, so a
        flood of them is dropped here (counted, logged once a second), not passed on.
        """
        client = self.backend_keys.get(packet.pid)
        matched = client is not None and hmac.compare_digest(client.backend_key, packet.key)
        if not matched:
            if self._unmatched_cancels >= MAX_UNMATCHED_CANCELS:
                self.stats.cancels_dropped += 1
                self._log_limited(self._refuse_log, ("cancel_flood",), reason="cancel_flood")
                return
            self._unmatched_cancels += 1
        self.stats.cancels_forwarded += 1
        self._spawn(self._send_cancel(packet.raw, matched))

    async def _send_cancel(self, raw: bytes, matched: bool) -> None:
        cfg = self.config.backend
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                if cfg.host.startswith("/"):
                    path = unix_socket_path(cfg.host, cfg.port)
                    reader, writer = await asyncio.open_unix_connection(path)
                else:
                    reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
                writer.write(raw)
                await writer.drain()
                # The server closes after reading it; wait for that so the cancel is delivered.
                await reader.read(1)
        except (OSError, TimeoutError) as exc:
            log_event(logging.WARNING, "cancel_failed", reason=str(exc) or type(exc).__name__)
        finally:
            if writer is not None:
                writer.close()
            if not matched:
                self._unmatched_cancels -= 1

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def kill(self, client: ClientConnection, exc: PgGuardError) -> None:
        """Close one client's session with ``exc`` (admin KILL, faults, idle timeout)."""
        client.terminate(exc)

    # ---------------------------------------------------------- control plane

    def wants_admin(self, packet: wire.StartupMessage) -> bool:
        """True when this StartupMessage is for the admin console, not the server."""
        return packet.database == ADMIN_DATABASE and bool(self.config.admin.users)

    def open_admin(self, client: ClientConnection, early: bytes) -> None:
        """Move a client that asked for database "pgguard" to an ``AdminSession``.

        The session is never counted against a limit; it leaves ``clients`` (so a drain does
        not wait for it) and lives in ``admin_sessions`` until its socket closes.
        """
        transport = client.transport
        assert transport is not None and client.startup is not None
        self.clients.pop(client.id, None)
        self._check_idle()
        session = AdminSession(
            self,
            transport,
            client.startup,
            client_id=client.id,
            peer=client.peer,
            connected_at=client.connected_at,
        )
        self.admin_sessions[session.id] = session
        transport.set_protocol(session)
        session.begin(early)

    def admin_closed(self, session: AdminSession) -> None:
        self.admin_sessions.pop(session.id, None)

    def bytes_relayed(self) -> tuple[int, int]:
        """Bytes from clients and to clients since start, live sessions included."""
        bytes_in, bytes_out = self.stats.bytes_in, self.stats.bytes_out
        for client in self.clients.values():
            bytes_in += client.bytes_in
            bytes_out += client.bytes_out
        return bytes_in, bytes_out

    async def _start_control(self) -> None:
        check_admin_config(self.config, log_event)
        listen = self.config.metrics.listen
        if listen is not None:
            from .metrics import MetricsServer

            host, port = config_mod.parse_address(listen)
            self.metrics = MetricsServer(self, host, port)
            await self.metrics.start()
            log_event(logging.INFO, "metrics", listen="{}:{}".format(*self.metrics.address))
        await self._start_mirror()
        self._schedule_idle_sweep()

    async def _start_mirror(self) -> None:
        limits, dsn = self.config.limits, self.config.backend.monitor_dsn
        if limits.mirror_catalog and dsn:
            from .mirror import CatalogMirror

            self.mirror = CatalogMirror(self, dsn, limits.mirror_interval)
            await self.mirror.start()

    async def _restart_mirror(self) -> None:
        mirror, self.mirror = self.mirror, None
        if mirror is not None:
            await mirror.close()
        if not self.config.limits.mirror_catalog:
            self.admit_waiters(self.gate.set_catalog_limits({}, {}))
        await self._start_mirror()

    def _control_reloaded(self, old: Config) -> None:
        new = self.config
        check_admin_config(new, log_event)
        for key, changed in (
            ("server.listen", new.server.listen != old.server.listen),
            ("metrics.listen", new.metrics != old.metrics),
        ):
            if changed:  # bound sockets stay as they are until a restart
                log_event(logging.WARNING, "reload_needs_restart", key=key)

        def mirror_keys(c: Config) -> tuple[object, ...]:
            return (c.limits.mirror_catalog, c.limits.mirror_interval, c.backend.monitor_dsn)

        if mirror_keys(new) != mirror_keys(old):
            self._spawn(self._restart_mirror())
        self._schedule_idle_sweep()

    async def _stop_control(self) -> None:
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
            self._idle_sweep = None
        for session in list(self.admin_sessions.values()):
            session.transport.abort()
        metrics, self.metrics = self.metrics, None
        if metrics is not None:
            await metrics.close()
        mirror, self.mirror = self.mirror, None
        if mirror is not None:
            await mirror.close()

    def _schedule_idle_sweep(self) -> None:
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
            self._idle_sweep = None
        cfg = self.config
        timeouts = [cfg.limits.idle_timeout] + [r.idle_timeout or 0.0 for r in cfg.roles.values()]
        shortest = min((t for t in timeouts if t > 0), default=None)
        if shortest is not None:
            interval = min(max(shortest / 4, IDLE_SWEEP_MIN), IDLE_SWEEP_MAX)
            self._idle_sweep = self.loop.call_later(interval, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close live sessions idle (no bytes either way) past their role's idle_timeout."""
        self._idle_sweep = None
        now = time.monotonic()
        timeouts: dict[str, float] = {}
        for client in list(self.clients.values()):
            if client.state is not State.ACTIVE or not client.idle_status:
                continue  # not live yet, or a query is running
            role = client.role
            timeout = timeouts.get(role)
            if timeout is None:
                timeout = timeouts[role] = self.config.idle_timeout(role)
            idle = now - client.last_active
            if 0 < timeout < idle:
                self.stats.idle_timeouts += 1
                log_event(
                    logging.INFO,
                    "idle_timeout",
                    role=role,
                    database=client.database,
                    idle=f"{idle:.1f}",
                    idle_timeout=timeout,
                    in_transaction=client.idle_status != IDLE,
                    client=client.peer,
                )
                in_transaction = client.idle_status != IDLE
                exc = IdleInTransactionTimeout() if in_transaction else IdleSessionTimeout()
                self.kill(client, exc)
        self._schedule_idle_sweep()


class _SSLAnswer(asyncio.Protocol):
    """Reads the server's answer to pgguard's SSLRequest (tls.read_ssl_response judges it)."""

    def __init__(self) -> None:
        self.byte: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.byte.done():
            self.byte.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.byte.done():
            self.byte.set_exception(exc or ConnectionResetError("server closed the connection"))


async def serve(config: Config) -> int:
    """Run until drained by a signal. Returns the process exit code."""
    loop = asyncio.get_running_loop()
    server = Server(config, loop=loop)
    await server.start()
    stop = asyncio.Event()
    signals = 0

    def on_stop(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log_event(logging.INFO, "signal", name=signal.Signals(signum).name, action="drain")
            stop.set()
        else:
            log_event(logging.INFO, "signal", name=signal.Signals(signum).name, action="stop")
            server._spawn(server.close())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    try:
        await stop.wait()
        drain = loop.create_task(server.drain())
        stopped = loop.create_task(server.wait_stopped())
        await asyncio.wait({drain, stopped}, return_when=asyncio.FIRST_COMPLETED)
        clean = signals == 1 and drain.done() and drain.result()
        for task in (drain, stopped):
            task.cancel()  # after a second signal the drain is abandoned
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log_event(logging.INFO, "stop", clean=clean)
    return 0 if clean else 1


def run(config: Config) -> int:
    """Run pgguard in this process on a fresh (uv)loop until it is drained."""
    raise_fd_limit()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(serve(config))
    finally:
        loop.close()
