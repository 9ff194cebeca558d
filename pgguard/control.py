"""The control layer: the one owner of the Gate; every admission, limit change, kill and fault goes through it.

Theory
------
``limits.Gate`` decides; ``Control`` acts on its decisions and is the only code that holds
it. Each operation here is whole: it changes the gate, starts the sessions of every waiter
the change admitted, counts what happened in ``Stats`` and logs it. Nobody else calls a Gate
setter or has to remember a follow-up call.

- Sockets: ``client_opened`` / ``client_closed`` keep the registry of client sockets and
  enforce ``[server] max_client_connections``; ``console_opened`` / ``console_closed`` the
  console sessions, which count toward the same cap. Past the cap, ``[admin]
  reserved_connections`` sockets are still read, for console logins only (``_reserve``,
  ``refuse_past_cap``).
- Admission: ``admit`` (fault rules first, then the gate), ``leave_queue``, ``release``.
- Login slots (``[backend] max_logins_in_flight``, ``logins.LoginSlots``): ``take_login``,
  ``end_login`` (starts the login of the waiter it lets in), ``login_timed_out``.
- Intents: ``set_limit``, ``set_policy``, ``pause``, ``resume``, ``apply_config`` (reload),
  ``apply_catalog`` (mirror mode), ``kill``, ``inject`` / ``remove_fault`` / ``clear_faults``,
  ``shut`` (drain), ``terminate_all``.
- Snapshots, read by SHOW, ``/metrics`` and ``pgguard.testing`` alike so they cannot
  disagree: ``counts``, ``limit_rows``, ``stats_rows``, ``client_rows``, ``queue_rows``,
  ``fault_rows``, ``pair_counts``.

Time for queue deadlines and the idle sweep comes from the event loop; the gate itself keeps
no clock. Rejections and refused sockets are logged through rate-limited windows, so a flood
costs one line per key per second.

``[cluster]``: ``cluster.ClusterAdmission`` (imported only then) is called at four points,
each behind one ``self.cluster`` test: an admission the gate made, ``release``, ``leave_queue``
and ``set_limit``; the lifecycle adds ``start_cluster`` / ``close_cluster``.

``[server] workers`` without ``[cluster]``: ``host.HostAdmission`` (set by workers.py through
``attach_host``) is called at the same points, each behind one ``self.host`` test, plus
``session_key`` (the server process of a ticket) and ``apply_catalog``: the supervisor's Gate
decides, this one counts what this worker holds.

``[pool]``: ``pool.Pool`` (only when some role or database reuses server sessions) is called
at the admission (``_take_warm``, behind one test of ``client.pooled``), when a client queues
(``_free_warm_slot``), and gets ``hand_to_waiter`` / ``others_waiting`` / ``over_limit`` when a
released session is parked; ``forward_cancel`` maps pgguard's key of a reused session.

Size: about 1000 lines, kept as one job on purpose: every change to what is admitted goes
through this one class (that is the point of the layer); the rows SHOW prints are in
``stats.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hmac
import logging
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, Literal

from . import stats, tls, wire
from .backend import Backend
from .config import Config
from .errors import (
    AdminShutdown,
    IdleInTransactionTimeout,
    IdleSessionTimeout,
    PgGuardError,
    ShuttingDown,
    TooManyConnections,
)
from .faults import Faults
from .limits import Gate, Kind, Limit, LimitRow, Policy, Rejection, RejectReason, Ticket, Waiter
from .log import RateLimitedLog, log, log_event
from .logins import LoginSlot, LoginSlots
from .pool import Pool, ServerSession, pool_key
from .proxy import ClientConnection, State
from .rules import FaultRule
from .stats import Console, Counts, Stats

if TYPE_CHECKING:
    from .cluster import ClusterAdmission
    from .host import HostAdmission

__all__ = [
    "ADMIN_DATABASE",
    "Control",
    "Console",
    "Counts",
    "Stats",
    "client_cap",
    "raise_fd_limit",
]

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
# [admin] reserved_connections: a socket past the cap that has sent no StartupMessage for this
# many seconds may be dropped (53300) to make room for a newer one, so sockets that never
# speak cannot hold the reserve; a younger one is never dropped, so a burst of arrivals
# accepted in one batch cannot push out an operator's login before its packet is read.
RESERVE_GRACE: Final = 1.0
# The database name that reaches the admin console instead of the server.
ADMIN_DATABASE: Final = "pgguard"
_LIMITS: Final = {"role": Limit.ROLE, "database": Limit.DATABASE, "total": Limit.TOTAL}


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


class Control:
    """The gate's owner and the counters' keeper for one pgguard process."""

    def __init__(self, config: Config, backend: Backend, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.backend = backend
        self.loop = loop
        self._gate = Gate(config.rules())
        self.logins = LoginSlots(config.backend.max_logins_in_flight)
        self.stats = Stats()
        self.clients: dict[int, ClientConnection] = {}
        self.consoles: dict[int, Console] = {}
        # [admin] reserved_connections: sockets taken past max_client_connections that are
        # still in startup (oldest first, with when they came), and the console sessions
        # that logged in through them; both are also in ``clients`` / ``consoles``.
        self._past_cap: dict[int, tuple[ClientConnection, float]] = {}
        self._reserved_consoles: set[int] = set()
        self.max_clients = client_cap(config.server.max_client_connections)
        self.draining = False
        self.started_at = time.time()
        self.faults = Faults(self, config.faults)
        # Server process id -> the session it serves, to tell known CancelRequests from others.
        self._backend_keys: dict[int, ClientConnection] = {}
        self._unmatched_cancels = 0
        # [server] workers: asks the other workers of this host to cancel with a key none of
        # this worker's sessions holds ([pool]: perhaps another worker's reused session); True
        # when one of them held it (set by workers.py).
        self.cancel_elsewhere: Callable[[bytes], Awaitable[bool]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._queue_timer: asyncio.TimerHandle | None = None
        self._queue_deadline: float | None = None
        self._idle_sweep: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Floods are logged as one line per key per window plus a summary (see _log_limited):
        # rejections by (role, database, reason), refused sockets and fd exhaustion by reason.
        self._reject_log = RateLimitedLog("reject", REJECT_LOG_WINDOW, overflow=("", "", "other"))
        self._refuse_log = RateLimitedLog("refuse", REJECT_LOG_WINDOW, overflow=("other",))
        self._log_windows: dict[RateLimitedLog, asyncio.TimerHandle] = {}
        # Set by the Server: client TLS (None: SSLRequest gets "N") and the console hand-off.
        self.client_tls: tls.ClientTLS | None = None
        self.open_console: Callable[[ClientConnection, bytes], None] | None = None
        # [cluster]: the shared lease store's hook (cluster.py), None without [cluster]: then
        # the only cluster code on any path is the test of this attribute.
        self.cluster: ClusterAdmission | None = None
        if config.cluster is not None:
            self._attach_cluster(config)
        # [server] workers without [cluster]: the supervisor's Gate decides (host.py), None
        # otherwise: then the only host code on any path is the test of this attribute.
        self.host: HostAdmission | None = None
        # [pool]: warm server-session reuse (pool.py), None while no role or database has
        # reuse on: then the only pool code on any path is the test of this attribute.
        self.pool: Pool | None = Pool(self) if config.reuse_anywhere else None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._schedule_idle_sweep()

    def close(self) -> None:
        """Stop timers and tasks, log what the rate-limited windows still hold."""
        self.draining = True
        for timer in (self._queue_timer, self._idle_sweep):
            if timer is not None:
                timer.cancel()
        self._queue_timer = self._idle_sweep = None
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        for limiter, timer in list(self._log_windows.items()):
            timer.cancel()
            self._end_log_window(limiter)
        self.faults.clear()
        if self.pool is not None:
            self.pool.close()
            self.pool.verifiers.close()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task this process cancels when it closes."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def idle(self) -> bool:
        """True when no slot is held, nobody waits and no client socket is open."""
        return not self.clients and not self._gate.total_active and not self._gate.total_waiting

    async def wait_idle(self) -> None:
        """Until no client socket is open and no slot is held."""
        while self.clients or self._gate.total_active:
            self._idle.clear()
            await self._idle.wait()

    def _check_idle(self) -> None:
        if not self.clients and not self._gate.total_active:
            self._idle.set()

    # ----------------------------------------------------------------- sockets

    def client_opened(self, client: ClientConnection) -> bool:
        """Count a new client socket; False (and 53300 sent) past ``max_client_connections``.

        Past the cap a socket may still be taken into the console's reserve (``_reserve``):
        then its StartupMessage is read, and anything but a console login is refused.
        """
        past_cap = len(self._past_cap) + len(self._reserved_consoles)
        if len(self.clients) + len(self.consoles) - past_cap >= self.max_clients:
            if not self._reserve(client):
                self._refuse_over_cap(client)
                return False
        self.clients[client.id] = client
        self._idle.clear()
        return True

    def _reserve(self, client: ClientConnection) -> bool:
        """Take ``client`` past the cap into ``[admin] reserved_connections``, if there is room.

        With the reserve full, the oldest reserved socket still without a StartupMessage
        after ``RESERVE_GRACE`` is refused to make room; a console session never is.
        """
        admin = self.config.admin
        consoles = len(self._reserved_consoles)
        if not admin.users or self.draining or consoles >= admin.reserved_connections:
            return False  # no console, or the reserve is all console sessions
        now = self.loop.time()
        if len(self._past_cap) + consoles >= admin.reserved_connections:
            oldest, since = next(iter(self._past_cap.values()))
            if now - since < RESERVE_GRACE:
                return False
            del self._past_cap[oldest.id]
            self._refuse_over_cap(oldest)
        self._past_cap[client.id] = (client, now)
        client.past_cap = True
        return True

    def refuse_past_cap(self, client: ClientConnection) -> None:
        """A reserved socket's StartupMessage is not a console login: PostgreSQL's 53300."""
        self._past_cap.pop(client.id, None)
        self._refuse_over_cap(client)

    def _refuse_over_cap(self, client: ClientConnection) -> None:
        self._count_rejection(RejectReason.MAX_CLIENT_CONNECTIONS)
        self._log_limited(
            self._refuse_log,
            (RejectReason.MAX_CLIENT_CONNECTIONS.value,),
            reason=RejectReason.MAX_CLIENT_CONNECTIONS.value,
            client=client.peer,
            limit=self.max_clients,
        )
        client.refuse(TooManyConnections(TOO_MANY_CLIENTS))

    def client_closed(self, client: ClientConnection) -> None:
        self._past_cap.pop(client.id, None)
        pid = client.backend_pid
        if pid is not None and self._backend_keys.get(pid) is client:
            del self._backend_keys[pid]
        self.stats.bytes_in += client.bytes_in
        self.stats.bytes_out += client.bytes_out
        self.clients.pop(client.id, None)
        hold, client.hold = client.hold, None
        if hold is not None:
            self._admit_waiters(self._gate.leave(hold))  # its address slot: exactly once
        self._check_idle()

    def console_opened(self, client: ClientConnection, session: Console) -> None:
        """``client``'s socket now belongs to a console session (never counted on a limit)."""
        self.clients.pop(client.id, None)
        if self._past_cap.pop(client.id, None) is not None:
            self._reserved_consoles.add(session.id)  # holds its reserved place until it closes
        self._check_idle()
        self.consoles[session.id] = session

    def console_closed(self, session: Console) -> None:
        self.consoles.pop(session.id, None)
        self._reserved_consoles.discard(session.id)

    def fd_exhausted(self, where: str, exc: OSError) -> None:
        """The process ran out of file descriptors (EMFILE/ENFILE): count it, log it (limited)."""
        self.stats.fd_exhausted += 1
        self._log_limited(self._refuse_log, (where,), reason=where, error=exc.strerror or str(exc))

    def accept_failed(self, exc: OSError) -> None:
        """A listener's accept failed (the Acceptor retries shortly): out of descriptors is
        ``fd_exhausted``; anything else (ENOBUFS, ENOMEM) is logged the same limited way."""
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            self.fd_exhausted("accept", exc)
        else:
            self._log_limited(
                self._refuse_log, ("accept_error",), reason="accept_error", error=exc.strerror or str(exc)
            )

    def wants_admin(self, packet: wire.StartupMessage) -> bool:
        """True when this StartupMessage is for the admin console, not the server."""
        return packet.database == ADMIN_DATABASE and bool(self.config.admin.users)

    def open_admin(self, client: ClientConnection, early: bytes) -> None:
        """Hand ``client``'s socket to a console session (the Server makes it)."""
        assert self.open_console is not None
        self.open_console(client, early)

    async def open_backend(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """The server connection of an admitted session (see ``backend.Backend.open``)."""
        return await self.backend.open(factory)

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
        if client.pooled and self._take_warm(client):
            return
        replication = client.startup is not None and client.startup.is_replication
        if self.host is not None and not replication:  # a walsender holds no slot: decided here
            self.host.arrive(client)
            return
        decision = self._gate.arrive(
            client.role, client.database, self.loop.time(), client,
            replication=replication, address=client.address,
        )  # fmt: skip
        if decision.hold is not None:
            client.hold = decision.hold
        if decision.kind is Kind.ADMIT:
            assert decision.ticket is not None
            if self.cluster is not None:
                self.cluster.admitted(client, decision.ticket, self.loop.time())
                return
            self.stats.admissions += 1
            self.stats.record_wait(0.0)
            client.admitted(decision.ticket)
        elif decision.kind is Kind.QUEUE:
            assert decision.waiter is not None
            self.stats.queued += 1
            client.queued(decision.waiter)
            self._schedule_queue_timer(decision.waiter.deadline)
            if self.pool is not None:
                self._free_warm_slot(decision.waiter)
        else:
            assert decision.rejection is not None
            self._reject(client, decision.rejection)

    # ------------------------------------------------------------------- pool

    def _take_warm(self, client: ClientConnection) -> bool:
        """[pool]: give ``client`` a warm session of its pair and that session's slot, if any."""
        assert self.pool is not None and client.startup is not None
        if self._gate.paused or self._gate.exceeded(client.role, client.database):
            return False
        if client.address is not None and client.hold is None:
            # A warm session skips the gate, not the client's address limit.
            client.hold = self._gate.take_hold(client.address, client.role)
            if client.hold is None:
                return False
        session = self.pool.take(client.startup)
        if session is None:
            hold, client.hold = client.hold, None
            self._admit_waiters(self._gate.leave(hold))  # arrive() takes it again
            return False
        ticket = self.pool.claim(session)
        client.warm = session
        self.stats.admissions += 1
        self.stats.record_wait(0.0)
        client.admitted(ticket)
        return True

    def hand_to_waiter(self, role: str, database: str, ticket: Ticket, session: ServerSession) -> bool:
        """[pool]: a just-reset session (and its slot) to the oldest waiter of its pair; False if none."""
        if self._gate.exceeded(role, database):
            return False

        def fits(waiter: Waiter) -> bool:  # a client whose own startup the session was made with
            client = waiter.context
            return (
                isinstance(client, ClientConnection) and client.pooled
                and client.startup is not None and pool_key(client.startup) == session.pool_key
            )  # fmt: skip

        waiter = self._gate.hand_over(role, database, fits)
        if waiter is None:
            return False
        client = waiter.context
        assert isinstance(client, ClientConnection) and self.pool is not None
        waiter.ticket = self.pool.claim(session)
        client.warm = session
        self.stats.admissions += 1
        self.stats.record_wait(self.loop.time() - waiter.arrived)
        client.admitted(waiter.ticket)
        return True

    def over_limit(self, role: str, database: str) -> bool:
        """[pool]: True when (role, database) holds more slots than a (lowered) limit allows."""
        return self._gate.exceeded(role, database)

    def others_waiting(self, role: str, database: str) -> bool:
        """[pool]: True when (role, database) should give up a slot: a limit was lowered under
        its count, or a queued client would be helped by it. With ``[server] workers`` (the
        supervisor's Gate) the session stays and the supervisor hears of it (``host.parked``):
        it asks for the slot back if a client of another worker waits behind it."""
        if self.host is not None and self.pool is not None:
            self.host.parked(role, database)
        if self._gate.exceeded(role, database):
            return True
        if not self._gate.total_waiting:
            return False
        return any(self._shares(w, role, database) for w in self._gate.queue_heads())

    def _shares(self, waiter: Waiter, role: str, database: str) -> bool:
        blocking = self._gate.blocking(waiter.role, waiter.database)
        if blocking is None:
            return False
        if blocking.limit is Limit.TOTAL:
            return True
        return role == blocking.name if blocking.limit is Limit.ROLE else database == blocking.name

    def _free_warm_slot(self, waiter: Waiter) -> None:
        """[pool]: a client queued behind a limit that idle warm sessions occupy: close the oldest."""
        assert self.pool is not None
        self.pool.free_slot_for(lambda role, database: self._shares(waiter, role, database))

    def leave_queue(self, waiter: Waiter) -> None:
        """A queued client left (or was answered): it holds nothing any more."""
        if self.cluster is not None and self.cluster.cancel(waiter):
            return
        if self.host is not None and self.host.cancel(waiter):
            return
        self._gate.cancel(waiter)

    def release(self, ticket: Ticket) -> None:
        """A session's backend is gone: free its slots and admit whoever now fits."""
        if self.cluster is not None:
            self.cluster.release(ticket)  # its lease, if any, before the local slots
        if self.host is not None:
            self.host.release(ticket)  # the supervisor's slot, before this worker's count
        self._admit_waiters(self._gate.release(ticket))
        self._check_idle()

    # ------------------------------------------------------------ login slots

    def take_login(self, client: ClientConnection) -> LoginSlot:
        """A login slot for ``client``'s server login: held now, or waiting (counted)."""
        slot = self.logins.take(client.role, client.database, client)
        if not slot.held:
            self.stats.login_waits += 1
        return slot

    def end_login(self, slot: LoginSlot) -> None:
        """A login is over, or a waiter left: the next waiter (if any) starts its login."""
        granted = self.logins.give_back(slot)
        if granted is not None:
            self._start_logins([granted])

    def _start_logins(self, slots: list[LoginSlot]) -> None:
        for slot in slots:
            client = slot.context
            assert isinstance(client, ClientConnection)
            client.login_granted()

    def login_timed_out(self, client: ClientConnection) -> None:
        """``client`` waited connect_timeout for a login slot: count it, log it (limited)."""
        self.stats.login_timeouts += 1
        reason = "login_slot_timeout"
        self._log_limited(
            self._reject_log,
            (client.role, client.database, reason),
            role=client.role,
            database=client.database,
            reason=reason,
            max_logins_in_flight=self.logins.cap,
            client=client.peer,
        )

    def _admit_waiters(self, waiters: list[Waiter]) -> None:
        """Start the sessions of waiters the gate just admitted (every Gate call that can
        admit returns them; only this class makes those calls)."""
        now = self.loop.time()
        for waiter in waiters:
            client = waiter.context
            assert isinstance(client, ClientConnection) and waiter.ticket is not None
            if self.cluster is not None:
                self.cluster.admitted(client, waiter.ticket, waiter.arrived)
                continue
            self.stats.admissions += 1
            self.stats.record_wait(now - waiter.arrived)
            client.admitted(waiter.ticket)

    def _reject(self, client: ClientConnection, rejection: Rejection) -> None:
        cause = rejection.cause
        self.stats.rejections[cause] += 1
        if cause is RejectReason.QUEUE_TIMEOUT:
            self.stats.queue_timeouts += 1
        limiter = self._reject_log
        # Under a flood only the first of a window is logged: build its fields only then.
        if log.isEnabledFor(logging.INFO) and limiter.event_now((client.role, client.database, cause)):
            log_event(
                logging.INFO,
                "reject",
                role=client.role,
                database=client.database,
                limit=rejection.limit.value,
                value=rejection.value,
                reason=cause,
                client=client.peer,
            )
            self._open_window(limiter)
        client.reject(rejection.error(with_detail=self.config.errors.detail))

    def _count_rejection(self, reason: RejectReason) -> None:
        self.stats.rejections[reason] += 1  # a StrEnum: the same key as its value

    def count_rejection(self, reason: str) -> None:
        """A fault rule turned a client away (FaultHost)."""
        self._count_rejection(RejectReason(reason))

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
        for waiter, rejection in self._gate.expire(self.loop.time()):
            client = waiter.context
            assert isinstance(client, ClientConnection)
            client.waiter = None
            self._reject(client, rejection)
        deadline = self._gate.next_deadline()
        if deadline is not None:
            self._schedule_queue_timer(deadline)

    # ------------------------------------------------------------ rate limits

    def _log_limited(self, limiter: RateLimitedLog, key: tuple[object, ...], **fields: object) -> None:
        """Log ``fields`` unless ``key`` was logged in this window (then it is only counted)."""
        if limiter.event_now(key):
            log_event(logging.INFO, limiter.event, **fields)
            self._open_window(limiter)

    def _open_window(self, limiter: RateLimitedLog) -> None:
        """Start ``limiter``'s window (its summary is logged when it ends) unless it runs."""
        if limiter not in self._log_windows:
            self._log_windows[limiter] = self.loop.call_later(
                limiter.window, self._end_log_window, limiter
            )

    def _end_log_window(self, limiter: RateLimitedLog) -> None:
        """Log how many events per key went unlogged in the window that just ended."""
        self._log_windows.pop(limiter, None)
        limiter.flush(_LOG_KEYS[limiter.event])

    # ---------------------------------------------------------- session events

    def session_started(self, client: ClientConnection) -> None:
        """The backend sent its first ReadyForQuery: the session is live."""
        client.last_active = time.monotonic()  # idle time counts from here, not from arrival
        client.idle_status = IDLE  # the first ReadyForQuery is always 'I'

    def session_key(self, client: ClientConnection) -> None:
        """The server sent ``client`` its BackendKeyData: cancels naming it are known ones."""
        if client.backend_pid is not None:
            self._backend_keys[client.backend_pid] = client
            if self.host is not None and client.ticket is not None:
                self.host.backend_pid(client.ticket, client.backend_pid)

    def dial_failed(
        self, client: ClientConnection, reason: str, exc: BaseException | None = None
    ) -> None:
        """A server connection could not be made; one for want of descriptors is also
        ``fd_exhausted``, and logged only through its rate-limited line (a flood of them
        would otherwise write a line per client)."""
        self.stats.dial_failures += 1
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.fd_exhausted("dial", exc)
            return
        log_event(
            logging.WARNING,
            "dial_failure",
            backend=self.backend.address,
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

    def forward_cancel(self, packet: wire.CancelRequest) -> None:
        """Send a CancelRequest to the server at once; it is never counted or queued.

        A cancel whose key matches a session pgguard relays always goes through. Others (a
        session of another pgguard process behind the same port, or a forged key) go through
        at most MAX_UNMATCHED_CANCELS at a time: each costs the server a connection, so a
        flood of them is dropped here (counted, logged once a second), not passed on.
        """
        client = self._backend_keys.get(packet.pid)
        matched = client is not None and hmac.compare_digest(client.backend_key, packet.key)
        if not matched:
            if self._unmatched_cancels >= MAX_UNMATCHED_CANCELS:
                self.stats.cancels_dropped += 1
                self._log_limited(self._refuse_log, ("cancel_flood",), reason="cancel_flood")
                return
            self._unmatched_cancels += 1
            if self.pool is not None and self.cancel_elsewhere is not None:
                # [pool] with workers: perhaps the key of a reused session another worker
                # holds (a real process id with a secret pgguard gave its client, which the
                # server does not know): that worker forwards it mapped; when none holds it,
                # it goes to the server as it came. Routed by the whole key, not the pid.
                self.spawn(self._cancel_elsewhere(self.cancel_elsewhere, packet.raw))
                return
        self.stats.cancels_forwarded += 1
        raw = packet.raw
        if matched and client is not None and client.server_cancel is not None:
            raw = client.server_cancel  # [pool]: pgguard's key for a reused session -> the server's
        self.spawn(self._send_cancel(raw, matched))

    def cancel_mine(self, packet: wire.CancelRequest) -> bool:
        """Forward ``packet`` if one of this process's sessions holds its key (another worker
        received it); False otherwise, and nothing is sent."""
        client = self._backend_keys.get(packet.pid)
        if client is None or not hmac.compare_digest(client.backend_key, packet.key):
            return False
        self.forward_cancel(packet)
        return True

    async def _cancel_elsewhere(self, ask: Callable[[bytes], Awaitable[bool]], raw: bytes) -> None:
        try:
            if not await ask(raw):  # no worker holds the key: the server's own, or a forged one
                self.stats.cancels_forwarded += 1
                await self.backend.send_cancel(raw)
        except Exception as exc:  # the supervisor is gone or slow: the cancel is lost, as on a dead link
            log_event(logging.WARNING, "cancel_failed", reason=str(exc) or type(exc).__name__)
        finally:
            self._unmatched_cancels -= 1

    async def _send_cancel(self, raw: bytes, matched: bool) -> None:
        try:
            await self.backend.send_cancel(raw)
        except (OSError, TimeoutError) as exc:
            log_event(logging.WARNING, "cancel_failed", reason=str(exc) or type(exc).__name__)
        finally:
            if not matched:
                self._unmatched_cancels -= 1

    # ----------------------------------------------------------------- intents

    def set_limit(self, kind: Literal["role", "database", "total"], name: str, value: int) -> None:
        """A run-time limit (SET LIMIT), in force until the next reload; admits whoever fits.
        [cluster]: stored in Redis, so every instance applies it."""
        gate = self._gate
        if kind == "role":
            admitted = gate.set_role_limit(name, value)
        elif kind == "database":
            admitted = gate.set_database_limit(name, value)
        else:
            admitted = gate.set_total_limit(value)
        self._admit_waiters(admitted)
        if self.cluster is not None:
            self.cluster.share_limit(_LIMITS[kind], name, value)

    def reset_limit(self, kind: Literal["role", "database", "total"], name: str = "") -> None:
        """Remove a run-time limit (RESET LIMIT): the configured value applies again.
        [cluster]: removed from Redis too, so on every instance."""
        self._admit_waiters(self._gate.reset_limit(_LIMITS[kind], name))
        if self.cluster is not None:
            self.cluster.share_limit(_LIMITS[kind], name, None)

    def set_policy(self, role: str, policy: Policy) -> None:
        self._admit_waiters(self._gate.set_role_policy(role, policy))

    def pause(self) -> None:
        """Admit nobody new (exempt roles excepted); arrivals queue."""
        self._gate.pause()

    def resume(self) -> None:
        self._admit_waiters(self._gate.resume())

    def runtime_state(self) -> dict[str, Any]:
        """What a restarted worker copies from a live one (workers.py): PAUSE, SET POLICY and
        the fault rules. SET LIMIT is not in it: with [cluster] it comes back from the store."""
        return {
            "paused": self._gate.paused,
            "policies": {role: p.value for role, p in self._gate.runtime_policies().items()},
            "faults": self.faults.snapshot(),
        }

    def restore_runtime_state(self, state: dict[str, Any]) -> None:
        """Take ``runtime_state()`` of another worker, before serving. Raises ValueError,
        KeyError or FaultSpecError on a malformed one (nothing is half taken but the faults)."""
        policies = {str(role): Policy(value) for role, value in state["policies"].items()}
        # [server] workers without [cluster]: the shared Gate's SET LIMIT values, so that this
        # worker shows what is in force (the supervisor's Gate enforces them)
        limits = {(Limit(kind), str(name)): int(value) for kind, name, value in state.get("limits", ())}
        rules = self.faults.restore(state["faults"])
        if limits:
            self._admit_waiters(self._gate.set_runtime_limits(limits))
        for role, policy in policies.items():
            self.set_policy(role, policy)
        if state["paused"]:
            self.pause()
        log_event(logging.INFO, "runtime_state_restored", paused=bool(state["paused"]),
                  policies=len(policies), faults=rules)

    def apply_config(self, config: Config, *, keep_runtime: bool = False) -> None:
        """A new configuration (reload): rules, faults, the socket cap, the idle sweep."""
        self.config = config
        self.max_clients = client_cap(config.server.max_client_connections)
        self.faults.configure(config.faults)
        self._admit_waiters(self._gate.reconfigure(config.rules(), keep_runtime=keep_runtime))
        self._start_logins(self.logins.set_cap(config.backend.max_logins_in_flight))
        self._schedule_idle_sweep()
        if self.cluster is not None and not keep_runtime:
            self.cluster.clear_limits()  # every instance back to its configured limits
        if self.pool is not None:
            self.pool.reconfigure(config)
        elif config.reuse_anywhere:
            self.pool = Pool(self)

    def reset(self) -> None:
        """Back to the configuration (pgguard.testing): run-time limits and policies dropped,
        faults cleared, resumed, counters zeroed. Live sessions are left alone."""
        self.faults.clear()
        self.faults.totals.clear()
        self.faults.configure(self.config.faults)
        self.stats = Stats()
        self._admit_waiters(self._gate.reconfigure(self.config.rules()))
        self._admit_waiters(self._gate.resume())
        if self.cluster is not None:
            self.cluster.clear_limits()

    def apply_catalog(self, roles: dict[str, int], databases: dict[str, int]) -> None:
        """The server's rolconnlimit / datconnlimit (mirror mode); {} and {} forget them."""
        self._admit_waiters(self._gate.set_catalog_limits(roles, databases))
        if self.host is not None:
            self.host.catalog(roles, databases)

    def kill(self, client_id: int, exc: PgGuardError) -> bool:
        """Close client or console session ``client_id`` with ``exc``; False if there is none."""
        client = self.clients.get(client_id)
        if client is not None:
            self.stats.kills += 1
            client.terminate(exc)
            return True
        console = self.consoles.get(client_id)
        if console is not None:
            console.terminate(exc)
            return True
        return False

    def terminate(self, client: ClientConnection, exc: PgGuardError) -> None:
        """Close one live session with ``exc`` (faults, idle timeout; FaultHost's kill)."""
        client.terminate(exc)

    def live_clients(self) -> Iterable[ClientConnection]:
        return self.clients.values()

    def inject(self, rule: FaultRule, *, source: str = "runtime") -> FaultRule:
        """Install a fault rule (a TERMINATE without AFTER fires now); returns it with its id."""
        return self.faults.add(rule, source=source)

    def remove_fault(self, rule_id: int) -> bool:
        return self.faults.remove(rule_id)

    def clear_faults(self) -> int:
        return self.faults.clear()

    def shut(self) -> None:
        """Draining: queued clients and clients still in startup get 57P03; nobody new is admitted."""
        self.draining = True
        if self.pool is not None:
            self.pool.close()  # warm sessions hold slots: a drain must not wait for them
        log_event(
            logging.INFO,
            "drain",
            sessions=self._gate.total_active,
            queued=self._gate.total_waiting,
        )
        if self.cluster is not None:
            self.cluster.shut()
        if self.host is not None:
            self.host.shut()
        for waiter in self._gate.clear_queues():
            client = waiter.context
            assert isinstance(client, ClientConnection)
            client.waiter = None
            self._count_rejection(RejectReason.SHUTDOWN)
            client.reject(ShuttingDown())
        for client in list(self.clients.values()):
            if client.state is State.STARTUP:
                client.fail(ShuttingDown())

    def terminate_all(self) -> None:
        """Every remaining session gets PostgreSQL's fast-shutdown FATAL 57P01."""
        for client in list(self.clients.values()):
            client.terminate(AdminShutdown())

    def abort_all(self) -> None:
        """Close every client and server socket at once (a stop without drain)."""
        if self.pool is not None:
            self.pool.abort()
        for client in list(self.clients.values()):
            client.abort()
        for console in list(self.consoles.values()):
            console.terminate(AdminShutdown())

    # -------------------------------------------------------------------- host

    def attach_host(
        self, call: Callable[..., bool], send: Callable[..., bool]
    ) -> HostAdmission:
        """[server] workers without [cluster]: admissions ask the supervisor's Gate (host.py)
        through ``call`` (a request) and ``send`` (a notice) on the worker's channel."""
        from .host import HostAdmission

        self.host = HostAdmission(
            self._gate,
            self.loop,
            call=call,
            send=send,
            start=self._start_session,
            free_slot=self._free_slot_of,
            reject=self._reject,
            give_back=self.release,
            count_rejection=self._count_rejection,
            count_queued=self._count_queued,
        )
        return self.host

    def _free_slot_of(self, limit: Limit, name: str) -> None:
        """[server] workers, [pool]: a client (of any worker) waits behind ``limit``: close
        this worker's oldest idle warm session that holds a slot of it."""
        if self.pool is None:
            return
        if limit is Limit.TOTAL:
            self.pool.free_slot_for(lambda role, database: True)
        elif limit is Limit.ROLE:
            self.pool.free_slot_for(lambda role, database: role == name)
        else:
            self.pool.free_slot_for(lambda role, database: database == name)

    # ----------------------------------------------------------------- cluster

    def _attach_cluster(self, config: Config) -> None:
        """[cluster]: admissions also take slots in the shared store (cluster.py)."""
        from .cluster import ClusterAdmission

        assert config.cluster is not None
        self.cluster = ClusterAdmission(
            config.cluster,
            self._gate,
            self.loop,
            spawn=self.spawn,
            start=self._start_session,
            reject=self._reject,
            give_back=self.release,
            count_rejection=self._count_rejection,
            count_queued=self._count_queued,
            apply_limit=self._apply_shared_limit,
            replace_limits=self._replace_shared_limits,
            end=self._end_ticket,
        )

    def _end_ticket(self, ticket: Ticket, exc: PgGuardError) -> None:
        """[cluster]: the slot ``ticket`` stands for was given away; end whatever holds it now:
        the client it was admitted for, or, with [pool], the client or warm session it passed to."""
        for client in self.clients.values():
            if client.ticket is ticket:
                client.terminate(exc)
                return
        if self.pool is not None:
            self.pool.close_holding(ticket, "cluster_lease_lost")

    def _start_session(self, client: ClientConnection, ticket: Ticket, arrived: float) -> None:
        """[cluster]: ``client`` holds its local ticket and its leases: start its session."""
        self.stats.admissions += 1
        self.stats.record_wait(max(0.0, self.loop.time() - arrived))
        client.admitted(ticket)

    def _count_queued(self) -> None:
        """[cluster]: a client the gate admitted waits for the store's slots."""
        self.stats.queued += 1

    def _replace_shared_limits(self, limits: dict[tuple[Limit, str], int]) -> None:
        """[cluster]: the store's run-time limits (a reload somewhere cleared them, or a
        resync read them) become the local gate's, in one change."""
        self._admit_waiters(self._gate.set_runtime_limits(limits))

    def _apply_shared_limit(self, limit: Limit, name: str, value: int | None) -> None:
        """A run-time limit set (or removed: None) on another instance or here: into the
        local gate."""
        gate = self._gate
        if value is None:
            admitted = gate.reset_limit(limit, name)
        elif limit is Limit.ROLE:
            admitted = gate.set_role_limit(name, value)
        elif limit is Limit.DATABASE:
            admitted = gate.set_database_limit(name, value)
        else:
            admitted = gate.set_total_limit(value)
        self._admit_waiters(admitted)

    async def start_cluster(self) -> None:
        """Register with the shared store (Server.start, after the listeners)."""
        if self.cluster is not None:
            await self.cluster.start()

    async def close_cluster(self) -> None:
        """Leave the shared store (Server.close): this instance's slots are freed at once."""
        if self.cluster is not None:
            await self.cluster.close()

    # -------------------------------------------------------------- idle sweep

    def _schedule_idle_sweep(self) -> None:
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
            self._idle_sweep = None
        cfg = self.config
        timeouts = [cfg.limits.idle_timeout] + [r.idle_timeout or 0.0 for r in cfg.roles.values()]
        shortest = min((t for t in timeouts if t > 0), default=None)
        if shortest is not None and not self.draining:
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
                in_transaction = client.idle_status != IDLE
                log_event(
                    logging.INFO,
                    "idle_timeout",
                    role=role,
                    database=client.database,
                    idle=f"{idle:.1f}",
                    idle_timeout=timeout,
                    in_transaction=in_transaction,
                    client=client.peer,
                )
                exc = IdleInTransactionTimeout() if in_transaction else IdleSessionTimeout()
                client.terminate(exc)
        self._schedule_idle_sweep()

    # --------------------------------------------------------------- snapshots

    def counts(self) -> Counts:
        gate = self._gate
        # [server] workers: this worker's clients queued in the supervisor's Gate
        host_waiting = 0 if self.host is None else self.host.waiting
        return Counts(
            # [cluster]: clients waiting for the store's slots hold a local ticket meanwhile
            sessions_active=gate.total_active - (0 if self.cluster is None else self.cluster.waiting),
            clients_waiting=gate.total_waiting + host_waiting + (0 if self.cluster is None else self.cluster.waiting),
            clients_connected=len(self.clients),
            consoles=len(self.consoles),
            paused=gate.paused,
            draining=self.draining,
            logins_in_flight=self.logins.in_flight,
            logins_waiting=self.logins.waiting,
        )

    def role_limit(self, role: str) -> tuple[int, str]:
        """The role's effective limit and where it comes from (default, config, runtime, catalog)."""
        return self._gate.role_limit(role)

    def database_limit(self, database: str) -> tuple[int, str]:
        return self._gate.database_limit(database)

    def limit_rows(self) -> list[LimitRow]:
        """SHOW LIMITS: the total, then every role and database configured or in use.
        [cluster]: a client waiting for the store's slots counts as waiting, not active
        (it holds its local slot meanwhile)."""
        rows = self._gate.limit_rows()
        if self.host is not None and self.host.waiting:
            return _add_waiting(rows, self.host.pair_waiting(), held=False)
        if self.cluster is None or not self.cluster.waiting:
            return rows
        return _add_waiting(rows, self.cluster.pair_waiting(), held=True)

    def configured_role(self, role: str) -> bool:
        return self._gate.configured_role(role)

    def configured_database(self, database: str) -> bool:
        return self._gate.configured_database(database)

    def pair_counts(self) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
        """Slots held and waiters, per (role, database): what the gate counts, not the sockets."""
        gate = self._gate
        active = Counter(gate.pair_active)
        waiting = Counter((w.role, w.database) for w in gate.waiters())
        if self.host is not None:
            waiting.update(self.host.pair_waiting())
        if self.cluster is not None and self.cluster.waiting:
            held = self.cluster.pair_waiting()  # hold a local slot, wait for the store's
            active.subtract(held)
            waiting.update(held)
            active = +active
        return active, waiting

    def state_counts(self) -> Counter[str]:
        """Client sockets by state (``State`` values), plus ``admin`` for console sessions."""
        states = Counter(client.state.value for client in self.clients.values())
        states["admin"] = len(self.consoles)
        return states

    def bytes_relayed(self) -> tuple[int, int]:
        """Bytes from clients and to clients since start, live sessions included."""
        bytes_in, bytes_out = self.stats.bytes_in, self.stats.bytes_out
        for client in self.clients.values():
            bytes_in += client.bytes_in
            bytes_out += client.bytes_out
        return bytes_in, bytes_out

    def stats_rows(self) -> list[tuple[str, str]]:
        """SHOW STATS: every counter since start, and what is held and waiting now."""
        return stats.stats_rows(self.stats, self.counts(), self.bytes_relayed(), self.started_at)

    def client_rows(self) -> list[tuple[str, ...]]:
        """SHOW CLIENTS: every client socket and console session, longest idle first."""
        return stats.client_rows(self.clients.values(), self.consoles.values(), self._gate.address_count)

    def network_limits(self) -> dict[str, int]:
        """Each configured ``[addresses]`` network's per-address limit, longest prefix first."""
        return {str(n.network): n.max_connections for n in self._gate.rules.networks}

    def network_counts(self) -> dict[str, int]:
        """Client-address holds per configured ``[addresses]`` network (for /metrics)."""
        return dict(self._gate.network_active)

    def queue_rows(self) -> list[tuple[str, ...]]:
        """SHOW QUEUES: per (role, database): waiters, oldest wait, time to the next timeout, policy."""
        gate = self._gate
        store = () if self.cluster is None else self.cluster.waiters()
        waiters = gate.waiters() if self.host is None else self.host.waiters()
        return stats.queue_rows(waiters, self.loop.time(), gate.role_policy, store)

    def fault_rows(self) -> list[tuple[int, str, str, str, str, int, str, str, str]]:
        """SHOW FAULTS: id, kind, role, database, remaining, fired, state, source, rule."""
        return self.faults.table()

    def waiting_clients(self) -> Iterator[ClientConnection]:
        """Queued clients in arrival order (the demo's view)."""
        for waiter in self._gate.waiters() if self.host is None else self.host.waiters():
            client = waiter.context
            assert isinstance(client, ClientConnection)
            yield client


def _add_waiting(rows: list[LimitRow], pairs: Counter[tuple[str, str]], *, held: bool) -> list[LimitRow]:
    """SHOW LIMITS rows with ``pairs`` counted as waiting; ``held``: they hold a slot of the
    gate meanwhile ([cluster]), so they are taken off ``active`` too."""
    roles: Counter[str] = Counter()
    databases: Counter[str] = Counter()
    for (role, database), n in pairs.items():
        roles[role] += n
        databases[database] += n
    by_kind = {"role": roles, "database": databases}
    total = sum(pairs.values())
    out = []
    for row in rows:
        n = total if row.kind == "total" else by_kind[row.kind].get(row.name, 0)
        if n:
            row = dataclasses.replace(row, active=row.active - n if held else row.active, waiting=row.waiting + n)
        out.append(row)
    return out
