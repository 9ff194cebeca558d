"""The seven scenarios of issue 4, the TLS row of issue 7 and the cluster rows of issue 12
(``cluster.py``), each measured against every target in the same run, interleaved.

A scenario is an ``async def`` taking the running `Stack` and the run's `Settings` and
returning `Row` objects: one figure per target (the median of the repetitions, all samples
kept), the ratio that the issue's target is stated in, and PASS/MISS. Repetitions rotate the
order of the targets (direct, pgbouncer, pgguard; then pgbouncer, pgguard, direct; ...), so
a burst of load from elsewhere on the machine does not land on one target only.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from .stack import (
    BENCH_ROLE,
    REJECT_LIMIT,
    REJECT_ROLE,
    REPO,
    STORM_LIMIT,
    STORM_ROLE,
    WAITER_ROLE,
    Stack,
    Target,
    clean_env,
    cpu_seconds,
    fd_count,
    rss_kib,
)

__all__ = ["Row", "Settings", "SCENARIOS", "run_loadgen", "LoadGen"]

KIB: Final = 1024
# Bounds on anything that waits, so a broken target fails the run instead of hanging it.
_PGBENCH_GRACE_S: Final = 60.0
_SETTLE_TIMEOUT_S: Final = 60.0
# Issue 13's targets (the native relay): plain throughput against PgBouncer, added latency at
# one client, rejections against PostgreSQL direct. TLS stays on the Python pump: its own goal.
THROUGHPUT_GOAL: Final = 1.10
TLS_THROUGHPUT_GOAL: Final = 1.05
ADDED_LATENCY_US: Final = 15.0
REJECT_GOAL: Final = 50.0


@dataclass(frozen=True)
class Settings:
    quick: bool
    reps: int
    pgbench_s: int
    reject_s: float
    reject_workers: int
    storm_clients: int
    waiters: int
    idle_sessions: int
    copy_mb: int
    cluster_connects: int = 500  # connections one after the other per repetition (cluster)
    cluster_storm: int = 900  # clients over the three cluster pgguards
    surge_clients: int = 1000  # issue 21: clients arriving together (surge)

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(True, 2, 2, 2.0, 128, 2000, 2000, 300, 200, 200, 300)
        return cls(False, 3, 5, 4.0, 128, 10_000, 10_000, 300, 200)


@dataclass
class Row:
    """One figure of one scenario for every target, and how pgguard compares."""

    scenario: str
    metric: str
    unit: str
    better: str  # "higher" or "lower"
    values: dict[str, float | None] = field(default_factory=dict)  # target -> median
    samples: dict[str, list[float]] = field(default_factory=dict)
    baseline: str | None = None  # the target the ratio is taken against
    ratio: float | None = None  # pgguard / baseline
    target: str = ""  # the target, as text
    passed: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # For the plot: pgguard's standing as "higher is better" against the goal on the same scale.
    score: float | None = None
    goal: float | None = None

    def set_values(self, samples: dict[str, list[float]]) -> None:
        self.samples = {k: list(v) for k, v in samples.items()}
        self.values = {k: (statistics.median(v) if v else None) for k, v in samples.items()}

    def ratio_to(self, baseline: str) -> float | None:
        mine, base = self.values.get("pgguard"), self.values.get(baseline)
        self.baseline = baseline
        if mine is None or not base:
            self.ratio = None
        else:
            self.ratio = mine / base
        return self.ratio

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def order(targets: Sequence[str], rep: int) -> list[str]:
    """Rotate the target order by one each repetition."""
    k = rep % len(targets)
    return list(targets[k:]) + list(targets[:k])


def _avail(stack: Stack, names: Sequence[str]) -> list[str]:
    return [n for n in names if n in stack.targets]


# ------------------------------------------------------------------------- processes


async def _cpu_during(pid: int | None, work: Awaitable[Any]) -> tuple[Any, float | None]:
    """Run ``work``; return its result and the share of one core ``pid`` used meanwhile."""
    c0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    result = await work
    wall = time.perf_counter() - t0
    if not pid or wall <= 0:
        return result, None
    return result, (cpu_seconds(pid) - c0) / wall


def _libpq_env(sslmode: str | None) -> dict[str, str]:
    """The clients' environment; ``sslmode`` None leaves libpq's default (prefer)."""
    env = clean_env()
    if sslmode is not None:
        env["PGSSLMODE"] = sslmode
    return env


async def pgbench(
    target: Target, args: Sequence[str], seconds: int, *, clients: int, jobs: int,
    sslmode: str | None = None, user: str = BENCH_ROLE, password: str | None = None,
) -> dict[str, float]:
    argv = [
        "pgbench", "-n", *args, "-c", str(clients), "-j", str(jobs), "-T", str(seconds),
        "-h", target.host, "-p", str(target.port), "-U", user, "bench",
    ]
    env = _libpq_env(sslmode)
    if password is not None:
        env["PGPASSWORD"] = password
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(seconds + _PGBENCH_GRACE_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"pgbench against {target.name} did not finish: {' '.join(argv)}") from None
    text = out.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench against {target.name} failed: {err.decode()[-1000:]}")
    result: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tps = "):
            result["tps"] = float(line[len("tps = ") :].split()[0])
    # pgbench prints the average latency to the microsecond; clients / tps is the same
    # figure (pgbench's own definition) without the rounding.
    result["latency_ms"] = 1000.0 * clients / result["tps"]
    failed = [line for line in text.splitlines() if line.startswith("number of failed transactions")]
    if failed and not failed[0].split(":")[1].strip().startswith("0 "):
        raise RuntimeError(f"pgbench against {target.name}: {failed[0]}")
    return result


class LoadGen:
    """A ``python -m benchmarks.loadgen`` child; for ``hold`` mode, released explicitly."""

    def __init__(self, proc: asyncio.subprocess.Process, mode: str) -> None:
        self.proc = proc
        self.mode = mode

    @classmethod
    async def start(cls, mode: str, spec: dict[str, Any]) -> LoadGen:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.loadgen", mode, json.dumps(spec),
            cwd=str(REPO), env=clean_env(),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, mode)

    async def line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                raw = await self.proc.stdout.readline()
        except TimeoutError:
            self.proc.kill()
            raise RuntimeError(f"loadgen {self.mode} said nothing within {timeout:.0f} s") from None
        if not raw:
            assert self.proc.stderr is not None
            err = (await self.proc.stderr.read()).decode()
            await self.proc.wait()
            raise RuntimeError(f"loadgen {self.mode} exited ({self.proc.returncode}): {err[-2000:]}")
        result: dict[str, Any] = json.loads(raw)
        return result

    async def release(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        result = await self.line(timeout)
        await self.proc.wait()
        return result


async def run_loadgen(mode: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    gen = await LoadGen.start(mode, spec)
    result = await gen.line(timeout)
    await gen.proc.wait()
    return result


def _spec(target: Target, user: str, **extra: Any) -> dict[str, Any]:
    return {"host": target.host, "port": target.port, "user": user, "database": "bench", **extra}


async def wait_settled(pid: int, *, fds_at_least: int = 0, quiet_s: float = 0.5) -> None:
    """Wait until ``pid`` has ``fds_at_least`` descriptors and has used no CPU for ``quiet_s``."""
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    while fd_count(pid) < fds_at_least:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} has {fd_count(pid)} fds, expected {fds_at_least}")
        await asyncio.sleep(0.05)  # polling /proc, bounded by the deadline
    last = cpu_seconds(pid)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} never went quiet")
        await asyncio.sleep(0.1)
        now = cpu_seconds(pid)
        if now != last:
            last, quiet_since = now, time.monotonic()


async def role_sessions(stack: Stack, role: str) -> int:
    return await asyncio.to_thread(stack.pg.connection_count, users=[role])


async def wait_role_sessions(stack: Stack, role: str, expected: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = await role_sessions(stack, role)
        if n == expected or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.1)  # polling pg_stat_activity, bounded by the deadline


# ------------------------------------------------------------------------- scenarios


async def _pgbench_all(
    stack: Stack, s: Settings, *, scenario: str, args: Sequence[str], clients: int, metric: str,
    targets: Mapping[str, Target] | None = None, sslmode: str | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run pgbench against every target ``reps`` times; return samples and the proxies' CPU share.

    ``targets`` replaces the stack's own (keyed direct/pgbouncer/pgguard, as the table is).
    """
    targets = stack.targets if targets is None else targets
    names = [n for n in ("direct", "pgbouncer", "pgguard") if n in targets]
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    jobs = min(clients, 2)
    for rep in range(s.reps):
        for name in order(names, rep):
            target = targets[name]
            result, share = await _cpu_during(
                target.pid,
                pgbench(target, args, s.pgbench_s, clients=clients, jobs=jobs, sslmode=sslmode),
            )
            samples[name].append(result[metric])
            if share is not None:
                cpu[name].append(share)
        print(f"  {scenario} rep {rep + 1}/{s.reps}: "
              + ", ".join(f"{n}={samples[n][-1]:.4g}" for n in names), flush=True)
    return samples, {n: statistics.median(v) for n, v in cpu.items() if v}


async def throughput(stack: Stack, s: Settings) -> list[Row]:
    rows = []
    for clients in (8, 64):
        name = f"pgbench -S -c {clients}"
        samples, cpu = await _pgbench_all(stack, s, scenario=name, args=["-S"], clients=clients, metric="tps")
        row = Row(name, "tps", "tps", "higher", target=f"pgguard >= {THROUGHPUT_GOAL:.2f}x pgbouncer")
        row.set_values(samples)
        row.details["proxy_cpu_share"] = cpu
        _judge_against_pgbouncer(row, samples, THROUGHPUT_GOAL)
        rows.append(row)
    return rows


async def latency(stack: Stack, s: Settings) -> list[Row]:
    name = "pgbench -S -M prepared -c 1"
    samples, cpu = await _pgbench_all(
        stack, s, scenario=name, args=["-S", "-M", "prepared"], clients=1, metric="latency_ms"
    )
    row = Row(name, "latency avg", "ms", "lower", target=f"pgguard <= direct + {ADDED_LATENCY_US / 1000:.3f} ms")
    row.set_values(samples)
    row.ratio_to("direct")
    mine, direct = row.values.get("pgguard"), row.values.get("direct")
    if mine is not None and direct is not None:
        added_us = (mine - direct) * 1000
        row.details["added_us"] = added_us
        row.passed = added_us <= ADDED_LATENCY_US
        # Speed relative to direct; the goal is the speed at exactly the added latency allowed.
        row.score, row.goal = direct / mine, direct / (direct + ADDED_LATENCY_US / 1000)
    row.details["proxy_cpu_share"] = cpu
    return [row]


async def connect_rate(stack: Stack, s: Settings) -> list[Row]:
    name = "pgbench -S -C -c 8"
    samples, cpu = await _pgbench_all(stack, s, scenario=name, args=["-S", "-C"], clients=8, metric="tps")
    row = Row(name, "connections/s", "conn/s", "higher", target="pgguard >= 0.95x direct")
    row.set_values(samples)
    ratio = row.ratio_to("direct")
    row.passed = ratio is not None and ratio >= 0.95
    row.score, row.goal = ratio, 0.95
    row.details["proxy_cpu_share"] = cpu
    return [row]


async def rejection_rate(stack: Stack, s: Settings) -> list[Row]:
    """Role ``rej`` at its limit (2 sessions held through pgguard, so PostgreSQL counts them
    too); its PostgreSQL CONNECTION LIMIT and its pgguard limit are both 2, policy reject.
    PgBouncer has no reject policy (it queues), so it has no column here."""
    pg = stack.pg
    guard = stack.targets["pgguard"]
    pg.execute(f"ALTER ROLE {REJECT_ROLE} CONNECTION LIMIT {REJECT_LIMIT}")
    holders = await LoadGen.start("hold", _spec(guard, REJECT_ROLE, clients=REJECT_LIMIT, until="ready", deadline=30))
    try:
        held = await holders.line(60)
        if held["outcomes"] != {"ready": REJECT_LIMIT}:
            raise RuntimeError(f"could not bring role {REJECT_ROLE} to its limit: {held}")
        names = ["direct", "pgguard"]
        samples: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        others: dict[str, dict[str, int]] = {}
        for rep in range(s.reps):
            for name in order(names, rep):
                target = stack.targets[name]
                spec = _spec(target, REJECT_ROLE, workers=s.reject_workers, duration=s.reject_s,
                             max_count=200_000, deadline=30)
                result, share = await _cpu_during(
                    target.pid, run_loadgen("hammer", spec, timeout=s.reject_s + 90)
                )
                samples[name].append(result["rejected_per_s"])
                if share is not None:
                    cpu[name].append(share)
                bad = {k: v for k, v in result["outcomes"].items() if not k.startswith("rejected")}
                if bad:
                    others[name] = bad
            print(f"  rejection rep {rep + 1}/{s.reps}: "
                  + ", ".join(f"{n}={samples[n][-1]:.0f}/s" for n in names), flush=True)
    finally:
        await holders.release()
        pg.execute(f"ALTER ROLE {REJECT_ROLE} CONNECTION LIMIT -1")
    row = Row("reject at role limit", "53300/s", "1/s", "higher", target=f"pgguard >= {REJECT_GOAL:.0f}x direct")
    row.set_values(samples)
    ratio = row.ratio_to("direct")
    row.passed = ratio is not None and ratio >= REJECT_GOAL and not others
    row.score, row.goal = ratio, REJECT_GOAL
    row.details["proxy_cpu_share"] = {n: statistics.median(v) for n, v in cpu.items() if v}
    row.details["workers"] = s.reject_workers
    if others:
        row.details["unexpected_outcomes"] = others
    row.details["note"] = "pgbouncer has no reject policy (it queues), so it is not measured"
    return [row]


async def _sample_peak(stack: Stack, role: str, stop: asyncio.Event) -> tuple[int, int]:
    import asyncpg

    conn = await asyncpg.connect(host=stack.pg.host, port=stack.pg.port, user="postgres", database="postgres")
    peak = samples = 0
    try:
        stmt = await conn.prepare(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'"
        )
        while not stop.is_set():
            peak = max(peak, await stmt.fetchval(role))
            samples += 1
            await asyncio.sleep(0.002)  # the sampling period
    finally:
        await conn.close()
    return peak, samples


async def storm(stack: Stack, s: Settings) -> list[Row]:
    """``storm_clients`` clients at once for role ``storm`` (limit 20, policy queue).

    PostgreSQL's own CONNECTION LIMIT for the role is set to 20 too, as a tripwire: a 21st
    session would be refused by the server (``rejected_after_auth``). Direct, PostgreSQL
    refuses everything over the limit; PgBouncer (max_user_connections = 20) queues and
    reuses its 20 server connections; pgguard queues and opens a fresh session per client.
    """
    pg = stack.pg
    n = stack_clients = min(s.storm_clients, stack.fd_budget)
    if stack_clients < s.storm_clients:
        stack.notes.append(f"storm shrank from {s.storm_clients} to {n} clients to fit RLIMIT_NOFILE")
    pg.execute(f"ALTER ROLE {STORM_ROLE} CONNECTION LIMIT {STORM_LIMIT}")
    names = _avail(stack, ["direct", "pgbouncer", "pgguard"])
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            target = stack.targets[name]
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_peak(stack, STORM_ROLE, stop))
            spec = _spec(target, STORM_ROLE, clients=n, connect_inflight=512, deadline=240)
            try:
                result, share = await _cpu_during(target.pid, run_loadgen("storm", spec, timeout=300))
            finally:
                stop.set()
                peak, nsamples = await sampler
            result["peak_sessions"] = peak
            result["peak_samples"] = nsamples
            result["proxy_cpu_share"] = share
            if name == "pgbouncer":
                # PgBouncer keeps its 20 server connections pooled: close them, or they
                # would hold the role's server-side limit for the next target.
                await asyncio.to_thread(stack.reset_pgbouncer)
            result["sessions_after"] = await wait_role_sessions(stack, STORM_ROLE, 0)
            if name == "pgguard":
                result["fresh_limit_admitted"] = await _fresh_sessions(stack, target)
            results[name] = result
            print(f"  storm {name}: {result['outcomes']} in {result['elapsed']:.1f} s, "
                  f"peak {peak} sessions", flush=True)
    finally:
        pg.execute(f"ALTER ROLE {STORM_ROLE} CONNECTION LIMIT -1")
    rows = []
    row = Row(f"storm {n} clients, limit {STORM_LIMIT}", "served", "clients", "higher",
              target=f"peak <= {STORM_LIMIT}, all served or 53300, 0 held after")
    row.set_values({k: [v["outcomes"].get("served", 0)] for k, v in results.items()})
    g = results.get("pgguard")
    if g is not None:
        outcomes = g["outcomes"]
        clean = set(outcomes) <= {"served", "rejected"}
        row.passed = (
            g["peak_sessions"] <= STORM_LIMIT
            and clean
            and g["sessions_after"] == 0
            and g["fresh_limit_admitted"] == STORM_LIMIT
        )
    row.details = {k: v for k, v in results.items()}
    rows.append(row)
    wait = Row("storm admission wait", "p50/p99/max", "ms", "lower", target="reported")
    wait.set_values({k: [v["served_wait"]["p99"] * 1000] for k, v in results.items() if k != "direct"})
    wait.details = {k: {p: v["served_wait"][p] * 1000 for p in ("p50", "p99", "max")} for k, v in results.items()}
    rows.append(wait)
    peak = Row("storm peak backend sessions", "peak", "sessions", "lower", target=f"<= {STORM_LIMIT}")
    peak.set_values({k: [float(v["peak_sessions"])] for k, v in results.items()})
    if g is not None:
        peak.passed = g["peak_sessions"] <= STORM_LIMIT
    rows.append(peak)
    return rows


async def _fresh_sessions(stack: Stack, target: Target) -> int:
    """Open the role's whole limit at once through pgguard: all admitted means no slot leaked."""
    gen = await LoadGen.start("hold", _spec(target, STORM_ROLE, clients=STORM_LIMIT, until="ready", deadline=15))
    held = await gen.line(60)
    await gen.release()
    ready: int = held["outcomes"].get("ready", 0)
    return ready


async def memory(stack: Stack, s: Settings) -> list[Row]:
    """RSS growth of a fresh pgguard process per queued client and per idle session.

    Each measurement uses its own fresh process (memory freed by one would be reused by the
    next). A fresh PgBouncer's growth per idle session is shown for reference.
    """
    waiters = min(s.waiters, stack.fd_budget)
    if waiters < s.waiters:
        stack.notes.append(f"memory: waiters shrank from {s.waiters} to {waiters} to fit RLIMIT_NOFILE")
    queued: dict[str, list[float]] = {}
    idle: dict[str, list[float]] = {}
    details: dict[str, Any] = {}

    async def measure(target: Target, user: str, count: int, until: str) -> float:
        assert target.pid is not None
        # Warm up: one full session, so lazy imports and first-use allocations are done.
        await run_loadgen("storm", _spec(target, BENCH_ROLE, clients=1, deadline=30), timeout=60)
        await wait_settled(target.pid)
        fds0, rss0 = fd_count(target.pid), rss_kib(target.pid)
        gen = await LoadGen.start("hold", _spec(target, user, clients=count, until=until, deadline=120))
        try:
            held = await gen.line(180)
            expected = "ready" if until == "ready" else "sent"
            if held["outcomes"] != {expected: count}:
                raise RuntimeError(f"memory scenario: expected {count} {expected}, got {held}")
            await wait_settled(target.pid, fds_at_least=fds0 + count)
            rss1 = rss_kib(target.pid)
        finally:
            await gen.release(timeout=120)
        per = (rss1 - rss0) * KIB / count
        details[f"{target.name}:{user}"] = {"clients": count, "rss_before_kib": rss0, "rss_after_kib": rss1}
        return per

    for kind, user, count, until, into in (
        ("queued", WAITER_ROLE, waiters, "sent", queued),
        ("idle", BENCH_ROLE, s.idle_sessions, "ready", idle),
    ):
        proc = stack.start_pgguard(f"pgguard-mem-{kind}")
        try:
            target = Target("pgguard", "127.0.0.1", stack.guard_port(proc), proc.pid)
            into["pgguard"] = [await measure(target, user, count, until)]
        finally:
            proc.stop()
        print(f"  memory {kind}: pgguard {into['pgguard'][0] / KIB:.2f} KiB per client", flush=True)
    if stack.pgbouncer_path is not None:
        proc, port = await asyncio.to_thread(stack.start_pgbouncer, "pgbouncer-mem")
        try:
            target = Target("pgbouncer", "127.0.0.1", port, proc.pid)
            idle["pgbouncer"] = [await measure(target, BENCH_ROLE, s.idle_sessions, "ready")]
        finally:
            proc.stop()
        print(f"  memory idle: pgbouncer {idle['pgbouncer'][0] / KIB:.2f} KiB per client", flush=True)
    q = Row(f"memory per queued client ({waiters} waiting)", "RSS growth", "KiB", "lower",
            target="pgguard <= 8 KiB")
    q.set_values({k: [v[0] / KIB] for k, v in queued.items()})
    q.passed = q.values["pgguard"] is not None and q.values["pgguard"] <= 8.0  # type: ignore[operator]
    q.details = {k: v for k, v in details.items() if WAITER_ROLE in k}
    i = Row(f"memory per idle session ({s.idle_sessions} sessions)", "RSS growth", "KiB", "lower",
            target="pgguard <= 32 KiB")
    i.set_values({k: [v[0] / KIB] for k, v in idle.items()})
    i.passed = i.values["pgguard"] is not None and i.values["pgguard"] <= 32.0  # type: ignore[operator]
    i.details = {k: v for k, v in details.items() if BENCH_ROLE in k}
    return [q, i]


async def copy_out(stack: Stack, s: Settings) -> list[Row]:
    """``COPY (SELECT repeat('x', 999) ...) TO STDOUT`` through psql into /dev/null: 1000 bytes a row."""
    rows_n = s.copy_mb * 1000
    total_mb = rows_n * 1000 / 1e6
    sql = f"COPY (SELECT repeat('x', 999) FROM generate_series(1, {rows_n})) TO STDOUT"
    names = _avail(stack, ["direct", "pgbouncer", "pgguard"])
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}

    async def one(target: Target) -> float:
        argv = ["psql", "-X", "-q", "-h", target.host, "-p", str(target.port), "-U", BENCH_ROLE,
                "-d", "bench", "-c", sql]
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, env=clean_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(120):
            _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"COPY through {target.name} failed: {err.decode()}")
        return total_mb / (time.perf_counter() - t0)

    for rep in range(s.reps):
        for name in order(names, rep):
            target = stack.targets[name]
            rate, share = await _cpu_during(target.pid, one(target))
            samples[name].append(rate)
            if share is not None:
                cpu[name].append(share)
        print(f"  copy rep {rep + 1}/{s.reps}: "
              + ", ".join(f"{n}={samples[n][-1]:.0f} MB/s" for n in names), flush=True)
    row = Row(f"COPY out {total_mb:.0f} MB", "throughput", "MB/s", "higher", target="pgguard >= 0.9x direct")
    row.set_values(samples)
    ratio = row.ratio_to("direct")
    row.passed = ratio is not None and ratio >= 0.9
    row.score, row.goal = ratio, 0.9
    row.details["proxy_cpu_share"] = {n: statistics.median(v) for n, v in cpu.items() if v}
    return [row]


_SSL_CONNINFO: Final = re.compile(r"SSL connection \(protocol: ([^,]+), cipher: ([^,]+),")


async def _tls_session(target: Target) -> str:
    """What psql with ``sslmode=require`` negotiates with ``target`` ("TLSv1.3 TLS_AES_..."), via \\conninfo."""
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-h", target.host, "-p", str(target.port), "-U", BENCH_ROLE, "-d", "bench",
        "-c", "\\conninfo", env=_libpq_env("require"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    match = _SSL_CONNINFO.search(out.decode())
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"no TLS session with {target.name}: {out.decode()} {err.decode()}")
    return f"{match.group(1)} {match.group(2)}"


async def tls_throughput(stack: Stack, s: Settings) -> list[Row]:
    """``pgbench -S -c 8`` with ``PGSSLMODE=require``: every client session encrypted.

    One certificate for all three: PostgreSQL direct with ``ssl = on`` (turned on in the
    shared cluster for this scenario only, see ``Stack.server_tls``); a PgBouncer with
    ``client_tls_sslmode = require``; a pgguard with ``[tls]`` and ``client_mode = "require"``.
    Both proxies terminate TLS and reach the server in clear, as their clear-text
    counterparts do (Unix socket by default). The proxies are processes of their own,
    started here and stopped after.
    """
    clients = 8
    name = f"pgbench -S -c {clients}, TLS"
    started = []
    try:
        with stack.server_tls():
            targets = {"direct": stack.targets["direct"]}
            if stack.pgbouncer_path is not None:
                bouncer, port = await asyncio.to_thread(stack.start_pgbouncer, "pgbouncer-tls", client_tls=True)
                started.append(bouncer)
                targets["pgbouncer"] = Target("pgbouncer-tls", "127.0.0.1", port, bouncer.pid)
            guard = stack.start_pgguard("pgguard-tls", tls=True)
            started.append(guard)
            port = await asyncio.to_thread(stack.guard_port, guard)
            targets["pgguard"] = Target("pgguard-tls", "127.0.0.1", port, guard.pid)
            sessions = {n: await _tls_session(t) for n, t in targets.items()}
            print("  tls sessions: " + ", ".join(f"{n} {v}" for n, v in sessions.items()), flush=True)
            samples, cpu = await _pgbench_all(
                stack, s, scenario=name, args=["-S"], clients=clients, metric="tps",
                targets=targets, sslmode="require",
            )
    finally:
        for proc in started:
            proc.stop()
    row = Row(name, "tps", "tps", "higher", target=f"pgguard >= {TLS_THROUGHPUT_GOAL:.2f}x pgbouncer")
    row.set_values(samples)
    row.details["proxy_cpu_share"] = cpu
    row.details["tls_session"] = sessions
    row.details["note"] = "client TLS (sslmode=require) to each target; the proxies reach the server in clear"
    _judge_against_pgbouncer(row, samples, TLS_THROUGHPUT_GOAL)
    return [row]


async def reuse_rows(stack: Stack, s: Settings) -> list[Row]:
    """Warm server-session reuse of issue 15 (``[pool] reuse``; benchmarks/reuse.py)."""
    from .reuse import reuse

    return await reuse(stack, s)


async def neighbour_rows(stack: Stack, s: Settings) -> list[Row]:
    """Issue 23's "noisy neighbour": a shared total between two tenants (benchmarks/neighbour.py)."""
    from .neighbour import neighbour

    return await neighbour(stack, s)


async def cluster_rows(stack: Stack, s: Settings) -> list[Row]:
    """Three pgguards sharing limits through Redis vs the single one (benchmarks/cluster.py)."""
    from .cluster import cluster

    return await cluster(stack, s)


async def storm_connect_rows(stack: Stack, s: Settings) -> list[Row]:
    """Issue 18's storm from connect to answer, reuse on, against PgBouncer (benchmarks/storm_connect.py)."""
    from .storm_connect import storm_connect

    return await storm_connect(stack, s)


async def surge_rows(stack: Stack, s: Settings) -> list[Row]:
    """A surge of logins with and without ``max_logins_in_flight`` (issue 21; benchmarks/surge.py)."""
    from .surge import surge

    return await surge(stack, s)


Scenario = Callable[[Stack, Settings], Awaitable[list[Row]]]
# In the order; the names are what ``--only`` takes.
SCENARIOS: Final[dict[str, Scenario]] = {
    "throughput": throughput,
    "latency": latency,
    "connect": connect_rate,
    "reject": rejection_rate,
    "storm": storm,
    "memory": memory,
    "copy": copy_out,
    "tls": tls_throughput,
    "cluster": cluster_rows,
    "reuse": reuse_rows,
    "stormconnect": storm_connect_rows,
    "neighbour": neighbour_rows,
    "surge": surge_rows,
}


def _judge_against_pgbouncer(row: Row, samples: dict[str, list[float]], goal: float) -> None:
    """A throughput target: pgguard >= ``goal`` x PgBouncer; without PgBouncer, a ratio to direct."""
    if "pgbouncer" in samples:
        ratio = row.ratio_to("pgbouncer")
        row.passed = ratio is not None and ratio >= goal
        row.score, row.goal = ratio, goal
    else:
        row.ratio_to("direct")
        row.target += " (pgbouncer absent: ratio to direct, not judged)"
