"""Cluster admission: after the local Gate admits, take the session's slots in the shared lease store.

Theory
------
Imported by ``control`` only when ``[cluster]`` is configured (it imports redis-py through
``leases``). The local ``limits.Gate`` stays the first decision and the single seam: it
admits, queues or rejects exactly as without ``[cluster]``. A client the Gate admitted (a
``Ticket``) then needs a lease in the store on every limit that applies (total, role,
database, with the Gate's effective values as claims; exempt roles force; replication
sessions, which hold no slot, take no lease):

- ``Lease``: the session starts (``client.admitted``); the lease is remembered by ticket and
  given back when the ticket is released (``Control.release``).
- ``Blocked``, policy reject: the local ticket is given back through ``Control.release`` and the
  client gets PostgreSQL's 53300 for the blocking limit (``limits.Rejection``).
- ``Blocked``, policy queue: the client waits here, in a per-instance FIFO ordered by arrival,
  *keeping its local ticket*. Keeping it is what keeps FIFO: the Gate's local queue holds
  only later arrivals (anyone the Gate queued arrived after everyone it admitted), and a new
  arrival of a (role, database) that has clients waiting here joins the end of this FIFO
  without trying the store. The queue is retried, oldest first, when the store reports a
  release, an expiry, a limit change or a resync, and after any local release: never by
  polling. ``queue_timeout``, ``max_queue`` and ``max_queue_total`` bound it as they bound
  the Gate's queue (the Gate's waiters and these are counted together), and a timeout is
  answered with the same 53300.

Redis unavailable (``RedisUnavailable``, or the store already down): ``on_redis_failure``
``local`` admits while this instance's own leases stay within ``ceil(limit / live
instances)`` (`LeaseStore.fallback_limit`) and records them with `LeaseStore.adopt` (put into
Redis when it answers again); ``reject`` answers 57P03; ``open`` admits and adopts. The
change of state is logged (``cluster_fallback`` / ``cluster_recovered``) and counted. After
Redis answers again, sessions the store reports as no longer fitting (`Restored.lost`) are
closed rather than left running over the limit (57P01, `ClusterLeaseLost`, logged once as
``cluster_sessions_lost``).

Run-time limits are the store's: ``share_limit`` (SET LIMIT / RESET LIMIT here) and
``clear_limits`` (a reload here) queue the change and one task stores it, in order, keeping
it while Redis does not answer; every instance applies the events (``LimitChanged``,
``LimitsCleared``), and after a ``Resync`` (events may have been missed) reads the stored
limits and makes the Gate's run-time layer equal to them in one change.

Size: about 560 lines, one job: the cluster side of admission (leases for tickets, the
store's wait queue, its events and the run-time limits they carry); the store's protocol
is in ``leases``.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal

from .config import ClusterConfig
from .errors import ClusterLeaseLost, PgGuardError, RedisUnavailable, ShuttingDown
from .leases import (
    Blocked,
    Claim,
    ClusterEvent,
    InstanceRow,
    Lease,
    LeaseStore,
    LimitChanged,
    LimitsCleared,
    Released,
    Restored,
    Resync,
    StateChanged,
)
from .limits import Gate, Kind, Limit, Policy, Rejection, RejectReason, Ticket, Waiter
from .log import log_event
from .proxy import ClientConnection, State

__all__ = ["ClusterAdmission"]

# SHOW CLUSTER reads a snapshot of the store's instances, refreshed once per heartbeat
# interval by one call (the console's commands are synchronous).
_SNAPSHOT_MIN_S: Final = 0.5

_Outcome = Lease | Blocked | RedisUnavailable


class _Entry:
    """A client that the Gate admitted and that waits here for the store's slots."""

    __slots__ = ("waiter", "client", "ticket", "blocked", "timer", "order")

    def __init__(
        self, waiter: Waiter, client: ClientConnection, ticket: Ticket, blocked: Blocked, order: tuple[float, int]
    ) -> None:
        self.waiter = waiter
        self.client = client
        self.ticket = ticket
        self.blocked = blocked
        self.timer: asyncio.TimerHandle | None = None
        self.order = order


class ClusterAdmission:
    """The control layer's cluster hook: leases for admitted tickets, a FIFO for the blocked."""

    def __init__(
        self,
        config: ClusterConfig,
        gate: Gate,
        loop: asyncio.AbstractEventLoop,
        *,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        start: Callable[[ClientConnection, Ticket, float], None],
        reject: Callable[[ClientConnection, Rejection], None],
        give_back: Callable[[Ticket], None],
        count_rejection: Callable[[RejectReason], None],
        count_queued: Callable[[], None],
        apply_limit: Callable[[Limit, str, int | None], None],
        replace_limits: Callable[[dict[tuple[Limit, str], int]], None],
        end: Callable[[Ticket, PgGuardError], None],
    ) -> None:
        self.config = config
        self._gate = gate
        self._loop = loop
        self._spawn = spawn
        self._start = start
        self._reject = reject
        self._give_back = give_back
        self._count_rejection = count_rejection
        self._count_queued = count_queued
        self._apply_limit = apply_limit
        self._replace_limits = replace_limits
        self._end = end  # closes whatever holds a ticket: its client, or a warm session ([pool])
        self.store = LeaseStore.from_config(config, on_event=self._on_event)
        self._leases: dict[Ticket, Lease] = {}
        self._tickets: dict[str, Ticket] = {}  # lease id -> its ticket (which may change hands: [pool])
        self._held: Counter[str] = Counter()  # limit id -> leases this instance holds on it
        self._queue: list[_Entry] = []  # oldest first
        self._entries: dict[Waiter, _Entry] = {}
        self._pair_waiting: Counter[tuple[str, str]] = Counter()
        self._pair_blocked: dict[tuple[str, str], Blocked] = {}  # what the pair last waited on
        self._role_waiting: Counter[str] = Counter()
        self._seq = itertools.count()
        self._retrying = False
        self._again = False
        self._closed = False
        self.fallbacks = 0  # times the store became unavailable
        self.recoveries = 0
        self.lost_sessions = 0  # closed because their slots had been given away
        self.instances: list[InstanceRow] = []
        self._snapshot: asyncio.Task[None] | None = None
        # Run-time limit changes made here, in order, not yet stored in Redis: (limit, name,
        # value or None to remove it), or None for "remove them all" (a reload). Sent by one
        # task; kept while Redis does not answer and sent when it does (Resync).
        self._limit_ops: deque[tuple[Limit, str, int | None] | None] = deque()
        self._limits_task: asyncio.Task[None] | None = None
        self._limits_again = False
        self._limit_events = 0  # limit events heard: a read of the stored limits older than one is stale

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Register with the store; if Redis does not answer, start in fallback (logged)."""
        try:
            await self.store.start()
            # Subscribed by now, so a limit set from here on arrives as an event; those set
            # before (SET LIMIT on another instance) are read once.
            await self._sync_limits()
        except RedisUnavailable as exc:
            self.fallbacks += 1
            log_event(
                logging.WARNING, "cluster_fallback", policy=self.config.on_redis_failure, reason=exc.reason
            )
        else:
            log_event(
                logging.INFO, "cluster_join", instance=self.store.instance, live=self.store.live_instances
            )
        self._snapshot = self._loop.create_task(self._snapshot_loop())

    async def close(self) -> None:
        """Answer the waiters, stop the tasks and leave the store (its slots freed at once)."""
        self._closed = True
        self.shut()
        for task in (self._snapshot, self._limits_task):
            if task is not None:
                task.cancel()
        self._snapshot = self._limits_task = None
        await self.store.close()
        log_event(logging.INFO, "cluster_leave", instance=self.store.instance)

    def shut(self) -> None:
        """Draining: every client waiting here gets 57P03, as the Gate's waiters do."""
        for entry in list(self._queue):
            self._unqueue(entry, Kind.REJECT)
            self._give_back(entry.ticket)
            self._count_rejection(RejectReason.SHUTDOWN)
            entry.client.reject(ShuttingDown())

    # -------------------------------------------------------------- admission

    def admitted(self, client: ClientConnection, ticket: Ticket, arrived: float) -> None:
        """The Gate admitted ``client`` (``arrived``: loop time it arrived): take its leases."""
        if not ticket.counted:  # a walsender: no slot on any limit, so no lease either
            self._start(client, ticket, arrived)
            return
        pair = (ticket.role, ticket.database)
        if not ticket.exempt and self._pair_waiting[pair] and self._gate.role_policy(ticket.role) is Policy.QUEUE:
            self._wait(client, ticket, arrived, self._pair_blocked[pair])  # behind those waiting
            return
        self._spawn(self._admit(client, ticket, arrived))

    async def _admit(self, client: ClientConnection, ticket: Ticket, arrived: float) -> None:
        try:
            outcome = await self._take(ticket)
        except Exception as exc:  # a bug: the client must still get an answer and the slot back
            log_event(logging.ERROR, "cluster_admission_failed", role=client.role, error=repr(exc))
            self._give_back(ticket)
            self._refuse(client, RedisUnavailable(type(exc).__name__))
            return
        if isinstance(outcome, Lease):
            self._hold(ticket, outcome)
            self._start(client, ticket, arrived)
        elif isinstance(outcome, Blocked):
            if client.state is State.CLOSED:
                self._give_back(ticket)
            elif self._gate.role_policy(ticket.role) is Policy.REJECT:
                self._give_back(ticket)
                self._reject(client, _rejection(outcome, RejectReason.LIMIT))
            else:
                self._wait(client, ticket, arrived, outcome)
        else:
            self._give_back(ticket)
            self._refuse(client, outcome)

    def release(self, ticket: Ticket) -> None:
        """``ticket``'s session ended (called by ``Control.release`` before the Gate frees it)."""
        lease = self._leases.pop(ticket, None)
        if lease is None:
            return
        self._tickets.pop(lease.id, None)
        for claim in lease.claims:
            self._held[claim.id] -= 1
            if not self._held[claim.id]:
                del self._held[claim.id]  # names come from clients: keep only those in use
        if not self._closed:
            self._spawn(self.store.release(lease))
        self._kick()

    def cancel(self, waiter: Waiter) -> bool:
        """A client waiting here left: give its local ticket back. False: not one of ours."""
        entry = self._entries.get(waiter)
        if entry is None:
            return False
        self._unqueue(entry, Kind.REJECT)
        self._give_back(entry.ticket)
        return True

    def _claims(self, ticket: Ticket) -> tuple[Claim, ...]:
        gate = self._gate
        return (
            Claim(Limit.TOTAL, "", gate.total_limit()[0]),
            Claim(Limit.ROLE, ticket.role, gate.role_limit(ticket.role)[0]),
            Claim(Limit.DATABASE, ticket.database, gate.database_limit(ticket.database)[0]),
        )

    async def _take(self, ticket: Ticket) -> _Outcome:
        """The store's answer for ``ticket``, or the fallback's while Redis is unavailable."""
        claims = self._claims(ticket)
        store = self.store
        reason = store.down_reason
        if store.up:
            try:
                return await store.acquire(claims, force=ticket.exempt)
            except RedisUnavailable as exc:
                reason = exc.reason
        policy = self.config.on_redis_failure
        if ticket.exempt or policy == "open":
            return store.adopt(claims)
        if policy == "reject":
            return RedisUnavailable(reason)
        for claim in claims:  # local: this instance's share of each limit
            share = store.fallback_limit(claim.value)
            if share >= 0 and self._held[claim.id] >= share:
                return Blocked(claim.limit, claim.name, share, self._held[claim.id])
        return store.adopt(claims)

    def _hold(self, ticket: Ticket, lease: Lease) -> None:
        self._leases[ticket] = lease
        self._tickets[lease.id] = ticket
        for claim in lease.claims:
            self._held[claim.id] += 1

    def _refuse(self, client: ClientConnection, exc: RedisUnavailable) -> None:
        """on_redis_failure = reject: 57P03, counted and logged like any rejection."""
        self._count_rejection(RejectReason.LIMIT)
        log_event(
            logging.INFO, "reject", role=client.role, database=client.database,
            reason="cluster_unavailable", client=client.peer,
        )  # fmt: skip
        client.reject(exc)

    # ------------------------------------------------------------------ queue

    def _wait(self, client: ClientConnection, ticket: Ticket, arrived: float, blocked: Blocked) -> None:
        """Queue ``client`` (keeping its local ticket) or reject it as the Gate would."""
        if client.state is State.CLOSED:
            self._give_back(ticket)
            return
        rules = self._gate.rules
        rule = rules.roles.get(ticket.role)
        max_queue = rules.max_queue if rule is None or rule.max_queue is None else rule.max_queue
        timeout = rules.queue_timeout if rule is None or rule.queue_timeout is None else rule.queue_timeout
        now = self._loop.time()
        cause: RejectReason | None = None
        if self._role_waiting[ticket.role] + self._gate.role_waiting.get(ticket.role, 0) >= max_queue:
            cause = RejectReason.MAX_QUEUE
        elif len(self._queue) + self._gate.total_waiting >= rules.max_queue_total:
            cause = RejectReason.MAX_QUEUE_TOTAL
        elif arrived + timeout <= now:
            cause = RejectReason.QUEUE_TIMEOUT
        if cause is not None:
            self._give_back(ticket)
            self._reject(client, _rejection(blocked, cause, now - arrived))
            return
        seq = next(self._seq)
        waiter = Waiter(ticket.role, ticket.database, seq, arrived, arrived + timeout, client)
        waiter.ticket = ticket
        entry = _Entry(waiter, client, ticket, blocked, (arrived, seq))
        bisect.insort(self._queue, entry, key=lambda e: e.order)
        self._entries[waiter] = entry
        pair = (ticket.role, ticket.database)
        self._pair_waiting[pair] += 1
        self._pair_blocked[pair] = blocked
        self._role_waiting[ticket.role] += 1
        entry.timer = self._loop.call_at(waiter.deadline, self._expire, entry)
        if client.state is State.ADMITTING:
            self._count_queued()  # counted once: a Gate waiter was counted when it queued there
            client.queued(waiter)
        else:  # a Gate waiter the Gate just admitted: now it waits here
            client.waiter = waiter

    def _unqueue(self, entry: _Entry, state: Kind) -> None:
        waiter = entry.waiter
        waiter.state = state
        self._entries.pop(waiter, None)
        index = bisect.bisect_left(self._queue, entry.order, key=lambda e: e.order)
        if index < len(self._queue) and self._queue[index] is entry:
            del self._queue[index]
        pair = (waiter.role, waiter.database)
        self._pair_waiting[pair] -= 1
        if not self._pair_waiting[pair]:
            del self._pair_waiting[pair]
            self._pair_blocked.pop(pair, None)
        self._role_waiting[waiter.role] -= 1
        if not self._role_waiting[waiter.role]:
            del self._role_waiting[waiter.role]
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if entry.client.waiter is waiter:
            entry.client.waiter = None

    def _expire(self, entry: _Entry) -> None:
        entry.timer = None
        if not entry.waiter.waiting:
            return
        self._unqueue(entry, Kind.REJECT)
        self._give_back(entry.ticket)
        waited = self._loop.time() - entry.waiter.arrived
        self._reject(entry.client, _rejection(entry.blocked, RejectReason.QUEUE_TIMEOUT, waited))

    def _kick(self) -> None:
        """Retry the waiters (an event said slots may be free); one pass at a time."""
        if not self._queue or self._closed:
            return
        if self._retrying:
            self._again = True
            return
        self._retrying = True
        self._spawn(self._retry())

    async def _retry(self) -> None:
        try:
            while True:
                self._again = False
                blocked: set[tuple[str, str]] = set()
                for entry in list(self._queue):
                    key = (entry.ticket.role, entry.ticket.database)
                    if not entry.waiter.waiting or key in blocked:
                        continue
                    try:
                        outcome = await self._take(entry.ticket)
                    except Exception as exc:  # a bug: answer this client, keep serving the rest
                        log_event(logging.ERROR, "cluster_admission_failed", role=entry.client.role, error=repr(exc))
                        outcome = RedisUnavailable(type(exc).__name__)
                    if not entry.waiter.waiting:  # left, or timed out, meanwhile
                        if isinstance(outcome, Lease):
                            await self.store.release(outcome)
                        continue
                    if isinstance(outcome, Lease):
                        self._unqueue(entry, Kind.ADMIT)
                        self._hold(entry.ticket, outcome)
                        self._start(entry.client, entry.ticket, entry.waiter.arrived)
                    elif isinstance(outcome, Blocked):
                        entry.blocked = self._pair_blocked[key] = outcome
                        blocked.add(key)
                    else:
                        self._unqueue(entry, Kind.REJECT)
                        self._give_back(entry.ticket)
                        self._refuse(entry.client, outcome)
                if not self._again or not self._queue:
                    return
        finally:
            self._retrying = False

    # ----------------------------------------------------------------- events

    def _on_event(self, event: ClusterEvent) -> None:
        if isinstance(event, LimitChanged):
            self._limit_events += 1
            self._apply_limit(event.limit, event.name, event.value)
        elif isinstance(event, LimitsCleared):
            self._limit_events += 1
            self._replace_limits({})
        elif isinstance(event, StateChanged):
            if event.up:
                self.recoveries += 1
                log_event(logging.WARNING, "cluster_recovered", instance=self.store.instance, reason=event.reason)
            else:
                self.fallbacks += 1
                log_event(
                    logging.WARNING, "cluster_fallback", instance=self.store.instance,
                    policy=self.config.on_redis_failure, reason=event.reason,
                )  # fmt: skip
        elif isinstance(event, Restored):
            for over in event.over:
                log_event(
                    logging.WARNING, "cluster_overrun", limit=over.limit.value, name=over.name,
                    value=over.value, used=over.used,
                )  # fmt: skip
            lost = [t for t in (self._tickets.get(lease_id) for lease_id in event.lost) if t is not None]
            if lost:
                self.lost_sessions += len(lost)
                log_event(
                    logging.WARNING, "cluster_sessions_lost", instance=self.store.instance,
                    count=len(lost), kept=len(self._leases) - len(lost),
                )  # fmt: skip
            for ticket in lost:
                self._end(ticket, ClusterLeaseLost())
        elif isinstance(event, Resync):
            self._flush_limits()  # limit events may have been missed, or changes made here wait
        elif not isinstance(event, Released):
            return
        self._kick()

    # ------------------------------------------------------- run-time limits

    def share_limit(self, limit: Limit, name: str, value: int | None) -> None:
        """A run-time limit set (or removed: None) here, already in the local gate: store it,
        so every instance applies it (each hears the event); kept until Redis answers."""
        self._limit_ops.append((limit, name, value))
        self._flush_limits()

    def clear_limits(self) -> None:
        """A reload here (without keep_runtime): remove every stored run-time limit, so every
        instance goes back to its configured values; kept until Redis answers."""
        self._limit_ops.clear()  # anything not yet stored is superseded
        self._limit_ops.append(None)
        self._flush_limits()

    def _flush_limits(self) -> None:
        """Send the pending limit changes, then make the local run-time limits equal the
        store's (one task; asked again while it runs, it goes round once more)."""
        if self._closed:
            return
        if self._limits_task is not None and not self._limits_task.done():
            self._limits_again = True
            return
        self._limits_task = self._spawn(self._send_limits())

    async def _send_limits(self) -> None:
        while True:
            self._limits_again = False
            try:
                while self._limit_ops:
                    op = self._limit_ops[0]
                    if op is None:
                        await self.store.clear_limits()
                    else:
                        await self.store.set_limit(*op)
                    if self._limit_ops and self._limit_ops[0] is op:
                        self._limit_ops.popleft()
                await self._sync_limits()
            except RedisUnavailable as exc:
                log_event(
                    logging.WARNING, "cluster_set_limit_failed", reason=exc.reason,
                    pending=len(self._limit_ops),
                )  # fmt: skip
                return  # sent again on the next Resync (Redis answers again)
            except Exception as exc:  # a bug: say so, keep the changes for the next Resync
                log_event(logging.ERROR, "cluster_set_limit_failed", error=repr(exc), pending=len(self._limit_ops))
                return
            if not self._limits_again:
                return

    async def _sync_limits(self) -> None:
        """Read the stored run-time limits and make the local gate's equal (a missed event,
        a joining instance). A read overtaken by an event is read again; changes made here
        and not yet stored are sent first (the next pass). Raises `RedisUnavailable`."""
        for _ in range(3):
            heard = self._limit_events
            stored = await self.store.runtime_limits()
            if self._limit_ops:
                return  # our own changes first; _send_limits syncs after them
            if heard == self._limit_events:
                if stored != self._gate.runtime_limits():
                    self._replace_limits(stored)
                return

    # -------------------------------------------------------------- snapshots

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def waiters(self) -> list[Waiter]:
        """Clients waiting here for the store's slots, oldest first (SHOW QUEUES)."""
        return [entry.waiter for entry in self._queue]

    def pair_waiting(self) -> Counter[tuple[str, str]]:
        """Those clients per (role, database): each holds a local slot meanwhile."""
        return Counter(self._pair_waiting)

    @property
    def leases(self) -> int:
        return len(self._leases)

    @property
    def state(self) -> Literal["up", "fallback"]:
        return "up" if self.store.up else "fallback"

    def rows(self) -> list[tuple[str, str, str, str]]:
        """SHOW CLUSTER: every instance registered in the store (as of the last refresh,
        once per heartbeat interval): name, seconds since its last heartbeat, leases, state.
        This instance's row is live (its own leases and whether Redis answers)."""
        me = self.store.instance
        ttl = self.config.lease_ttl
        out: list[tuple[str, str, str, str]] = []
        for row in self.instances:
            if row.instance == me:
                continue
            state = "live" if row.expires_in > 0 else "expired"
            out.append((row.instance, f"{max(0.0, ttl - row.expires_in):.1f}", str(row.leases), state))
        renewed = self.store.renewed_at
        since = "" if renewed is None else f"{max(0.0, time.monotonic() - renewed):.1f}"
        state = "self" if self.store.up else f"self, fallback ({self.config.on_redis_failure})"
        out.append((me, since, str(len(self._leases)), state))
        return sorted(out)

    async def _snapshot_loop(self) -> None:
        interval = max(_SNAPSHOT_MIN_S, self.config.renew_every)
        while True:
            if self.store.up:
                try:
                    self.instances = await self.store.instances()
                except RedisUnavailable:
                    pass  # the store is marked down; SHOW CLUSTER says so
            await asyncio.sleep(interval)


def _rejection(blocked: Blocked, cause: RejectReason, waited: float = 0.0) -> Rejection:
    return Rejection(blocked.limit, blocked.name, blocked.value, cause, waited)
