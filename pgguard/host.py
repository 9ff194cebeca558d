"""Host admission: ``[server] workers`` without ``[cluster]``, one Gate in the supervisor decides for every worker.

Theory
------
The supervisor (workers.py) owns the authoritative ``limits.Gate``, built from the same
configuration as every worker's; ``SharedGate`` is that owner. A worker's ``Control`` asks it
through ``HostAdmission`` (imported by ``control`` only in this mode), called at the same
points as the cluster hook, each behind one ``self.host`` test: the admission, ``release``,
``leave_queue``, a run-time limit change, plus the server process id of a session
(``session_key``) and the catalog limits of mirror mode. Because one Gate decides, every
invariant of ``limits`` holds across the workers as in one process: no limit is exceeded,
the queues are FIFO over every worker's clients, ``queue_timeout`` and ``max_queue`` bound the
one queue.

Frames (the workers' channel, JSON; short keys because there is one per admission):

- worker -> supervisor, request ``arrive {c: client id, r: role, d: database}``; the reply is
  ``{k: "a", t: ticket id, x: exempt}`` (admitted), ``{k: "q", w: seconds to its
  queue_timeout}`` (queued) or ``{k: "r", j: rejection}``. Handled synchronously in the
  supervisor, without a task: one round trip per login.
- supervisor -> worker, notices ``admitted {c, t}`` (a queued client got a slot),
  ``expired {c, j}`` (its queue_timeout: the worker answers with the same 53300) and, with
  ``[pool]``, ``free {l, n}`` to every worker when a client queues behind limit ``l`` (name
  ``n``): each worker closes its oldest idle warm session holding a slot of that limit, as
  one process does for its own waiters; and to one worker, when a warm session it parked
  (``parked``) holds a slot a client of any worker waits for. So a warm session on one
  worker never keeps a client of another waiting; the price is up to one warm session per
  worker closed for one waiter.
- worker -> supervisor, notices ``release {t}``, ``leave {c}`` (a queued client left),
  ``pid {t, p}`` (the server process of ticket t), ``parked {r, d}`` ([pool]: a warm
  session of (role, database) went idle, keeping its slot), ``catalog {roles, databases}``.

Races resolve toward giving back: an ``admitted`` for a client that left meanwhile is
answered with ``release``; a reply for a client that closed while it was asked is given back
the same way (``client.admitted`` of a gone client releases at once).

Each worker's own Gate counts the slots its sessions hold (``Gate.take``) and decides
nothing; its waiters are this module's. So SHOW LIMITS and ``/metrics`` on a worker show
that worker's share (the sum over the workers is the supervisor's count, never above a
limit), and the limit values are the same everywhere: the console's SET / RESET / SET POLICY
/ PAUSE / RESUME / RELOAD run on every worker and once on the supervisor's Gate.

A worker that dies (SIGKILL): its queued clients were its sockets, so they are gone (counted
in ``lost_waiters``); its tickets are *held* until its server sessions have ended, since the
server counts them until then. For a ticket whose server process id the worker reported:

- with ``[backend] monitor_dsn``: ``pg_stat_activity`` is read every ``MONITOR_INTERVAL``
  through one connection (opened only while something is held) and the ticket is released
  once its pid is no longer listed (the server's own view, wherever it runs);
- else, when the server is local (a Unix socket or a loopback address) and ``/proc/<pid>``
  is a ``postgres`` process: a pidfd is watched and the ticket released the moment that
  process exits;
- else, or without a pid (a session still logging in), or while
  ``monitor_dsn`` does not answer: after ``[backend] close_timeout`` (the time a live worker
  gives a server to close a session too).

Size: about 530 lines, one job: both ends of the host's one admission (each side's frames
are the other's handlers, as in workers.py's channel), kept together so that the protocol
is read in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import typing
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from .config import BackendConfig
from .errors import ShuttingDown
from .limits import Gate, Kind, Limit, Policy, Rejection, RejectReason, Rules, Ticket, Waiter
from .log import log_event
from .proxy import ClientConnection, State

__all__ = ["HostAdmission", "SharedGate", "decode_rejection", "encode_rejection", "local_backend"]

# A server process is ours to watch only when /proc says it is PostgreSQL's (a pid of
# another namespace, or one reused since, is not).
_POSTGRES_COMM: Final = "postgres"
# How often pg_stat_activity is read for a dead worker's server processes: a slot comes back
# at most this long after its session ended (the issue asks for 1 s), at one query per read.
MONITOR_INTERVAL: Final = 0.2
MONITOR_QUERY: Final = "SELECT pid FROM pg_catalog.pg_stat_activity WHERE pid = ANY($1::int[])"


def encode_rejection(rejection: Rejection) -> list[Any]:
    return [rejection.limit.value, rejection.name, rejection.value, rejection.cause.value, round(rejection.waited, 3)]


def decode_rejection(data: list[Any]) -> Rejection:
    limit, name, value, cause, waited = data
    return Rejection(Limit(limit), str(name), int(value), RejectReason(cause), float(waited))


def local_backend(backend: BackendConfig) -> bool:
    """True when the server runs on this host: a Unix socket directory or a loopback address."""
    host = backend.host
    if host.startswith("/") or host.startswith("@") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _owner(waiter: Waiter) -> tuple[int, int]:
    """The (worker, client id) a waiter of the shared Gate stands for."""
    worker, cid = typing.cast(tuple[int, int], waiter.context)
    return worker, cid


# ------------------------------------------------------------------ worker


class HostAdmission:
    """A worker's side: the control layer's hook that asks the supervisor's Gate."""

    def __init__(
        self,
        gate: Gate,
        loop: asyncio.AbstractEventLoop,
        *,
        call: Callable[..., bool],
        send: Callable[..., bool],
        start: Callable[[ClientConnection, Ticket, float], None],
        free_slot: Callable[[Limit, str], None],
        reject: Callable[[ClientConnection, Rejection], None],
        give_back: Callable[[Ticket], None],
        count_rejection: Callable[[RejectReason], None],
        count_queued: Callable[[], None],
    ) -> None:
        self._gate = gate  # this worker's: counts its slots, decides nothing
        self._loop = loop
        self._call = call  # call(op, on_reply, **fields): a request whose reply goes to on_reply (None: closed)
        self._send = send  # send(op, **fields): a notice; False when the channel is closed
        self._start = start
        self._free_slot = free_slot
        self._reject = reject
        self._give_back = give_back
        self._count_rejection = count_rejection
        self._count_queued = count_queued
        self._tickets: dict[Ticket, int] = {}  # local ticket -> the supervisor's ticket id
        self._waiters: dict[int, Waiter] = {}  # client id -> its waiter, oldest first
        self._seq = itertools.count()
        self._draining = False

    def arrive(self, client: ClientConnection) -> None:
        """Ask the supervisor's Gate for ``client`` (its state stays ADMITTING until the answer)."""
        arrived = self._loop.time()

        def answered(reply: dict[str, Any] | None) -> None:
            self._answered(client, arrived, reply)

        if not self._call("arrive", answered, c=client.id, r=client.role, d=client.database):
            self._answered(client, arrived, None)

    def _answered(self, client: ClientConnection, arrived: float, reply: dict[str, Any] | None) -> None:
        if reply is None:  # the supervisor is gone: this worker drains
            if client.state is not State.CLOSED:
                self._count_rejection(RejectReason.SHUTDOWN)
                client.reject(ShuttingDown())
            return
        kind = reply.get("k")
        if kind == "a":
            self._admit(client, int(reply["t"]), bool(reply.get("x")), arrived)
        elif kind == "q":
            if client.state is State.CLOSED or self._draining:
                self._send("leave", c=client.id)
                if client.state is not State.CLOSED:
                    self._count_rejection(RejectReason.SHUTDOWN)
                    client.reject(ShuttingDown())
                return
            now = self._loop.time()
            waiter = Waiter(client.role, client.database, next(self._seq), arrived, now + float(reply["w"]), client)
            self._waiters[client.id] = waiter
            self._count_queued()
            client.queued(waiter)
        elif kind == "r":
            self._reject(client, decode_rejection(reply["j"]))
        else:  # an error reply (a bug on the other side): the client still gets an answer
            log_event(logging.ERROR, "host_admission_failed", role=client.role, error=str(reply.get("error")))
            self._count_rejection(RejectReason.SHUTDOWN)
            client.reject(ShuttingDown())

    def _admit(self, client: ClientConnection, tid: int, exempt: bool, arrived: float) -> None:
        ticket = self._gate.take(client.role, client.database, exempt=exempt)
        self._tickets[ticket] = tid
        self._start(client, ticket, arrived)  # a client gone meanwhile gives it back at once

    def admitted(self, message: dict[str, Any]) -> None:
        """Notice: a client queued here got a slot (or left, and the slot goes back)."""
        waiter = self._waiters.pop(int(message["c"]), None)
        if waiter is None:  # left before the notice came
            self._send("release", t=message["t"])
            return
        waiter.state = Kind.ADMIT
        client = waiter.context
        assert isinstance(client, ClientConnection)
        self._admit(client, int(message["t"]), False, waiter.arrived)

    def free(self, message: dict[str, Any]) -> None:
        """Notice ([pool]): a client waits behind this limit; an idle warm session here may
        give its slot up."""
        self._free_slot(Limit(message["l"]), str(message["n"]))

    def expired(self, message: dict[str, Any]) -> None:
        """Notice: a client queued here reached its queue_timeout."""
        waiter = self._waiters.pop(int(message["c"]), None)
        if waiter is None:
            return
        waiter.state = Kind.REJECT
        client = waiter.context
        assert isinstance(client, ClientConnection)
        client.waiter = None
        self._reject(client, decode_rejection(message["j"]))

    def cancel(self, waiter: Waiter) -> bool:
        """A client queued here left: the supervisor forgets it. False: not one of ours."""
        client = waiter.context
        if not isinstance(client, ClientConnection) or self._waiters.get(client.id) is not waiter:
            return False
        del self._waiters[client.id]
        waiter.state = Kind.REJECT
        self._send("leave", c=client.id)
        return True

    def release(self, ticket: Ticket) -> None:
        """``ticket``'s session ended (before the local Gate forgets it)."""
        tid = self._tickets.pop(ticket, None)
        if tid is not None:
            self._send("release", t=tid)

    def backend_pid(self, ticket: Ticket, pid: int) -> None:
        """The server process of ``ticket``'s session: what the supervisor watches if this
        worker dies."""
        tid = self._tickets.get(ticket)
        if tid is not None:
            self._send("pid", t=tid, p=pid)

    def catalog(self, roles: dict[str, int], databases: dict[str, int]) -> None:
        self._send("catalog", roles=roles, databases=databases)

    def parked(self, role: str, database: str) -> None:
        """[pool]: a warm session of (role, database) went idle here, keeping its slot. A client
        that queued on another worker before it did was told to nobody (``free`` went out when
        it queued): the supervisor answers ``free`` if one waits behind a limit it holds."""
        self._send("parked", r=role, d=database)

    def shut(self) -> None:
        """Draining: every client queued here gets 57P03, as the Gate's waiters do."""
        self._draining = True
        for cid, waiter in list(self._waiters.items()):
            del self._waiters[cid]
            waiter.state = Kind.REJECT
            self._send("leave", c=cid)
            client = waiter.context
            assert isinstance(client, ClientConnection)
            client.waiter = None
            self._count_rejection(RejectReason.SHUTDOWN)
            client.reject(ShuttingDown())

    # -------------------------------------------------------------- snapshots

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def waiters(self) -> list[Waiter]:
        """Clients of this worker queued in the supervisor's Gate, oldest first."""
        return list(self._waiters.values())

    def pair_waiting(self) -> Counter[tuple[str, str]]:
        return Counter((w.role, w.database) for w in self._waiters.values())


# -------------------------------------------------------------- supervisor


class _Held:
    """A dead worker's ticket, kept until its server session has ended."""

    __slots__ = ("ticket", "pid", "fd", "timer")

    def __init__(self, ticket: Ticket, pid: int | None) -> None:
        self.ticket = ticket
        self.pid = pid  # watched in pg_stat_activity (monitor_dsn) while the timer is None
        self.fd: int | None = None
        self.timer: asyncio.TimerHandle | None = None


class SharedGate:
    """The supervisor's side: the one Gate of every worker, its tickets, queue deadlines and
    the tickets of dead workers held until their server sessions end."""

    def __init__(
        self,
        rules: Rules,
        backend: BackendConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        notify: Callable[[int, dict[str, Any]], bool],
        workers: int = 1,
        pooled: bool = False,
    ) -> None:
        self.gate = Gate(rules)
        self.workers = workers
        self.pooled = pooled  # [pool] reuse somewhere: a queued client asks for warm slots
        self.backend = backend
        self._loop = loop
        self._notify = notify  # notify(worker index, frame): False when that worker is gone
        self._ids = itertools.count(1)
        self._tickets: dict[int, tuple[int, Ticket]] = {}  # ticket id -> (worker, ticket)
        self._pids: dict[int, int] = {}  # ticket id -> its server process
        self._waiters: dict[tuple[int, int], Waiter] = {}  # (worker, client id) -> waiter
        self._held: dict[int, _Held] = {}  # ticket id -> a dead worker's ticket
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._monitor: asyncio.Task[None] | None = None
        self.lost_waiters = 0
        self.held_released = 0

    # ------------------------------------------------------------- requests

    def handle(self, worker: int, message: dict[str, Any]) -> dict[str, Any] | None:
        """A worker's request this class answers (``arrive``), at once; None for any other op."""
        if message.get("op") != "arrive":
            return None
        cid = int(message["c"])
        role, database = str(message["r"]), str(message["d"])
        now = self._loop.time()
        decision = self.gate.arrive(role, database, now, (worker, cid))
        if decision.kind is Kind.ADMIT:
            ticket = decision.ticket
            assert ticket is not None
            return {"k": "a", "t": self._register(worker, ticket), "x": int(ticket.exempt)}
        if decision.kind is Kind.QUEUE:
            waiter = decision.waiter
            assert waiter is not None
            self._waiters[(worker, cid)] = waiter
            self._schedule(waiter.deadline)
            if self.pooled:
                blocking = self.gate.blocking(role, database)
                if blocking is not None:
                    for index in range(self.workers):
                        self._notify(index, {"op": "free", "l": blocking.limit.value, "n": blocking.name})
            return {"k": "q", "w": round(waiter.deadline - now, 3)}
        assert decision.rejection is not None
        return {"k": "r", "j": encode_rejection(decision.rejection)}

    def notice(self, worker: int, message: dict[str, Any]) -> bool:
        """A worker's notice this class takes (release, leave, pid, catalog); False for others."""
        op = message.get("op")
        if op == "release":
            entry = self._tickets.get(int(message["t"]))
            if entry is not None and entry[0] == worker:
                self._release(int(message["t"]))
        elif op == "leave":
            waiter = self._waiters.pop((worker, int(message["c"])), None)
            if waiter is not None:
                self.gate.cancel(waiter)
        elif op == "pid":
            tid = int(message["t"])
            if tid in self._tickets:
                self._pids[tid] = int(message["p"])
        elif op == "parked":
            self._free_for(worker, str(message["r"]), str(message["d"]))
        elif op == "catalog":
            roles = {str(k): int(v) for k, v in dict(message["roles"]).items()}
            databases = {str(k): int(v) for k, v in dict(message["databases"]).items()}
            self._admit(self.gate.set_catalog_limits(roles, databases))
        else:
            return False
        return True

    def _free_for(self, worker: int, role: str, database: str) -> None:
        """A warm session of (role, database) is idle on ``worker``: if a waiter (of any worker)
        is blocked by a limit that session's slot counts on, ask that worker to free it."""
        if not self.gate.total_waiting:
            return
        for head in self.gate.queue_heads():
            blocking = self.gate.blocking(head.role, head.database)
            if blocking is None:
                continue
            limit = blocking.limit
            if limit is Limit.TOTAL or (limit is Limit.ROLE and blocking.name == role) or (
                limit is Limit.DATABASE and blocking.name == database
            ):
                self._notify(worker, {"op": "free", "l": limit.value, "n": blocking.name})
                return

    def _register(self, worker: int, ticket: Ticket) -> int:
        tid = next(self._ids)
        self._tickets[tid] = (worker, ticket)
        return tid

    def _release(self, tid: int) -> None:
        _, ticket = self._tickets.pop(tid)
        self._pids.pop(tid, None)
        self._admit(self.gate.release(ticket))

    def _admit(self, waiters: list[Waiter]) -> None:
        """Tell each admitted waiter's worker; a worker that is gone gives the slot back."""
        pending = list(waiters)
        while pending:
            waiter = pending.pop(0)
            worker, cid = _owner(waiter)
            self._waiters.pop((worker, cid), None)
            assert waiter.ticket is not None
            tid = self._register(worker, waiter.ticket)
            if not self._notify(worker, {"op": "admitted", "c": cid, "t": tid}):
                self._tickets.pop(tid)
                pending.extend(self.gate.release(waiter.ticket))

    # ------------------------------------------------------------- deadlines

    def _schedule(self, deadline: float) -> None:
        if self._deadline is not None and self._deadline <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._deadline = deadline
        self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = self._deadline = None
        for waiter, rejection in self.gate.expire(self._loop.time()):
            worker, cid = _owner(waiter)
            self._waiters.pop((worker, cid), None)
            self._notify(worker, {"op": "expired", "c": cid, "j": encode_rejection(rejection)})
        deadline = self.gate.next_deadline()
        if deadline is not None:
            self._schedule(deadline)

    # --------------------------------------------------------------- intents

    def set_limit(self, kind: str, name: str, value: int) -> None:
        gate = self.gate
        if kind == "role":
            self._admit(gate.set_role_limit(name, value))
        elif kind == "database":
            self._admit(gate.set_database_limit(name, value))
        else:
            self._admit(gate.set_total_limit(value))

    def reset_limit(self, kind: str, name: str) -> None:
        limit = {"role": Limit.ROLE, "database": Limit.DATABASE}.get(kind, Limit.TOTAL)
        self._admit(self.gate.reset_limit(limit, name))

    def set_policy(self, role: str, policy: Policy) -> None:
        self._admit(self.gate.set_role_policy(role, policy))

    def pause(self) -> None:
        self.gate.pause()

    def resume(self) -> None:
        self._admit(self.gate.resume())

    def reconfigure(self, rules: Rules, backend: BackendConfig, *, pooled: bool = False) -> None:
        """A reload: the new rules, run-time limits and policies dropped (as on every worker)."""
        self.backend = backend
        self.pooled = pooled
        self._admit(self.gate.reconfigure(rules))

    def runtime_limits(self) -> list[list[Any]]:
        """The SET LIMIT values in force, for a restarted worker to show: [kind, name, value]."""
        return [[limit.value, name, value] for (limit, name), value in self.gate.runtime_limits().items()]

    # ---------------------------------------------------------- worker death

    def worker_gone(self, worker: int) -> None:
        """Worker ``worker`` exited: its waiters are gone, its tickets are held until their
        server sessions end (see the module docstring)."""
        lost = [key for key in self._waiters if key[0] == worker]
        for key in lost:
            self.gate.cancel(self._waiters.pop(key))
        self.lost_waiters += len(lost)
        tids = [tid for tid, (w, _) in self._tickets.items() if w == worker]
        monitor = self.backend.monitor_dsn
        local = local_backend(self.backend)
        watched = 0
        for tid in tids:
            _, ticket = self._tickets.pop(tid)
            pid = self._pids.pop(tid, None)
            held = self._held[tid] = _Held(ticket, pid)
            if pid is not None and (monitor or (local and self._watch(tid, held, pid))):
                watched += 1
                continue
            self._grace(tid, held)
        if monitor and watched and (self._monitor is None or self._monitor.done()):
            self._monitor = self._loop.create_task(self._read_activity(monitor))
        if lost or tids:
            how = "monitor_dsn" if monitor else "pidfd" if local else "grace"
            log_event(
                logging.WARNING, "worker_slots_held", worker=worker, lost_waiters=len(lost),
                held=len(tids), watched=watched, by=how, grace=self.backend.close_timeout,
            )  # fmt: skip

    def _grace(self, tid: int, held: _Held) -> None:
        if held.timer is None:
            held.timer = self._loop.call_later(self.backend.close_timeout, self._unhold, tid)

    async def _read_activity(self, dsn: str) -> None:
        """Release held tickets as their pids leave pg_stat_activity (see the module
        docstring); if the server cannot be read, those left get the grace instead."""
        import asyncpg  # type: ignore[import-untyped]

        conn = None
        try:
            conn = await asyncpg.connect(
                dsn, timeout=self.backend.connect_timeout, statement_cache_size=0,
                server_settings={"application_name": "pgguard supervisor"},
            )  # fmt: skip
            while True:
                watched = {h.pid: tid for tid, h in self._held.items() if h.timer is None and h.pid is not None}
                if not watched:
                    return
                rows = await conn.fetch(MONITOR_QUERY, list(watched), timeout=self.backend.connect_timeout)
                alive = {row["pid"] for row in rows}
                for pid, tid in watched.items():
                    if pid not in alive:
                        self._unhold(tid)
                await asyncio.sleep(MONITOR_INTERVAL)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad DSN, the server away: the bounded grace instead
            log_event(logging.WARNING, "worker_slots_monitor_failed", error=str(exc) or type(exc).__name__)
            for tid, held in list(self._held.items()):
                self._grace(tid, held)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.terminate()

    def _watch(self, tid: int, held: _Held, pid: int) -> bool:
        """Release ``tid`` when server process ``pid`` exits; False when it cannot be watched
        (then the grace applies). A process already gone releases it at once."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._loop.call_soon(self._unhold, tid)  # ended already
            return True
        except (OSError, AttributeError):
            return False
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            comm = ""
        if comm != _POSTGRES_COMM:
            os.close(fd)
            return False
        held.fd = fd
        self._loop.add_reader(fd, self._unhold, tid)
        return True

    def _unhold(self, tid: int) -> None:
        held = self._held.pop(tid, None)
        if held is None:
            return
        if held.fd is not None:
            self._loop.remove_reader(held.fd)
            os.close(held.fd)
        if held.timer is not None:
            held.timer.cancel()
        self.held_released += 1
        self._admit(self.gate.release(held.ticket))

    @property
    def held(self) -> int:
        return len(self._held)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._monitor is not None:
            self._monitor.cancel()
        for tid in list(self._held):
            held = self._held.pop(tid)
            if held.fd is not None:
                self._loop.remove_reader(held.fd)
                with contextlib.suppress(OSError):
                    os.close(held.fd)
            if held.timer is not None:
                held.timer.cancel()
