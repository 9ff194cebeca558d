"""``pgguard demo``: a throwaway PostgreSQL, an in-process pgguard with a small role limit, and a storm.

It shows, live, how many clients of the role are active (admitted), queued, served and
rejected, then a summary: the backend's own peak session count for the role
(``pg_stat_activity``, sampled) against the limit, admission-wait percentiles, and whether
every client ended as expected. Exit status: 0 when the limit held and every client was
either served or rejected with 53300; 1 when an invariant broke; 2 when the demo could not
start (no PostgreSQL binaries, say).

Without a terminal (CI, a pipe) the live table becomes one plain progress line a second.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["DemoOptions", "add_parser", "main", "run"]

DEMO_ROLE: Final = "app"
DEMO_DATABASE: Final = "postgres"
# How often the backend's own session count is sampled; short enough to catch a brief excess.
MONITOR_INTERVAL: Final = 0.02
# Live view refreshes (terminal) and progress lines (no terminal), per second.
REFRESH_PER_SECOND: Final = 8
PLAIN_PROGRESS_INTERVAL: Final = 1.0
# Spare time a client's connect may take beyond the queue timeout (dial + backend start).
CONNECT_SLACK: Final = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    clients: int = 200
    limit: int = 10
    policy: str = "queue"
    query_time: float = 0.5
    ramp: float = 1.0
    queue_timeout: float = 60.0


@dataclass
class _Tally:
    """What the storm's clients saw, from their side."""

    started: int = 0
    connecting: int = 0
    in_session: int = 0
    served: int = 0
    rejected: int = 0
    rejection_message: str = ""
    failures: Counter[str] = field(default_factory=Counter)
    backend_now: int = 0
    backend_peak: int = 0
    connect_times: list[float] = field(default_factory=list)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pgguard demo`` on the CLI's subparsers."""
    d = DemoOptions()
    p = sub.add_parser(
        "demo",
        help="start a throwaway PostgreSQL and pgguard, and show a client storm being limited",
        description=(
            "Start a throwaway PostgreSQL and an in-process pgguard with a small limit for role "
            f'"{DEMO_ROLE}", fire a storm of concurrent clients through it, and show live how '
            "many are active, queued, served and rejected. Exits 0 when the limit held."
        ),
    )
    p.add_argument(
        "--clients",
        type=_positive_int,
        default=d.clients,
        help="clients in the storm (default: %(default)s)",
    )
    p.add_argument(
        "--limit",
        type=_non_negative_int,
        default=d.limit,
        help=f'max_connections of role "{DEMO_ROLE}" (default: %(default)s)',
    )
    p.add_argument(
        "--policy",
        choices=["queue", "reject"],
        default=d.policy,
        help="what to do over the limit (default: %(default)s)",
    )
    p.add_argument(
        "--query-time",
        type=_non_negative_float,
        default=d.query_time,
        help="seconds each client holds its session (pg_sleep; default: %(default)s)",
    )
    p.add_argument(
        "--ramp",
        type=_non_negative_float,
        default=d.ramp,
        help="seconds over which the clients arrive (0: all at once; default: %(default)s)",
    )
    p.add_argument(
        "--queue-timeout",
        type=_positive_float,
        default=d.queue_timeout,
        help="pgguard queue_timeout in seconds (default: %(default)s)",
    )
    p.set_defaults(func=main)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or greater")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or greater")
    return value


def _say(console: Any, text: str) -> None:
    """One plain line (no rich markup: ``[roles.app]`` is config, not a style)."""
    console.print(text, markup=False)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``pgguard demo``; returns the exit status."""
    options = DemoOptions(
        clients=args.clients,
        limit=args.limit,
        policy=args.policy,
        query_time=args.query_time,
        ramp=args.ramp,
        queue_timeout=args.queue_timeout,
    )
    return run(options)


def run(options: DemoOptions, console: Any = None) -> int:
    """Start the cluster, run the storm on a fresh (uv)loop, print the summary; returns the exit status."""
    from rich.console import Console

    from .server import new_event_loop
    from .testing.cluster import ClusterError, PostgresCluster

    if console is None:
        console = Console(highlight=False)
        # Without a terminal, no wrapping at 80 columns: one progress line is one line.
        console.soft_wrap = not console.is_terminal
    _say(
        console,
        "pgguard demo: starting a throwaway PostgreSQL (initdb in a temporary directory) ...",
    )
    try:
        cluster = PostgresCluster(max_connections=max(50, options.limit + 20))
        cluster.start()
    except ClusterError as exc:
        _say(console, f"pgguard demo: cannot start PostgreSQL: {exc}")
        return 2
    loop = new_event_loop()
    try:
        cluster.create_role(DEMO_ROLE)
        return loop.run_until_complete(_demo(options, cluster, console))
    except KeyboardInterrupt:
        _say(console, "pgguard demo: interrupted")
        return 130
    finally:
        loop.close()
        cluster.stop()


async def _demo(options: DemoOptions, cluster: Any, console: Any) -> int:
    import asyncpg

    from . import config as config_mod
    from .server import Server

    cfg = config_mod.loads(
        f"""
[server]
listen = "127.0.0.1:0"
[backend]
host = "{cluster.host}"
port = {cluster.port}
[limits]
queue_timeout = {options.queue_timeout}
max_queue = {options.clients}
[roles.{DEMO_ROLE}]
max_connections = {options.limit}
policy = "{options.policy}"
""",
        "<demo>",
    )
    server = Server(cfg, loop=asyncio.get_running_loop())
    await server.start()
    _say(
        console,
        f"PostgreSQL 127.0.0.1:{cluster.port}; pgguard 127.0.0.1:{server.port} with "
        f'[roles.{DEMO_ROLE}] max_connections = {options.limit}, policy = "{options.policy}"',
    )
    _say(
        console,
        f"storm: {options.clients} clients over {options.ramp:g}s, each holding its session "
        f"for {options.query_time:g}s (SELECT pg_sleep)",
    )
    tally = _Tally()
    monitor_conn = await asyncpg.connect(cluster.dsn())
    stop_monitor = asyncio.Event()
    began = time.monotonic()
    monitor = asyncio.create_task(_monitor(monitor_conn, tally, stop_monitor))
    try:
        storm = asyncio.gather(
            *(_client(i, options, server.port, tally) for i in range(options.clients))
        )
        await _show(storm, server, tally, options, console, began)
        await storm
        stop_monitor.set()
        await monitor
    finally:
        stop_monitor.set()
        monitor.cancel()
        await monitor_conn.close()
        await server.close()
    elapsed = time.monotonic() - began
    return _summary(options, server, tally, console, elapsed)


async def _client(index: int, options: DemoOptions, port: int, tally: _Tally) -> None:
    import asyncpg

    if options.ramp > 0:
        await asyncio.sleep(options.ramp * index / options.clients)  # arrival schedule
    tally.started += 1
    tally.connecting += 1
    t0 = time.monotonic()
    try:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=port,
            user=DEMO_ROLE,
            database=DEMO_DATABASE,
            timeout=options.queue_timeout + CONNECT_SLACK,
        )
    except asyncpg.TooManyConnectionsError as exc:
        tally.rejected += 1
        tally.rejection_message = tally.rejection_message or f"{exc.sqlstate} {exc}"
        return
    except Exception as exc:  # anything else breaks the demo's promise; counted and shown
        tally.failures[f"{type(exc).__name__}: {exc}"] += 1
        return
    finally:
        tally.connecting -= 1
    tally.connect_times.append(time.monotonic() - t0)
    tally.in_session += 1
    try:
        await conn.execute("SELECT pg_sleep($1)", options.query_time)
        tally.served += 1
    except Exception as exc:
        tally.failures[f"{type(exc).__name__}: {exc}"] += 1
    finally:
        tally.in_session -= 1
        await conn.close()


async def _monitor(conn: Any, tally: _Tally, stop: asyncio.Event) -> None:
    """Sample the backend's own count of the role's client sessions until ``stop``."""
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND usename = $1"
    )
    while True:
        count = await conn.fetchval(query, DEMO_ROLE)
        tally.backend_now = count
        tally.backend_peak = max(tally.backend_peak, count)
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), MONITOR_INTERVAL)
        except TimeoutError:
            pass


async def _show(
    storm: asyncio.Future[Any],
    server: Any,
    tally: _Tally,
    options: DemoOptions,
    console: Any,
    began: float,
) -> None:
    """Show the live counts until the storm is over: a rich table on a terminal, lines otherwise."""
    if console.is_terminal:
        from rich.live import Live

        with Live(
            _table(server, tally, options, began),
            console=console,
            refresh_per_second=REFRESH_PER_SECOND,
        ) as live:
            while not storm.done():
                await asyncio.wait({storm}, timeout=1 / REFRESH_PER_SECOND)
                live.update(_table(server, tally, options, began))
        return
    while not storm.done():
        await asyncio.wait({storm}, timeout=PLAIN_PROGRESS_INTERVAL)
        _say(console, _line(server, tally, options, began))


def _counts(server: Any, tally: _Tally) -> dict[str, int]:
    row = next((r for r in server.control.limit_rows() if r.kind == "role" and r.name == DEMO_ROLE), None)
    return {
        "active": row.active if row else 0,
        "queued": row.waiting if row else 0,
        "served": tally.served,
        "rejected": tally.rejected,
        "backend": tally.backend_now,
        "failed": sum(tally.failures.values()),
    }


def _line(server: Any, tally: _Tally, options: DemoOptions, began: float) -> str:
    c = _counts(server, tally)
    done = c["served"] + c["rejected"] + c["failed"]
    return (
        f"{time.monotonic() - began:5.1f}s  active {c['active']:>3}/{options.limit}  "
        f"queued {c['queued']:>4}  served {c['served']:>4}  rejected {c['rejected']:>4}  "
        f"backend sessions {c['backend']:>3}  done {done}/{options.clients}"
    )


def _table(server: Any, tally: _Tally, options: DemoOptions, began: float) -> Any:
    from rich.table import Table

    c = _counts(server, tally)
    done = c["served"] + c["rejected"] + c["failed"]
    table = Table(
        title=f"pgguard demo · {time.monotonic() - began:4.1f}s · {done}/{options.clients} clients done",
        title_justify="left",
    )
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_column("", min_width=30)
    width = 30
    scale = max(options.limit, 1)
    rows = [
        ("active (admitted)", c["active"], f"limit {options.limit}", "green"),
        ("queued", c["queued"], "waiting in pgguard", "yellow"),
        ("served", c["served"], "finished their query", "blue"),
        ("rejected 53300", c["rejected"], "told: too many connections", "red"),
        ("backend sessions", c["backend"], "pg_stat_activity", "cyan"),
    ]
    for name, value, note, colour in rows:
        bar_len = min(
            width,
            round(
                value
                * width
                / (scale if name.startswith(("active", "backend")) else max(options.clients, 1))
            ),
        )
        table.add_row(name, str(value), f"[{colour}]{'█' * bar_len}[/{colour}] {note}")
    if c["failed"]:
        table.add_row("[bold red]unexpected errors[/]", str(c["failed"]), "")
    return table


def _summary(options: DemoOptions, server: Any, tally: _Tally, console: Any, elapsed: float) -> int:
    stats = server.stats
    p50, p99 = stats.wait_percentile(50), stats.wait_percentile(99)
    wait_max = stats.wait_percentile(100)
    failed = sum(tally.failures.values())
    limit_held = tally.backend_peak <= options.limit
    ok = limit_held and failed == 0 and tally.served + tally.rejected == options.clients
    _say(console, "")
    _say(console, f"summary ({elapsed:.1f}s)")
    _say(
        console,
        f'  clients        {options.clients} of role "{DEMO_ROLE}", policy {options.policy}, limit {options.limit}',
    )
    _say(console, f"  served         {tally.served}")
    rejected = f"  rejected       {tally.rejected}"
    if tally.rejection_message:
        rejected += f"  ({tally.rejection_message})"
    _say(console, rejected)
    _say(
        console,
        f"  backend peak   {tally.backend_peak} (limit {options.limit}; pg_stat_activity, sampled every {MONITOR_INTERVAL * 1000:g} ms)",
    )
    _say(
        console,
        f"  admission wait p50 {p50:.3f}s  p99 {p99:.3f}s  max {wait_max:.3f}s  ({len(stats.waits)} admitted)",
    )
    if failed:
        _say(console, f"  unexpected     {failed}")
        for text, count in tally.failures.most_common(5):
            _say(console, f"    {count} x {text}")
    if ok:
        _say(
            console,
            f'OK: the server never saw more than {options.limit} sessions of role "{DEMO_ROLE}"; '
            "every client was served or told 53300.",
        )
        return 0
    if not limit_held:
        _say(
            console,
            f"FAILED: the server saw {tally.backend_peak} sessions, over the limit of {options.limit}",
        )
    else:
        _say(console, "FAILED: some clients ended with an unexpected error")
    return 1
