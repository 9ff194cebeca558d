"""What SHOW and /metrics report: the counters since start, the counts of now, and the rows SHOW prints.

``Stats`` is written by the control layer only; ``Counts`` is one reading of what is held and
waiting. The ``*_rows`` functions turn them (and the live clients) into SHOW's text rows, with
client-supplied names escaped (``log.display``).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from .errors import PgGuardError
from .limits import Policy, RejectReason, Waiter
from .log import display
from .proxy import ClientConnection, State

__all__ = ["Stats", "Counts", "Console", "WAIT_BUCKETS", "stats_rows", "client_rows", "queue_rows"]

# Admission waits kept for percentiles (a sliding window, newest kept).
WAIT_SAMPLES: Final = 10000
# Upper bounds (seconds) of the pgguard_queue_wait_seconds histogram buckets: from "admitted
# at once" to the default queue_timeout and beyond.
WAIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# What pg_stat_activity.state would say, from the last ReadyForQuery status (0: a query runs).
_ACTIVITY: Final = {
    ord("I"): "idle",
    ord("T"): "idle in transaction",
    ord("E"): "idle in transaction (aborted)",
}


@dataclass
class Stats:
    """Counters since start, for SHOW STATS, metrics and the testing API."""

    admissions: int = 0
    queued: int = 0
    rejections: Counter[str] = field(default_factory=Counter)  # by RejectReason value
    queue_timeouts: int = 0
    dial_failures: int = 0
    fd_exhausted: int = 0  # accepts or dials that failed with EMFILE/ENFILE
    backend_errors: int = 0
    cancels_forwarded: int = 0
    cancels_dropped: int = 0  # unmatched CancelRequests past MAX_UNMATCHED_CANCELS in flight
    bytes_in: int = 0  # of closed sessions; live ones are added by bytes_relayed
    bytes_out: int = 0
    idle_timeouts: int = 0
    kills: int = 0
    reloads: int = 0
    reload_failures: int = 0
    mirror_refreshes: int = 0
    mirror_failures: int = 0
    login_waits: int = 0  # logins that waited for a slot (max_logins_in_flight)
    login_timeouts: int = 0  # ... and got none within connect_timeout
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


@dataclass(frozen=True, slots=True)
class Counts:
    """How many of each, now: one reading for SHOW STATS, /metrics and the testing API."""

    sessions_active: int  # slots held (a session whose client left holds one until the server closes)
    clients_waiting: int
    clients_connected: int  # client sockets, console sessions excluded
    consoles: int
    paused: bool
    draining: bool
    logins_in_flight: int = 0  # server logins between dial and first ReadyForQuery
    logins_waiting: int = 0  # admitted clients waiting for a login slot


class Console(Protocol):
    """A console session as the control layer sees it (admin.AdminSession)."""

    id: int
    peer: str
    user: str
    connected_at: float
    last_active: float
    bytes_in: int
    bytes_out: int

    @property
    def application_name(self) -> str: ...

    def terminate(self, exc: PgGuardError) -> None: ...


def stats_rows(
    st: Stats, counts: Counts, relayed: tuple[int, int], started_at: float
) -> list[tuple[str, str]]:
    """SHOW STATS: every counter since start, and what is held and waiting now."""
    bytes_in, bytes_out = relayed
    rows: list[tuple[str, str]] = [
        ("uptime_seconds", _seconds(time.time() - started_at)),
        ("paused", "yes" if counts.paused else "no"),
        ("draining", "yes" if counts.draining else "no"),
        ("sessions_active", str(counts.sessions_active)),
        ("clients_waiting", str(counts.clients_waiting)),
        ("clients_connected", str(counts.clients_connected)),
        ("logins_in_flight", str(counts.logins_in_flight)),
        ("logins_waiting", str(counts.logins_waiting)),
        ("admissions", str(st.admissions)),
        ("queued", str(st.queued)),
        ("rejections", str(sum(st.rejections.values()))),
    ]
    rows += [(f"rejections_{r.value}", str(st.rejections.get(r.value, 0))) for r in RejectReason]
    rows += [
        ("queue_timeouts", str(st.queue_timeouts)),
        ("dial_failures", str(st.dial_failures)),
        ("login_waits", str(st.login_waits)),
        ("login_timeouts", str(st.login_timeouts)),
        ("fd_exhausted", str(st.fd_exhausted)),
        ("backend_errors", str(st.backend_errors)),
        ("idle_timeouts", str(st.idle_timeouts)),
        ("kills", str(st.kills)),
        ("cancels_forwarded", str(st.cancels_forwarded)),
        ("cancels_dropped", str(st.cancels_dropped)),
        ("bytes_in", str(bytes_in)),
        ("bytes_out", str(bytes_out)),
        ("reloads", str(st.reloads)),
        ("reload_failures", str(st.reload_failures)),
    ]
    for label, p in (("p50", 50), ("p90", 90), ("p99", 99)):
        rows.append((f"wait_{label}_seconds", f"{st.wait_percentile(p):.3f}"))
    rows.append(("wait_max_seconds", f"{max(st.waits, default=0.0):.3f}"))
    return rows


def client_rows(
    clients: Iterable[ClientConnection],
    consoles: Iterable[Console],
    address_count: Callable[[str], int] = lambda address: 0,
) -> list[tuple[str, ...]]:
    """SHOW CLIENTS: every client socket and console session, longest idle first;
    ``address_count`` gives the sessions the gate counts for a client's address."""
    now, mono = time.time(), time.monotonic()
    entries: list[tuple[float, tuple[str, ...]]] = []
    for client in clients:
        idle = mono - client.last_active
        live = client.state is State.ACTIVE
        entries.append(
            (
                idle,
                (
                    str(client.id),
                    client.peer,
                    display(client.role),
                    display(client.database),
                    display(client.startup.application_name) if client.startup else "",
                    client.state.value,
                    _ACTIVITY.get(client.idle_status, "active") if live else "",
                    _seconds(now - client.connected_at),
                    _seconds(idle),
                    str(client.bytes_in),
                    str(client.bytes_out),
                    "" if client.address is None else str(address_count(client.address)),
                ),
            )
        )
    for console in consoles:
        idle = mono - console.last_active
        entries.append(
            (
                idle,
                (
                    str(console.id),
                    console.peer,
                    display(console.user),
                    "pgguard",
                    display(console.application_name),
                    "admin",
                    "",
                    _seconds(now - console.connected_at),
                    _seconds(idle),
                    str(console.bytes_in),
                    str(console.bytes_out),
                    "",
                ),
            )
        )
    entries.sort(key=lambda e: (-e[0], int(e[1][0])))
    return [row for _, row in entries]


def queue_rows(
    waiters: Iterable[Waiter],
    now: float,
    policy: Callable[[str], Policy],
    store_waiters: Iterable[Waiter] = (),
) -> list[tuple[str, ...]]:
    """SHOW QUEUES: per (role, database): waiters, oldest wait, seconds to the next timeout,
    policy, and how many of the waiters wait for the shared store ([cluster]: admitted
    here, no slot free in Redis); ``store_waiters`` are those."""
    queues: dict[tuple[str, str], list[float]] = {}
    for store, group in ((0, waiters), (1, store_waiters)):
        for waiter in group:
            q = queues.setdefault((waiter.role, waiter.database), [0, 0.0, float("inf"), 0])
            q[0] += 1
            q[1] = max(q[1], now - waiter.arrived)
            q[2] = min(q[2], waiter.deadline - now)
            q[3] += store
    return [
        (
            display(role),
            display(db),
            str(int(n)),
            _seconds(oldest),
            _seconds(nxt),
            policy(role).value,
            str(int(in_store)),
        )
        for (role, db), (n, oldest, nxt, in_store) in sorted(queues.items())
    ]


def _seconds(seconds: float) -> str:
    return f"{max(seconds, 0.0):.1f}"
