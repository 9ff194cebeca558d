"""Prometheus exposition: ``[metrics] listen`` serves the live state of a ``Server`` as text.

Nothing is counted for metrics on the hot path. A custom prometheus-client ``Collector``
reads the server's counters (``Stats``), the gate and the client table when a scrape
arrives, and the small HTTP server answering the scrape runs on pgguard's own event loop,
so the collector sees a consistent state without locks. Each scrape costs one pass over the
connected clients and the waiters.

Endpoints: ``GET /metrics`` (text format 0.0.4, or OpenMetrics when the scraper asks for
it); ``GET /healthz`` (200 while the process serves: a liveness probe); ``GET /readyz``
(200 while the server behind pgguard accepts a TCP connection and pgguard is not draining,
else 503 with the reason: a readiness probe for load balancers and Kubernetes); anything
else is 404. One request per connection. ``ProbeServer`` is that HTTP part alone; with
``[server] workers`` the supervisor serves it with every worker's metrics (workers.py).
It accepts through ``listen.Acceptor``, so the endpoint survives running out of descriptors.

Size: about 540 lines, one job: what a scraper or a probe reads (the collector, its metric
names and the few lines of HTTP that serve them).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from .listen import Acceptor, bind
from .log import display, log, log_event

if TYPE_CHECKING:
    from .control import Control

__all__ = [
    "ServerCollector", "MetricsServer", "ProbeServer", "METRIC_NAMES", "CLUSTER_METRIC_NAMES",
    "POOL_METRIC_NAMES", "ADDRESS_METRIC_NAMES",
]  # fmt: skip


# A scrape request is a few hundred bytes; anything larger or slower is not Prometheus.
MAX_REQUEST: Final = 16 * 1024
REQUEST_TIMEOUT: Final = 10.0
# Scrapes waiting to be accepted (asyncio.start_server's default backlog, which this had).
PROBE_BACKLOG: Final = 100
# A failed accept on this endpoint is logged at most this often (seconds).
ACCEPT_LOG_INTERVAL: Final = 1.0

# /readyz dials the server: under Kubernetes' default probe timeout (1 s), so a slow server
# reads as not ready rather than as a probe that timed out.
READY_PROBE_TIMEOUT: Final = 0.8
# Probe answers are reused this long, so a flood of probes does not fork a backend each.
READY_CACHE: Final = 1.0

# Role and database names come from clients: a scrape labels at most this many names that
# config, SET or the catalog do not name (those with the most clients); the rest are summed
# under the label "other". Names are escaped (log.display) so every label is valid UTF-8.
MAX_UNNAMED_LABELS: Final = 100
OTHER: Final = "other"

METRIC_NAMES: Final = (
    "pgguard_sessions_active",
    "pgguard_clients_waiting",
    "pgguard_clients_connected",
    "pgguard_limit_connections",
    "pgguard_paused",
    "pgguard_draining",
    "pgguard_start_time_seconds",
    "pgguard_admissions_total",
    "pgguard_queued_total",
    "pgguard_rejections_total",
    "pgguard_queue_wait_seconds",
    "pgguard_backend_dial_failures_total",
    "pgguard_fd_exhausted_total",
    "pgguard_backend_errors_total",
    "pgguard_cancels_forwarded_total",
    "pgguard_cancels_dropped_total",
    "pgguard_bytes_relayed_total",
    "pgguard_idle_timeouts_total",
    "pgguard_admin_kills_total",
    "pgguard_config_reloads_total",
    "pgguard_mirror_refreshes_total",
    "pgguard_logins_in_flight",
    "pgguard_logins_waiting",
    "pgguard_login_waits_total",
    "pgguard_login_timeouts_total",
)
# Only with [pool] reuse somewhere (pool.py): warm server sessions per (role, database).
POOL_METRIC_NAMES: Final = (
    "pgguard_pool_warm_sessions",
    "pgguard_pool_sessions_in_use",
    "pgguard_pool_sessions_created_total",
    "pgguard_pool_sessions_reused_total",
    "pgguard_pool_reset_failures_total",
    "pgguard_pool_sessions_closed_total",
    "pgguard_pool_auth_failures_total",
    "pgguard_pool_auth_lookup_fallbacks_total",
)
# Only with [addresses."net"] rules: client-address sessions per configured network (never
# per address: addresses are client data, an unbounded label set).
ADDRESS_METRIC_NAMES: Final = ("pgguard_address_sessions",)
# Only with [cluster] (cluster.py): the shared lease store's state.
CLUSTER_METRIC_NAMES: Final = (
    "pgguard_cluster_up",
    "pgguard_cluster_leases",
    "pgguard_cluster_waiting",
    "pgguard_cluster_renew_seconds",
    "pgguard_cluster_redis_errors_total",
    "pgguard_cluster_fallbacks_total",
    "pgguard_cluster_lost_sessions_total",
)


class ServerCollector(Collector):
    """Reads the control layer's snapshots at scrape time; call only from its event loop.

    The same snapshots answer SHOW STATS and SHOW LIMITS, so the two cannot disagree: a
    session whose client left still holds its slot (and is counted in
    ``pgguard_sessions_active``) until the server has closed it.
    """

    def __init__(self, control: Control) -> None:
        self.control = control

    def collect(self) -> Iterator[Metric]:
        control = self.control
        st = control.stats
        counts = control.counts()

        active = GaugeMetricFamily(
            "pgguard_sessions_active",
            "Admitted sessions (dialing, authenticating or live), by role and database.",
            labels=["role", "database"],
        )
        connected = control.state_counts()
        pairs, queued = control.pair_counts()
        role_label = _labeller(
            (role for role, _ in pairs.elements()),
            (role for role, _ in queued.elements()),
            known=control.configured_role,
        )
        database_label = _labeller(
            (db for _, db in pairs.elements()),
            (db for _, db in queued.elements()),
            known=control.configured_database,
        )
        for (role, database), n in _fold(pairs, role_label, database_label):
            active.add_metric([role, database], n)
        yield active

        waiting = GaugeMetricFamily(
            "pgguard_clients_waiting",
            "Clients queued for a slot, by role and database.",
            labels=["role", "database"],
        )
        for (role, database), n in _fold(queued, role_label, database_label):
            waiting.add_metric([role, database], n)
        yield waiting

        states = GaugeMetricFamily(
            "pgguard_clients_connected",
            "Client connections by state (startup, queued, authenticating, active, admin, ...).",
            labels=["state"],
        )
        for state, n in sorted(connected.items()):
            states.add_metric([state], n)
        yield states

        limits = GaugeMetricFamily(
            "pgguard_limit_connections",
            "Each limit's value in force (-1: unlimited), by kind (total, role, database; "
            "address: a configured network's limit per client address).",
            labels=["kind", "name"],
        )
        labelled: dict[tuple[str, str], int] = {}
        for row in control.limit_rows():
            if row.kind == "role":
                name = role_label(row.name)
            elif row.kind == "database":
                name = database_label(row.name)
            else:
                name = row.name
            if name != OTHER:  # "other" stands for several names, with several limits
                labelled[(row.kind, name)] = row.limit
        networks = control.network_limits()
        for network, value in networks.items():
            labelled[("address", network)] = value
        for (kind, name), value in labelled.items():
            limits.add_metric([kind, name], value)
        yield limits

        if networks:
            by_network = GaugeMetricFamily(
                "pgguard_address_sessions",
                "Sessions (admitted or queued past the address limit) of client addresses in "
                "each configured [addresses] network.",
                labels=["network"],
            )
            held = control.network_counts()
            for network in networks:
                by_network.add_metric([network], held.get(network, 0))
            yield by_network

        yield GaugeMetricFamily("pgguard_paused", "1 while PAUSE is in force.", value=int(counts.paused))
        yield GaugeMetricFamily(
            "pgguard_draining", "1 while shutting down.", value=int(counts.draining)
        )
        yield GaugeMetricFamily(
            "pgguard_start_time_seconds", "Start time, seconds since the epoch.", value=control.started_at
        )
        yield CounterMetricFamily(
            "pgguard_admissions", "Clients admitted (at once or after queueing).", value=st.admissions
        )
        yield CounterMetricFamily(
            "pgguard_queued", "Clients that had to wait in a queue.", value=st.queued
        )

        rejections = CounterMetricFamily(
            "pgguard_rejections",
            "Clients refused, by reason (limit: policy reject; max_queue; queue_timeout; "
            "shutdown: draining; fault: an injected fault rule).",
            labels=["reason"],
        )
        reasons = {
            "limit": 0,
            "max_queue": 0,
            "max_queue_total": 0,
            "max_client_connections": 0,
            "queue_timeout": 0,
            "shutdown": 0,
            "fault": 0,
        }
        reasons.update(st.rejections)
        for reason, n in sorted(reasons.items()):
            rejections.add_metric([reason], n)
        yield rejections

        buckets = []
        cumulative = 0
        for bound, n in zip(st.wait_bounds, st.wait_counts, strict=False):
            cumulative += n
            buckets.append((_bound_text(bound), cumulative))
        cumulative += st.wait_counts[-1]
        buckets.append(("+Inf", cumulative))
        histogram = HistogramMetricFamily(
            "pgguard_queue_wait_seconds",
            "Seconds from arrival to admission (0 for clients admitted at once).",
        )
        histogram.add_metric([], buckets, st.wait_sum)
        yield histogram

        yield CounterMetricFamily(
            "pgguard_backend_dial_failures",
            "Backend connections that could not be opened (refused, timed out).",
            value=st.dial_failures,
        )
        yield CounterMetricFamily(
            "pgguard_fd_exhausted",
            "Accepts or backend dials that failed because pgguard ran out of file descriptors "
            "(EMFILE/ENFILE).",
            value=st.fd_exhausted,
        )
        yield CounterMetricFamily(
            "pgguard_backend_errors",
            "ErrorResponses from the server during session startup (bad password, no database...).",
            value=st.backend_errors,
        )
        yield CounterMetricFamily(
            "pgguard_cancels_forwarded", "CancelRequests forwarded.", value=st.cancels_forwarded
        )
        yield CounterMetricFamily(
            "pgguard_cancels_dropped",
            "CancelRequests matching no session here, dropped under a flood of them.",
            value=st.cancels_dropped,
        )
        relayed = CounterMetricFamily(
            "pgguard_bytes_relayed", "Bytes relayed, by direction.", labels=["direction"]
        )
        bytes_in, bytes_out = control.bytes_relayed()
        relayed.add_metric(["client_to_server"], bytes_in)
        relayed.add_metric(["server_to_client"], bytes_out)
        yield relayed
        yield CounterMetricFamily(
            "pgguard_idle_timeouts",
            "Sessions closed for being idle longer than idle_timeout (FATAL 57P05).",
            value=st.idle_timeouts,
        )
        yield CounterMetricFamily(
            "pgguard_admin_kills", "Sessions closed with KILL CLIENT.", value=st.kills
        )
        reloads = CounterMetricFamily(
            "pgguard_config_reloads", "Configuration reloads, by result.", labels=["result"]
        )
        reloads.add_metric(["ok"], st.reloads)
        reloads.add_metric(["failed"], st.reload_failures)
        yield reloads
        mirror = CounterMetricFamily(
            "pgguard_mirror_refreshes",
            "Catalog mirror reads of rolconnlimit/datconnlimit, by result.",
            labels=["result"],
        )
        mirror.add_metric(["ok"], st.mirror_refreshes)
        mirror.add_metric(["failed"], st.mirror_failures)
        yield mirror
        # [backend] max_logins_in_flight (logins.py): server logins from dial to first ReadyForQuery.
        yield GaugeMetricFamily("pgguard_logins_in_flight", "Server logins in progress (dial to "
                                "first ReadyForQuery), capped by max_logins_in_flight.", value=counts.logins_in_flight)
        yield GaugeMetricFamily("pgguard_logins_waiting", "Admitted clients waiting for a login slot.",
                                value=counts.logins_waiting)
        yield CounterMetricFamily("pgguard_login_waits", "Logins that had to wait for a login slot.",
                                  value=st.login_waits)
        yield CounterMetricFamily("pgguard_login_timeouts", "Clients that got no login slot within "
                                  "connect_timeout (57P03, as a dial timeout).", value=st.login_timeouts)
        if control.cluster is not None:
            yield from _cluster_metrics(control)
        if control.pool is not None:
            yield from _pool_metrics(control)


def _pool_metrics(control: Control) -> Iterator[Metric]:
    pool = control.pool
    assert pool is not None
    rows = pool.rows()
    role = _labeller((r[0] for r in rows), known=control.configured_role)
    database = _labeller((r[1] for r in rows), known=control.configured_database)
    specs = (
        (GaugeMetricFamily, "pgguard_pool_warm_sessions", "Warm idle server sessions kept for reuse.", 3),
        (GaugeMetricFamily, "pgguard_pool_sessions_in_use", "Reused-pair server sessions held by a client.", 4),
        (CounterMetricFamily, "pgguard_pool_sessions_created", "Server sessions logged in by pgguard.", 5),
        (CounterMetricFamily, "pgguard_pool_sessions_reused", "Warm server sessions handed to a client.", 6),
        (CounterMetricFamily, "pgguard_pool_reset_failures", "Resets (server_reset_query) that failed.", 7),
        (CounterMetricFamily, "pgguard_pool_sessions_closed", "Reused-pair server sessions closed.", 8),
    )
    for family, name, text, column in specs:
        metric = family(name, text, labels=["role", "database"])
        sums = Counter[tuple[str, str]]()
        for row in rows:
            sums[(role(row[0]), database(row[1]))] += int(row[column])
        for (r, d), value in sorted(sums.items()):
            metric.add_metric([r, d], value)
        yield metric
    yield CounterMetricFamily(
        "pgguard_pool_auth_failures", "Client logins pgguard refused (a wrong password).",
        value=pool.auth_failures,
    )  # fmt: skip
    text = "Logins passed to the server (it checked the password) as the verifier lookup failed."
    yield CounterMetricFamily("pgguard_pool_auth_lookup_fallbacks", text, value=pool.lookup_fallbacks)


def _cluster_metrics(control: Control) -> Iterator[Metric]:
    cluster = control.cluster
    assert cluster is not None
    store = cluster.store
    yield GaugeMetricFamily(
        "pgguard_cluster_up", "1 while the shared store (Redis) answers; 0: on_redis_failure applies.",
        value=int(store.up),
    )  # fmt: skip
    yield GaugeMetricFamily(
        "pgguard_cluster_leases", "Sessions of this instance holding leases in the shared store.",
        value=cluster.leases,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "pgguard_cluster_waiting", "Clients admitted locally, waiting for a slot in the shared store.",
        value=cluster.waiting,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "pgguard_cluster_renew_seconds", "Round trip of the last heartbeat (lease renewal).",
        value=store.stats.renew_seconds,
    )  # fmt: skip
    yield CounterMetricFamily(
        "pgguard_cluster_redis_errors", "Calls to Redis that failed or timed out.",
        value=store.stats.errors,
    )  # fmt: skip
    yield CounterMetricFamily(
        "pgguard_cluster_fallbacks", "Times the store became unavailable (on_redis_failure applied).",
        value=cluster.fallbacks,
    )  # fmt: skip
    yield CounterMetricFamily(
        "pgguard_cluster_lost_sessions",
        "Sessions closed because their slots were given away while this instance was cut off.",
        value=cluster.lost_sessions,
    )  # fmt: skip


def _labeller(*names: Iterable[str], known: Callable[[str], bool]) -> Callable[[str], str]:
    """Map each name to its label: itself (escaped), or "other" past MAX_UNNAMED_LABELS.

    ``names`` yield one name per client; the unnamed names with the most clients keep theirs.
    """
    counts = Counter(itertools.chain(*names))
    unnamed = [name for name, _ in counts.most_common() if not known(name)]
    folded = frozenset(unnamed[MAX_UNNAMED_LABELS:])

    def label(name: str) -> str:
        return OTHER if name in folded else display(name)

    return label


def _fold(
    counts: Counter[tuple[str, str]], role: Callable[[str], str], database: Callable[[str], str]
) -> list[tuple[tuple[str, str], int]]:
    """Counts per (role, database) re-keyed by label, summed where labels meet, sorted."""
    out = Counter[tuple[str, str]]()
    for (r, d), n in counts.items():
        out[(role(r), database(d))] += n
    return sorted(out.items())


def _bound_text(bound: float) -> str:
    return repr(float(bound))


class ProbeServer:
    """A minimal HTTP/1.x server on the event loop: ``/metrics``, ``/healthz``, ``/readyz``.

    What each answers comes from the subclass (``exposition``, ``not_healthy``,
    ``not_ready``): one process's ``Control`` here, every worker's in workers.py.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.address: tuple[str, int] | None = None
        self._listeners: list[Acceptor] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._accept_logged = -ACCEPT_LOG_INTERVAL

    async def start(self) -> None:
        """Bind; raises OSError when the address is taken."""
        loop = asyncio.get_running_loop()
        socks = bind(self.host, self.port, backlog=PROBE_BACKLOG)
        self._listeners = [Acceptor(loop, sock, self._protocol, self.accept_failed) for sock in socks]
        sock = socks[0].getsockname()
        self.address = (sock[0], sock[1])

    def _protocol(self) -> asyncio.BaseProtocol:
        # What asyncio.start_server gives each connection: a reader and our handler.
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=MAX_REQUEST), self._handle)

    def accept_failed(self, exc: OSError) -> None:
        """An accept failed (out of descriptors, say; retried shortly): logged once a second."""
        now = time.monotonic()
        if now - self._accept_logged >= ACCEPT_LOG_INTERVAL:
            self._accept_logged = now
            log_event(logging.WARNING, "accept_failed", listener="metrics", error=exc.strerror or str(exc))

    async def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        for task in list(self._handlers):
            task.cancel()

    async def exposition(self, accept: str) -> tuple[bytes, str]:
        """The ``/metrics`` body for a scraper sending ``Accept: accept``, and its content type."""
        raise NotImplementedError

    async def not_healthy(self) -> str | None:
        """Why ``/healthz`` answers 503, or None (200)."""
        return None

    async def not_ready(self) -> str | None:
        """Why ``/readyz`` answers 503, or None (200)."""
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split()
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
                await _respond(writer, 405, b"method not allowed\n", "text/plain")
                return
            path = parts[1].split("?", 1)[0]
            head_only = parts[0] == "HEAD"
            if path in ("/healthz", "/readyz"):
                if path == "/healthz":
                    reason, good, bad = await self.not_healthy(), "ok", "not healthy"
                else:
                    reason, good, bad = await self.not_ready(), "ready", "not ready"
                status, text = (200, good) if reason is None else (503, f"{bad}: {reason}")
                body = text.encode("utf-8", "replace") + b"\n"
                await _respond(writer, status, body, "text/plain", head_only=head_only)
                return
            if path != "/metrics":
                await _respond(writer, 404, b"not found; try /metrics\n", "text/plain")
                return
            started = time.perf_counter()
            body, content_type = await self.exposition(headers.get("accept", ""))
            log.debug("event=scrape seconds=%.4f bytes=%d", time.perf_counter() - started, len(body))
            await _respond(writer, 200, body, content_type, head_only=head_only)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()


class MetricsServer(ProbeServer):
    """``[metrics] listen`` of one pgguard process: its ``Control``'s state at scrape time."""

    def __init__(self, control: Control, host: str, port: int) -> None:
        super().__init__(host, port)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(control))
        self._control = control
        self._ready: tuple[float, str | None] | None = None  # (when, reason not ready or None)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type (what a scrape would get)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def exposition(self, accept: str) -> tuple[bytes, str]:
        return self.render(accept)

    def accept_failed(self, exc: OSError) -> None:
        self._control.accept_failed(exc)  # fd_exhausted, like the client listener's

    async def not_ready(self) -> str | None:
        """Why pgguard is not ready (draining, or the server cannot be dialled), or None.

        A TCP (or Unix-socket) connect to ``[backend]`` bounded by ``READY_PROBE_TIMEOUT``,
        closed at once (PostgreSQL logs nothing for a connection that sends no byte); the
        answer is reused for ``READY_CACHE`` seconds.
        """
        if self._control.draining:
            return "draining"
        now = time.monotonic()
        if self._ready is not None and now - self._ready[0] < READY_CACHE:
            return self._ready[1]
        reason = await self._control.backend.probe(READY_PROBE_TIMEOUT)
        self._ready = (time.monotonic(), reason)
        return reason


_REASONS: Final = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, *, head_only: bool = False
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + (b"" if head_only else body))
    await writer.drain()
