"""Sans-IO admission control: per-role, per-database and total limits, FIFO wait queues, policies.

Theory
------
A *session* is identified by (role, database). Three limits apply to it: the role's, the
database's and the total; ``-1`` means unlimited and ``0`` nobody, as in PostgreSQL.
``Gate.arrive`` answers with a ``Decision``:

- ADMIT: every applicable limit had room and nobody of the same (role, database) was
  waiting; a ``Ticket`` now holds one slot on each limit.
- QUEUE: the role's policy is ``queue`` and its queue has room; a ``Waiter`` stands in the
  (role, database) FIFO until ``release``/a limit change admits it, ``expire`` times it
  out, or ``cancel`` removes it (the client left).
- REJECT: policy ``reject``, or the queue is full; a ``Rejection`` says which limit.

Sharing (weighted round-robin between pairs)
--------------------------------------------
When a slot frees, every (role, database) queue whose head now fits competes for it. Each
queue carries a virtual time ``vtime``; serving its head costs ``stride = 1 / weight`` of its
role (``[roles.NAME] weight``, default 1). The gate's clock ``_vtime`` is the tag of the
last waiter served. A queue's tag is ``max(vtime, _vtime)``: the lowest tag wins, ties go to
the oldest head. So over a long run pairs that keep waiting are served in proportion to
their weights, a pair that was blocked or idle brings no saved-up credit (its tag is clamped
to the clock, and a queue that empties is forgotten), and with one pair waiting nothing
changes (FIFO). Between two admissions of a pair P, another pair Q is served at most
``weight(Q) / weight(P) + 1`` times while P's head fits. Selection is one pass over the
waiting pairs, no allocation.

Reservations: ``[roles.NAME] reserved = n`` keeps n slots of the total for that role. A
role is blocked on the total when ``total_active + unused reservations of other roles >=
total``; the unused reservations are kept as one running sum (``_unused_reserved``).

Client addresses
----------------
A TCP client's address (``arrive(..., address=)``) takes an ``AddressHold`` before any other
limit: the longest matching ``[addresses."net"]`` rule or ``client_address_max_connections``
caps the holds of one address. A client over it waits in that address's own FIFO (the
*address stage*, policy queue) and enters its (role, database) queue only once it holds, so
a host at its cap never blocks the pair's queue for other hosts. The hold counts while the
client waits in its pair's queue and while it is admitted; it is released by ``leave`` when
the client's socket closes (not with the ticket: a reused server session outlives its
client). Per-address state exists only while the address has a hold or a waiter.

Invariants (checked by hypothesis stateful tests):

- no limit is ever exceeded by a non-exempt session, not even for an instant, and a
  reserved slot is never taken by another role;
- every Ticket releases its slots exactly once (a second ``release`` is a no-op);
- waiters with the same (role, database) are admitted strictly in arrival order; a release
  admits while some queue head fits, by the sharing rule above;
- a cancelled or expired waiter holds nothing.

Exempt roles are counted (so they show up) but never limited, like PostgreSQL superusers
are not bound by ``rolconnlimit``. Time is always passed in; this module keeps no clock.
The shell owns the futures and timers that act on the decisions.

Size: about 1,080 lines, one job: the admission decision (limits, sharing, reservations and
address holds), its override layers and its reports; splitting them would put the
invariants above in two places.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, TypeVar

from .errors import TooManyConnections

__all__ = [
    "UNLIMITED",
    "Policy",
    "Limit",
    "Kind",
    "RejectReason",
    "RoleRule",
    "NetworkRule",
    "Rules",
    "AddressHold",
    "client_ip",
    "Ticket",
    "Waiter",
    "Rejection",
    "Decision",
    "Gate",
    "LimitRow",
]

UNLIMITED: Final = -1
K = TypeVar("K")
# Effective per-role settings are memoised; role names come from clients, so the memo is
# cleared when it reaches this size instead of growing with every name ever presented.
ROLE_CACHE_MAX: Final = 4096


class Policy(StrEnum):
    QUEUE = "queue"
    REJECT = "reject"


class Limit(StrEnum):
    """Which limit; values are the config keys, used in logs and metric labels."""

    TOTAL = "max_connections"
    ROLE = "role_max_connections"
    DATABASE = "database_max_connections"
    ADDRESS = "client_address_max_connections"  # per client address ([addresses."net"] too)


class RejectReason(StrEnum):
    """Why a client was turned away; values are the ``reason`` of logs, metrics and SHOW STATS.

    The gate gives the first four; the shell the others.
    """

    # Hash as the plain string (C, not Enum's Python __hash__): a reason is a counter key on
    # every rejection, and equal strings and members must meet in the same dict slot.
    __hash__ = str.__hash__

    LIMIT = "limit"  # a full limit, policy reject
    MAX_QUEUE = "max_queue"  # the role's queue is full
    MAX_QUEUE_TOTAL = "max_queue_total"  # every queue together is full
    QUEUE_TIMEOUT = "queue_timeout"
    MAX_CLIENT_CONNECTIONS = "max_client_connections"  # too many client sockets at all
    SHUTDOWN = "shutdown"  # draining
    FAULT = "fault"  # an injected fault rule


class Kind(StrEnum):
    ADMIT = "admit"
    QUEUE = "queue"
    REJECT = "reject"


@dataclass(frozen=True, slots=True, kw_only=True)
class RoleRule:
    """Per-role settings; ``None`` means "use the default from ``Rules``"."""

    max_connections: int | None = None
    policy: Policy | None = None
    queue_timeout: float | None = None
    max_queue: int | None = None
    weight: float = 1.0  # share of a contended shared limit (see Sharing)
    reserved: int = 0  # slots of the total only this role may take


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkRule:
    """``[addresses."net"]``: the per-address limit (and policy) for addresses in ``network``."""

    network: IPNetwork
    max_connections: int = UNLIMITED
    policy: Policy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rules:
    """Everything the gate needs from the configuration. Built by ``config``; immutable."""

    max_connections: int = UNLIMITED
    role_max_connections: int = UNLIMITED
    database_max_connections: int = UNLIMITED
    policy: Policy = Policy.QUEUE
    queue_timeout: float = 30.0
    max_queue: int = 1000
    max_queue_total: int = 10000  # waiters across every role and database
    exempt_roles: frozenset[str] = frozenset()
    roles: Mapping[str, RoleRule] = field(default_factory=dict)
    databases: Mapping[str, int] = field(default_factory=dict)
    client_address_max_connections: int = UNLIMITED  # sessions per client address
    networks: tuple[NetworkRule, ...] = ()  # longest prefix first (config sorts them)


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a client address (``::ffff:a.b.c.d`` read as IPv4), None if it is not one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AddressHold:
    """A client's hold on its address's count: ``held`` once it counts, until ``Gate.leave``.

    Owned by the client connection (released when its socket closes). ``key`` is the address,
    ``network`` the matching ``[addresses]`` rule's text (or "" for the default)."""

    __slots__ = ("key", "network", "held")

    def __init__(self, key: str, network: str) -> None:
        self.key = key
        self.network = network
        self.held = False

    def __repr__(self) -> str:
        return f"AddressHold({self.key!r}, held={self.held})"


class _Address:
    """Per-address state, alive only while the address has a hold or a waiter."""

    __slots__ = ("active", "queue", "limit", "policy", "network")

    def __init__(self, limit: int, policy: Policy | None, network: str) -> None:
        self.active = 0
        self.queue: deque[Waiter] = deque()
        self.limit = limit
        self.policy = policy
        self.network = network


class _Queue(deque["Waiter"]):
    """One (role, database) FIFO and its virtual time (see Sharing above)."""

    __slots__ = ("vtime",)

    def __init__(self, vtime: float) -> None:
        super().__init__()
        self.vtime = vtime


class Ticket:
    """One admitted session's hold on its slots. Released exactly once through ``Gate.release``."""

    __slots__ = ("role", "database", "exempt", "released", "counted")

    def __init__(self, role: str, database: str, exempt: bool, counted: bool = True) -> None:
        self.role = role
        self.database = database
        self.exempt = exempt
        self.released = False
        # False for a replication (walsender) session: it holds no slot on any limit.
        self.counted = counted

    def __repr__(self) -> str:
        return f"Ticket({self.role!r}, {self.database!r}, released={self.released})"


class Waiter:
    """A queued client. ``context`` is the shell's (its session); the core never looks at it."""

    __slots__ = (
        "role", "database", "seq", "arrived", "deadline", "state", "ticket", "context", "hold"
    )  # fmt: skip

    def __init__(
        self, role: str, database: str, seq: int, arrived: float, deadline: float, context: object
    ) -> None:
        self.role = role
        self.database = database
        self.seq = seq
        self.arrived = arrived
        self.deadline = deadline
        self.state: Kind | None = None  # None while waiting; ADMIT or REJECT when done
        self.ticket: Ticket | None = None
        self.context = context
        # The client's address hold; not ``held`` while it waits in its address's own queue.
        self.hold: AddressHold | None = None

    @property
    def in_address_stage(self) -> bool:
        return self.hold is not None and not self.hold.held and self.state is None

    @property
    def waiting(self) -> bool:
        return self.state is None

    def __lt__(self, other: Waiter) -> bool:  # heap tie-break
        return self.seq < other.seq

    def __repr__(self) -> str:
        return f"Waiter({self.role!r}, {self.database!r}, seq={self.seq}, state={self.state})"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a client is turned away: which limit is full, and the cause."""

    limit: Limit
    name: str  # the role or database name (empty for the total; the network for an address)
    value: int  # the limit's value when it was applied
    cause: RejectReason
    waited: float = 0.0

    @property
    def message(self) -> str:
        """PostgreSQL's own message for this limit (postinit.c / miscinit.c / proc.c)."""
        if self.limit is Limit.ROLE:
            return f'too many connections for role "{self.name}"'
        if self.limit is Limit.DATABASE:
            return f'too many connections for database "{self.name}"'
        # The total, a reservation of another role (see DOCS: PostgreSQL 16's own text names
        # its pg_use_reserved_connections role, which pgguard's reservations are not), or a
        # client address (PostgreSQL has no per-host limit and so no text of its own).
        return "sorry, too many clients already"

    @property
    def detail(self) -> str:
        """The optional DETAIL (``[errors] detail``): which limit, its value, the wait."""
        what = f"{self.limit.value}={self.value}"
        if self.cause is RejectReason.QUEUE_TIMEOUT:
            return f"pgguard: {what}; waited {self.waited:.1f}s in queue (queue_timeout)"
        if self.cause in (RejectReason.MAX_QUEUE, RejectReason.MAX_QUEUE_TOTAL):
            return f"pgguard: {what}; wait queue is full ({self.cause})"
        return f"pgguard: {what}; policy is reject"

    def error(self, *, with_detail: bool = False) -> TooManyConnections:
        return TooManyConnections(self.message, detail=self.detail if with_detail else None)


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    ticket: Ticket | None = None
    waiter: Waiter | None = None
    rejection: Rejection | None = None
    hold: AddressHold | None = None  # the client's address hold (ADMIT, QUEUE): give to ``leave``


@dataclass(frozen=True, slots=True)
class LimitRow:
    """One line of SHOW LIMITS: a limit's value, use and where the value came from."""

    kind: str  # "total", "role", "database"
    name: str
    limit: int
    active: int
    waiting: int
    policy: str
    source: str  # "default", "config", "runtime", "catalog"


@dataclass(frozen=True, slots=True)
class _Effective:
    max_connections: int
    policy: Policy
    queue_timeout: float
    max_queue: int
    exempt: bool
    stride: float  # 1 / weight
    reserved: int


class Gate:
    """Admission control over one ``Rules`` plus run-time and catalog overrides."""

    def __init__(self, rules: Rules | None = None) -> None:
        self._rules = rules or Rules()
        # Override layers: run-time (SET LIMIT / SET POLICY) wins over config, which wins
        # over the catalog (mirror mode), which wins over the defaults.
        self._runtime_roles: dict[str, int] = {}
        self._runtime_policies: dict[str, Policy] = {}
        self._runtime_databases: dict[str, int] = {}
        self._runtime_total: int | None = None
        self._catalog_roles: dict[str, int] = {}
        self._catalog_databases: dict[str, int] = {}
        self._role_cache: dict[str, _Effective] = {}

        self.total_active = 0
        self.role_active: dict[str, int] = {}
        self.database_active: dict[str, int] = {}
        self.pair_active: dict[tuple[str, str], int] = {}  # per (role, database), for metrics
        self.role_waiting: dict[str, int] = {}
        self.database_waiting: dict[str, int] = {}
        self.total_waiting = 0
        self.paused = False

        self._queues: dict[tuple[str, str], _Queue] = {}  # every head is waiting
        self._deadlines: list[tuple[float, Waiter]] = []
        self._seq = itertools.count()
        self._vtime = 0.0  # the sharing clock (see Sharing); 0 again whenever nobody waits
        # Reservations: role -> n (config), and the sum of what their roles do not use.
        self._reserved: dict[str, int] = {}
        self._unused_reserved = 0
        # Client addresses: per address while it has a hold or a waiter (client data, so
        # dropped with its last one); per configured network (config data) for /metrics.
        self._addresses: dict[str, _Address] = {}
        self.network_active: dict[str, int] = {}
        self._reserve()

    # ------------------------------------------------------------------ rules

    @property
    def rules(self) -> Rules:
        return self._rules

    def reconfigure(self, rules: Rules, *, keep_runtime: bool = False) -> list[Waiter]:
        """Apply new rules (a reload). Run-time overrides are dropped unless ``keep_runtime``.

        Returns the waiters the new rules admit at once (never kills anyone).
        """
        self._rules = rules
        if not keep_runtime:
            self._runtime_roles.clear()
            self._runtime_policies.clear()
            self._runtime_databases.clear()
            self._runtime_total = None
        self._reserve()
        self._role_cache.clear()
        admitted = self._readdress()
        return admitted + self._changed()

    def _reserve(self) -> None:
        """Recompute the reservations and their unused sum from the rules and the counts."""
        exempt = self._rules.exempt_roles
        self._reserved = {
            name: rule.reserved
            for name, rule in self._rules.roles.items()
            if rule.reserved and name not in exempt
        }
        self._unused_reserved = sum(
            max(0, n - self.role_active.get(name, 0)) for name, n in self._reserved.items()
        )
        self.network_active = {str(n.network): 0 for n in self._rules.networks} | {
            k: v for k, v in self.network_active.items() if v
        }

    def set_role_limit(self, role: str, value: int) -> list[Waiter]:
        self._runtime_roles[role] = value
        return self._changed()

    def set_database_limit(self, database: str, value: int) -> list[Waiter]:
        self._runtime_databases[database] = value
        return self._changed()

    def set_total_limit(self, value: int) -> list[Waiter]:
        self._runtime_total = value
        return self._changed()

    def reset_limit(self, limit: Limit, name: str = "") -> list[Waiter]:
        """Remove one run-time limit (RESET LIMIT): the configured value applies again."""
        if limit is Limit.ROLE:
            self._runtime_roles.pop(name, None)
        elif limit is Limit.DATABASE:
            self._runtime_databases.pop(name, None)
        else:
            self._runtime_total = None
        return self._changed()

    def set_runtime_limits(self, limits: Mapping[tuple[Limit, str], int]) -> list[Waiter]:
        """Make the run-time limits exactly ``limits`` in one change (run-time policies stay):
        ``{}`` drops them all. Cluster mode keeps this layer equal to the shared store's."""
        self._runtime_roles = {n: v for (k, n), v in limits.items() if k is Limit.ROLE}
        self._runtime_databases = {n: v for (k, n), v in limits.items() if k is Limit.DATABASE}
        self._runtime_total = next((v for (k, _), v in limits.items() if k is Limit.TOTAL), None)
        return self._changed()

    def runtime_limits(self) -> dict[tuple[Limit, str], int]:
        """The run-time limits in force (SET LIMIT), by (kind, name)."""
        out: dict[tuple[Limit, str], int] = {(Limit.ROLE, n): v for n, v in self._runtime_roles.items()}
        out.update({(Limit.DATABASE, n): v for n, v in self._runtime_databases.items()})
        if self._runtime_total is not None:
            out[(Limit.TOTAL, "")] = self._runtime_total
        return out

    def runtime_policies(self) -> dict[str, Policy]:
        """The SET POLICY overrides in force (role -> policy)."""
        return dict(self._runtime_policies)

    def set_role_policy(self, role: str, policy: Policy) -> list[Waiter]:
        self._runtime_policies[role] = policy
        return self._changed()

    def set_catalog_limits(
        self, roles: Mapping[str, int], databases: Mapping[str, int]
    ) -> list[Waiter]:
        """Mirror mode: limits read from ``pg_roles.rolconnlimit`` / ``pg_database.datconnlimit``."""
        self._catalog_roles = dict(roles)
        self._catalog_databases = dict(databases)
        return self._changed()

    def pause(self) -> None:
        """Admit nobody new (except exempt roles); arrivals queue whatever their policy."""
        self.paused = True

    def resume(self) -> list[Waiter]:
        self.paused = False
        return self._drain()

    def _changed(self) -> list[Waiter]:
        self._role_cache.clear()
        return self._drain()

    def _role(self, role: str) -> _Effective:
        eff = self._role_cache.get(role)
        if eff is None:
            if len(self._role_cache) >= ROLE_CACHE_MAX:
                self._role_cache.clear()
            eff = self._role_cache[role] = self._compute_role(role)
        return eff

    def _compute_role(self, role: str) -> _Effective:
        r = self._rules
        rule = r.roles.get(role) or RoleRule()
        limit = self._runtime_roles.get(role)
        if limit is None:
            limit = rule.max_connections
        if limit is None:
            limit = self._catalog_roles.get(role, r.role_max_connections)
        return _Effective(
            max_connections=limit,
            policy=self._runtime_policies.get(role) or rule.policy or r.policy,
            queue_timeout=r.queue_timeout if rule.queue_timeout is None else rule.queue_timeout,
            max_queue=r.max_queue if rule.max_queue is None else rule.max_queue,
            exempt=role in r.exempt_roles,
            stride=1.0 / rule.weight,
            reserved=self._reserved.get(role, 0),
        )

    def role_limit(self, role: str) -> tuple[int, str]:
        """The role's effective limit and its source."""
        if role in self._runtime_roles:
            return self._runtime_roles[role], "runtime"
        rule = self._rules.roles.get(role)
        if rule is not None and rule.max_connections is not None:
            return rule.max_connections, "config"
        if role in self._catalog_roles:
            return self._catalog_roles[role], "catalog"
        return self._rules.role_max_connections, "default"

    def database_limit(self, database: str) -> tuple[int, str]:
        """The database's effective limit and its source."""
        if database in self._runtime_databases:
            return self._runtime_databases[database], "runtime"
        if database in self._rules.databases:
            return self._rules.databases[database], "config"
        if database in self._catalog_databases:
            return self._catalog_databases[database], "catalog"
        return self._rules.database_max_connections, "default"

    def total_limit(self) -> tuple[int, str]:
        if self._runtime_total is not None:
            return self._runtime_total, "runtime"
        return self._rules.max_connections, "config"

    def configured_role(self, role: str) -> bool:
        """True for a role named by config, a run-time SET or the catalog (not only by clients)."""
        return (
            role in self._rules.roles
            or role in self._runtime_roles
            or role in self._runtime_policies
            or role in self._catalog_roles
            or role in self._rules.exempt_roles
        )

    def configured_database(self, database: str) -> bool:
        """True for a database named by config, a run-time SET or the catalog."""
        return (
            database in self._rules.databases
            or database in self._runtime_databases
            or database in self._catalog_databases
        )

    def role_policy(self, role: str) -> Policy:
        return self._role(role).policy

    # -------------------------------------------------------------- admission

    def _blocking(self, role: str, database: str) -> Rejection | None:
        """The first full limit for (role, database), in PostgreSQL's check order, or None."""
        total, _ = self.total_limit()
        eff = self._role(role)
        if total != UNLIMITED:
            # Other roles' unused reservations are not this role's to take (its own are).
            used = self.total_active + self._unused_reserved
            if eff.reserved:
                used -= max(0, eff.reserved - self.role_active.get(role, 0))
            if used >= total:
                return Rejection(Limit.TOTAL, "", total, RejectReason.LIMIT)
        limit = eff.max_connections
        if limit != UNLIMITED and self.role_active.get(role, 0) >= limit:
            return Rejection(Limit.ROLE, role, limit, RejectReason.LIMIT)
        limit, _ = self.database_limit(database)
        if limit != UNLIMITED and self.database_active.get(database, 0) >= limit:
            return Rejection(Limit.DATABASE, database, limit, RejectReason.LIMIT)
        return None

    def blocking(self, role: str, database: str) -> Rejection | None:
        """The first full limit for (role, database) now, or None (pool.py: which idle session to close)."""
        return self._blocking(role, database)

    def exceeded(self, role: str, database: str) -> bool:
        """True when (role, database) holds more slots than a limit allows now (one was lowered
        under the count): a slot may not pass to another session of the pair (pool.py)."""
        if self._role(role).exempt:
            return False
        total, _ = self.total_limit()
        if total != UNLIMITED and self.total_active > total:
            return True
        limit = self._role(role).max_connections
        if limit != UNLIMITED and self.role_active.get(role, 0) > limit:
            return True
        limit, _ = self.database_limit(database)
        return limit != UNLIMITED and self.database_active.get(database, 0) > limit

    def queue_heads(self) -> list[Waiter]:
        """The oldest waiter of every (role, database) that has one."""
        return [queue[0] for queue in self._queues.values()]

    def hand_over(self, role: str, database: str, accept: Callable[[Waiter], bool]) -> Waiter | None:
        """The oldest waiter of (role, database), if ``accept`` takes it, out of the queue as admitted.

        For a slot that passes from one session to the next of the same pair (a reused server
        session, pool.py): the ticket moves with it, so no count changes and no limit can be
        exceeded. None when paused or nobody of the pair waits.

        A hand-over is a release plus an admission in one: it follows the sharing rule, so it
        returns None (the slot should be freed instead) when, with the slot free, another
        pair's head would be served first.
        """
        key = (role, database)
        queue = self._queues.get(key)
        if queue is None or self.paused or not accept(queue[0]):
            return None
        # With the slot free, would the drain serve this pair? (Also False when its head
        # would not fit: a limit or a reservation lowered under the pair's count.)
        self._count(role, database, -1)
        try:
            fair = self._pick() is queue
        finally:
            self._count(role, database, 1)
        if not fair:
            return None
        waiter = queue.popleft()
        self._served(queue, waiter)
        self._unqueue(waiter, Kind.ADMIT)
        self._trim(key)
        return waiter

    def _take(self, role: str, database: str, exempt: bool) -> Ticket:
        self._count(role, database, 1)
        return Ticket(role, database, exempt)

    def _count(self, role: str, database: str, delta: int) -> None:
        """Add ``delta`` (+1 or -1) to every count of (role, database), reservations included."""
        self.total_active += delta
        before = self.role_active.get(role, 0)
        _add(self.role_active, role, delta)
        _add(self.database_active, database, delta)
        _add(self.pair_active, (role, database), delta)
        reserved = self._reserved.get(role)
        if reserved:
            # One slot of the role's reservation starts or stops being used.
            if delta > 0 and before < reserved:
                self._unused_reserved -= 1
            elif delta < 0 and before <= reserved:
                self._unused_reserved += 1

    def take(self, role: str, database: str, *, exempt: bool = False) -> Ticket:
        """Count a slot that another gate granted, checking no limit: ``[server] workers``
        without ``[cluster]``, where the supervisor's Gate decides and each worker's Gate
        counts what that worker holds (host.py). Released through ``release`` as any ticket."""
        return self._take(role, database, exempt)

    def arrive(
        self,
        role: str,
        database: str,
        now: float,
        context: object = None,
        *,
        replication: bool = False,
        address: str | None = None,
    ) -> Decision:
        """Decide for a new client: admit (with a Ticket), queue (a Waiter) or reject.

        A ``replication`` (walsender) session is admitted and counted on no limit: PostgreSQL
        counts walsenders against ``max_wal_senders``, not against max_connections or a
        role's or database's CONNECTION LIMIT (nor on an address).

        ``address``: the client's IP address (TCP), None for a Unix-socket client (not
        limited by address). Past its address limit the client waits in the address's own
        queue (or is rejected, per the policy) before any other limit is looked at. An ADMIT
        or QUEUE decision carries the client's ``hold``: give it to ``leave`` when the
        client's socket closes.
        """
        if replication:
            return Decision(Kind.ADMIT, ticket=Ticket(role, database, True, counted=False))
        eff = self._role(role)
        hold = None
        if address is not None:
            entry = self._addresses.get(address)
            if entry is None:
                entry = self._addresses[address] = self._address_entry(address)
            hold = AddressHold(address, entry.network)
            if not eff.exempt and (entry.queue or (entry.limit != UNLIMITED and entry.active >= entry.limit)):
                return self._address_stage(role, database, now, context, eff, entry, hold)
            self._hold(entry, hold)
        if eff.exempt:
            return Decision(Kind.ADMIT, ticket=self._take(role, database, True), hold=hold)
        queue = self._queues.get((role, database))
        blocking = None
        if not self.paused and not queue:
            blocking = self._blocking(role, database)
            if blocking is None:
                return Decision(Kind.ADMIT, ticket=self._take(role, database, False), hold=hold)
        if blocking is None:  # paused, or others of the same (role, database) are ahead
            blocking = self._blocking(role, database) or Rejection(
                Limit.ROLE, role, eff.max_connections, RejectReason.LIMIT
            )
        rejection = self._refusal(role, eff, blocking, eff.policy)
        if rejection is not None:
            if hold is not None:
                self._unhold(hold)  # nobody waits on this address (or it would have queued)
            return Decision(Kind.REJECT, rejection=rejection)
        waiter = self._new_waiter(role, database, now, context, eff)
        waiter.hold = hold
        self._enqueue(waiter)
        return Decision(Kind.QUEUE, waiter=waiter, hold=hold)

    def _refusal(
        self, role: str, eff: _Effective, blocking: Rejection, policy: Policy
    ) -> Rejection | None:
        """The rejection for a client that cannot be admitted now, or None: it may queue."""
        if policy is Policy.REJECT and not self.paused:
            return blocking
        if self.role_waiting.get(role, 0) >= eff.max_queue:
            return _with_cause(blocking, RejectReason.MAX_QUEUE)
        if self.total_waiting >= self._rules.max_queue_total:
            return _with_cause(blocking, RejectReason.MAX_QUEUE_TOTAL)
        return None

    def _new_waiter(
        self, role: str, database: str, now: float, context: object, eff: _Effective
    ) -> Waiter:
        waiter = Waiter(role, database, next(self._seq), now, now + eff.queue_timeout, context)
        self.role_waiting[role] = self.role_waiting.get(role, 0) + 1
        self.database_waiting[database] = self.database_waiting.get(database, 0) + 1
        self.total_waiting += 1
        heapq.heappush(self._deadlines, (waiter.deadline, waiter))
        return waiter

    def _enqueue(self, waiter: Waiter) -> None:
        """Append ``waiter`` to its (role, database) queue; a new queue starts at the clock."""
        key = (waiter.role, waiter.database)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(self._vtime)
        queue.append(waiter)

    # -------------------------------------------------------- client addresses

    def _address_entry(self, address: str) -> _Address:
        """The limit for ``address``: the longest matching network's, else the default."""
        r = self._rules
        if r.networks:
            ip = client_ip(address)
            if ip is not None:
                for net in r.networks:
                    if ip.version == net.network.version and ip in net.network:
                        return _Address(net.max_connections, net.policy, str(net.network))
        return _Address(r.client_address_max_connections, None, "")

    def _address_stage(
        self,
        role: str,
        database: str,
        now: float,
        context: object,
        eff: _Effective,
        entry: _Address,
        hold: AddressHold,
    ) -> Decision:
        """Queue (or reject) a client whose address is at its limit or has others waiting."""
        blocking = Rejection(Limit.ADDRESS, entry.network, entry.limit, RejectReason.LIMIT)
        rejection = self._refusal(role, eff, blocking, entry.policy or eff.policy)
        if rejection is not None:
            self._forget_address(hold.key, entry)
            return Decision(Kind.REJECT, rejection=rejection)
        waiter = self._new_waiter(role, database, now, context, eff)
        waiter.hold = hold
        entry.queue.append(waiter)
        return Decision(Kind.QUEUE, waiter=waiter, hold=hold)

    def _hold(self, entry: _Address, hold: AddressHold) -> None:
        hold.held = True
        entry.active += 1
        if hold.network:
            self.network_active[hold.network] = self.network_active.get(hold.network, 0) + 1

    def _unhold(self, hold: AddressHold) -> _Address | None:
        """Drop a held hold's count; returns the address's entry if it is still needed."""
        hold.held = False
        entry = self._addresses[hold.key]
        entry.active -= 1
        if hold.network:
            self.network_active[hold.network] -= 1
        return self._forget_address(hold.key, entry)

    def _forget_address(self, key: str, entry: _Address) -> _Address | None:
        queue = entry.queue
        while queue and not queue[0].waiting:
            queue.popleft()
        if entry.active or queue:
            return entry
        del self._addresses[key]
        return None

    def take_hold(self, address: str, role: str) -> AddressHold | None:
        """A hold for a client that bypasses ``arrive`` (a warm reused session, pool.py), or
        None when its address is at its limit or has waiters (then it must ``arrive``)."""
        entry = self._addresses.get(address)
        if entry is None:
            entry = self._addresses[address] = self._address_entry(address)
        hold = AddressHold(address, entry.network)
        if not self._role(role).exempt and (
            entry.queue or (entry.limit != UNLIMITED and entry.active >= entry.limit)
        ):
            self._forget_address(address, entry)
            return None
        self._hold(entry, hold)
        return hold

    def leave(self, hold: AddressHold | None) -> list[Waiter]:
        """The client owning ``hold`` closed: free its address slot (once; again, or a hold
        that never counted, is a no-op). Returns the waiters this admits."""
        if hold is None or not hold.held:
            return []
        entry = self._unhold(hold)
        if entry is None or not entry.queue:
            return []
        return self._advance(hold.key, entry)

    def _advance(self, key: str, entry: _Address) -> list[Waiter]:
        """Move the address's waiters that now fit its limit on to their pairs' queues
        (admitting those whose pair has room and nobody ahead)."""
        admitted: list[Waiter] = []
        queue = entry.queue
        while queue and (entry.limit == UNLIMITED or entry.active < entry.limit):
            waiter = queue.popleft()
            if not waiter.waiting:
                continue
            assert waiter.hold is not None
            self._hold(entry, waiter.hold)
            pair = (waiter.role, waiter.database)
            if not self.paused and pair not in self._queues and self._blocking(*pair) is None:
                self._unqueue(waiter, Kind.ADMIT)
                waiter.ticket = self._take(waiter.role, waiter.database, False)
                admitted.append(waiter)
            else:
                self._enqueue(waiter)
        self._forget_address(key, entry)
        return admitted

    def _readdress(self) -> list[Waiter]:
        """New rules: every tracked address's limit again, and the waiters that now fit."""
        admitted: list[Waiter] = []
        for key, old in list(self._addresses.items()):
            entry = self._address_entry(key)
            # Holds taken before keep their network's text (a leave decrements what its
            # take incremented); new ones count on the new rule's network.
            old.limit, old.policy, old.network = entry.limit, entry.policy, entry.network
            admitted += self._advance(key, old)
        return admitted

    def release(self, ticket: Ticket) -> list[Waiter]:
        """Give back a ticket's slots (exactly once; again is a no-op). Returns waiters admitted."""
        if ticket.released:
            return []
        ticket.released = True
        if not ticket.counted:
            return []
        self._count(ticket.role, ticket.database, -1)
        return self._drain()

    def _unqueue(self, waiter: Waiter, state: Kind) -> None:
        waiter.state = state
        _decrement(self.role_waiting, waiter.role)
        _decrement(self.database_waiting, waiter.database)
        self.total_waiting -= 1

    def cancel(self, waiter: Waiter) -> None:
        """The queued client left: forget it; it holds nothing. No-op unless still waiting."""
        if not waiter.waiting:
            return
        self._drop(waiter)

    def _drop(self, waiter: Waiter) -> None:
        """Take a waiting client out of whichever queue it is in (it was cancelled or expired)."""
        self._unqueue(waiter, Kind.REJECT)
        # Removal from the deques is lazy: heads that are no longer waiting are skipped.
        # A cancel frees no slot, and the next waiter of the same queue shares its limits,
        # so nobody becomes admissible here. (A waiter past its address stage keeps its
        # hold until its client closes: ``leave``.) Both queues it may be in are trimmed.
        self._trim((waiter.role, waiter.database))
        hold = waiter.hold
        if hold is not None:
            entry = self._addresses.get(hold.key)
            if entry is not None:
                self._forget_address(hold.key, entry)

    def _trim(self, key: tuple[str, str]) -> _Queue | None:
        queue = self._queues.get(key)
        if queue is None:
            return None
        while queue and not queue[0].waiting:
            queue.popleft()
        if not queue:
            del self._queues[key]
            if not self._queues:
                self._vtime = 0.0  # nobody waits: nothing is owed to anyone
            return None
        return queue

    def next_deadline(self) -> float | None:
        """The earliest queue deadline still pending, or None."""
        heap = self._deadlines
        while heap and not heap[0][1].waiting:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now: float) -> list[tuple[Waiter, Rejection]]:
        """Time out every waiter whose deadline is ``<= now``; each gets its Rejection."""
        out: list[tuple[Waiter, Rejection]] = []
        heap = self._deadlines
        while heap and (heap[0][0] <= now or not heap[0][1].waiting):
            _, waiter = heapq.heappop(heap)
            if not waiter.waiting:
                continue
            entry = None if waiter.hold is None else self._addresses.get(waiter.hold.key)
            if entry is not None and waiter.in_address_stage:
                blocking = Rejection(Limit.ADDRESS, entry.network, entry.limit, RejectReason.LIMIT)
            else:
                blocking = self._blocking(waiter.role, waiter.database) or Rejection(
                    Limit.ROLE, waiter.role, self._role(waiter.role).max_connections, RejectReason.LIMIT
                )
            self._drop(waiter)
            out.append((waiter, _with_cause(blocking, RejectReason.QUEUE_TIMEOUT, now - waiter.arrived)))
        return out

    def clear_queues(self) -> list[Waiter]:
        """Remove every waiter (shutdown); returns them so the shell can answer each."""
        out: list[Waiter] = []
        queues: list[deque[Waiter]] = [*self._queues.values()]
        queues += [entry.queue for entry in self._addresses.values()]
        for queue in queues:
            for waiter in queue:
                if waiter.waiting:
                    self._unqueue(waiter, Kind.REJECT)
                    out.append(waiter)
            queue.clear()
        self._queues.clear()
        self._vtime = 0.0
        for key, entry in list(self._addresses.items()):
            self._forget_address(key, entry)
        self._deadlines.clear()
        return out

    def _pick(self) -> _Queue | None:
        """The queue whose head the sharing rule serves next among heads that fit, or None.

        One pass over the waiting pairs; a head's limits are looked at only when its tag
        could win."""
        total, _ = self.total_limit()
        if total != UNLIMITED and self.total_active >= total:
            return None  # the total is full for everyone (a reservation only ever narrows it)
        clock = self._vtime
        best: _Queue | None = None
        best_tag = 0.0
        best_seq = 0
        for queue in self._queues.values():
            tag = queue.vtime if queue.vtime > clock else clock
            head = queue[0]
            if best is not None and (tag > best_tag or (tag == best_tag and head.seq > best_seq)):
                continue
            if self._blocking(head.role, head.database) is None:
                best, best_tag, best_seq = queue, tag, head.seq
        return best

    def _served(self, queue: _Queue, waiter: Waiter) -> None:
        """``queue``'s head was served: the clock moves to its tag, the queue a stride on."""
        tag = queue.vtime if queue.vtime > self._vtime else self._vtime
        self._vtime = tag
        queue.vtime = tag + self._role(waiter.role).stride

    def _drain(self) -> list[Waiter]:
        """Admit queue heads while one fits all its limits, the next by the sharing rule."""
        admitted: list[Waiter] = []
        if self.paused or not self._queues:
            return admitted
        while (queue := self._pick()) is not None:
            waiter = queue.popleft()
            self._served(queue, waiter)
            self._unqueue(waiter, Kind.ADMIT)
            waiter.ticket = self._take(waiter.role, waiter.database, False)
            self._trim((waiter.role, waiter.database))
            admitted.append(waiter)
        return admitted

    # ---------------------------------------------------------------- reports

    def waiters(self) -> Iterable[Waiter]:
        """Every waiting client, in arrival order."""
        live = [w for q in self._queues.values() for w in q if w.waiting]
        live += [w for e in self._addresses.values() for w in e.queue if w.waiting]
        return sorted(live, key=lambda w: w.seq)

    def address_count(self, address: str) -> int:
        """Holds of one client address now (admitted and queued past its address stage)."""
        entry = self._addresses.get(address)
        return 0 if entry is None else entry.active

    def tracked_addresses(self) -> int:
        """How many client addresses the gate holds state for (bounded by the live clients)."""
        return len(self._addresses)

    def limit_rows(self) -> list[LimitRow]:
        """SHOW LIMITS: the total, then every role and database known to config or seen."""
        total, source = self.total_limit()
        rows = [
            LimitRow("total", "", total, self.total_active, self.total_waiting, "", source)
        ]
        roles = (
            set(self._rules.roles)
            | set(self._runtime_roles)
            | set(self._runtime_policies)
            | set(self._catalog_roles)
            | set(self.role_active)
            | set(self.role_waiting)
        )
        for role in sorted(roles):
            value, source = self.role_limit(role)
            eff = self._role(role)
            rows.append(
                LimitRow(
                    "role",
                    role,
                    value,
                    self.role_active.get(role, 0),
                    self.role_waiting.get(role, 0),
                    "exempt" if eff.exempt else eff.policy.value,
                    source,
                )
            )
        dbs = (
            set(self._rules.databases)
            | set(self._runtime_databases)
            | set(self._catalog_databases)
            | set(self.database_active)
            | set(self.database_waiting)
        )
        for db in sorted(dbs):
            value, source = self.database_limit(db)
            rows.append(
                LimitRow(
                    "database",
                    db,
                    value,
                    self.database_active.get(db, 0),
                    self.database_waiting.get(db, 0),
                    "",
                    source,
                )
            )
        return rows


def _with_cause(rejection: Rejection, cause: RejectReason, waited: float = 0.0) -> Rejection:
    return Rejection(rejection.limit, rejection.name, rejection.value, cause, waited)


def _add(counts: dict[K, int], key: K, delta: int) -> None:
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        del counts[key]


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
