"""Listeners and lifecycle: start, admit and release through the gate, reload, drain, stop, signals.

One ``Server`` owns the configuration, the ``limits.Gate``, the listening sockets and the
set of live ``ClientConnection`` objects. It turns the gate's decisions into actions:
a ticket starts a backend dial, a waiter waits (one timer serves every queue deadline),
a rejection becomes PostgreSQL's ErrorResponse. Signals: SIGHUP reloads, SIGTERM/SIGINT
drain (a second one stops at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from . import config as config_mod
from . import tls, wire
from .config import Config
from .errors import ConfigError, PgGuardError, ShuttingDown
from .faults import Faults
from .limits import Gate, Kind, Rejection, Ticket, Waiter
from .proxy import ClientConnection, State

__all__ = ["Server", "Stats", "run", "new_event_loop", "log_event"]

log = logging.getLogger("pgguard")

# Admission waits kept for percentiles (a sliding window, newest kept).
WAIT_SAMPLES: Final = 10000


def log_event(level: int, event: str, **fields: object) -> None:
    """One structured key=value log line per event that matters."""
    if log.isEnabledFor(level):
        parts = [f"event={event}"]
        for key, value in fields.items():
            text = str(value)
            if not text or any(c in text for c in ' "='):
                text = '"' + text.replace('"', '\\"') + '"'
            parts.append(f"{key}={text}")
        log.log(level, " ".join(parts))


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
    bytes_in: int = 0
    bytes_out: int = 0
    # The newest admission waits, in seconds; O(1) to record, sorted only when asked.
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))

    def record_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

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

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind every ``[server] listen`` address; port 0 picks a free one (see ``addresses``)."""
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
        )

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
            return False
        self.client_tls, self.backend_tls = client_tls, backend_tls
        self.config = new
        self.faults.configure(new.faults)
        self._admit_waiters(self.gate.reconfigure(new.rules()))
        log_event(logging.INFO, "reload", file=new.path, changed=",".join(changed) or "nothing")
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
        for task in list(self._tasks):
            task.cancel()
        if self._queue_timer is not None:
            self._queue_timer.cancel()
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await listener.wait_closed()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --------------------------------------------------------------- clients

    def client_opened(self, client: ClientConnection) -> None:
        self.clients[client.id] = client
        self._idle.clear()

    def client_closed(self, client: ClientConnection) -> None:
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
        decision = self.gate.arrive(client.role, client.database, now, client)
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
        log_event(
            logging.INFO,
            "reject",
            role=client.role,
            database=client.database,
            limit=rejection.limit.value,
            value=rejection.value,
            reason=rejection.cause,
            client=client.peer,
        )
        client.reject(rejection.error(with_detail=self.config.errors.detail))

    def release(self, ticket: Ticket) -> None:
        """A session's backend is gone: free its slots and admit whoever now fits."""
        self._admit_waiters(self.gate.release(ticket))
        self._check_idle()

    def _admit_waiters(self, waiters: list[Waiter]) -> None:
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
        if backend_tls.context is None:
            transport, proto = await self.loop.create_connection(factory, cfg.host, cfg.port)
            return transport, proto
        raw, answer = await self.loop.create_connection(_SSLAnswer, cfg.host, cfg.port)
        assert isinstance(answer, _SSLAnswer)
        try:
            raw.write(tls.SSL_REQUEST)
            if tls.read_ssl_response(await answer.byte, backend_tls.sslmode):
                transport = await self.loop.start_tls(
                    raw,
                    answer,
                    backend_tls.context,
                    server_hostname=backend_tls.server_hostname,
                    ssl_handshake_timeout=cfg.connect_timeout,
                )
            else:
                transport = raw  # prefer, and the server said N: on in clear
            if transport.is_closing():
                raise ConnectionResetError("server closed the connection during SSL negotiation")
        except BaseException:
            raw.abort()
            raise
        proto = factory()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        return transport, proto

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

    def forward_cancel(self, packet: wire.CancelRequest) -> None:
        """Send a CancelRequest to the server at once; it is never counted or queued."""
        self.stats.cancels_forwarded += 1
        self._spawn(self._send_cancel(packet.raw))

    async def _send_cancel(self, raw: bytes) -> None:
        cfg = self.config.backend
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
                writer.write(raw)
                await writer.drain()
                # The server closes after reading it; wait for that so the cancel is delivered.
                await reader.read(1)
                writer.close()
        except (OSError, TimeoutError) as exc:
            log_event(logging.WARNING, "cancel_failed", reason=str(exc) or type(exc).__name__)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def kill(self, client: ClientConnection, exc: PgGuardError) -> None:
        """Close one client's session with ``exc`` (admin KILL, faults, idle timeout)."""
        client.terminate(exc)


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
        clean = drain.done() and drain.result()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log_event(logging.INFO, "stop", clean=clean)
    return 0 if clean else 1


def run(config: Config) -> int:
    """Run pgguard in this process on a fresh (uv)loop until it is drained."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(serve(config))
    finally:
        loop.close()
