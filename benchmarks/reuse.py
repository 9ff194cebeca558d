"""The reuse rows of issue 15: warm server-session reuse (``[pool] reuse``), same run, as ratios.

``python -m benchmarks run --only reuse``. The scenario starts its own pgguard process
(``pgguard-reuse``): the run's configuration plus ``[pool] reuse = true`` with ``bench`` and
``storm`` in ``trusted_roles``, and ``[backend] monitor_dsn`` (the superuser, database
``postgres``), where it creates docs/reuse.md's lookup function ``pgguard.lookup_role``. The run's
own pgguard (reuse off) stays the "reuse off" column.

``pgbench -n -S -C -c 8 -j 2`` (a connection per transaction), repetitions interleaved with
the order rotating, against:

- PostgreSQL direct, PgBouncer (the stack's, trust) and the run's pgguard (reuse off): row
  "reuse off", target as the ``connect`` row (pgguard >= 0.95x direct);
- the same direct and PgBouncer samples against ``pgguard-reuse`` for the trusted role
  ``bench``: row "reuse on, trusted role", target >= 5x direct (stretch: >= PgBouncer);
- role ``benchs`` with a password whose SCRAM verifier has 16 iterations (set with ALTER
  ROLE ... PASSWORD 'SCRAM-SHA-256$16:...', made by ``pgguard.scram.make_verifier``: PostgreSQL
  15 has no ``scram_iterations``), so that pgbench's own PBKDF2 (3-6 ms of CPU per login at
  4,096 iterations) does not cap every target alike: direct (the server checks it over TCP),
  a PgBouncer with ``auth_type = scram-sha-256`` and that verifier in its own user file, and
  ``pgguard-reuse`` (verifier read through ``monitor_dsn``, proof checked by pgguard). Both
  proxies reach the server over its Unix socket, which trusts, as in every other row.

Then a storm through ``pgguard-reuse``: ``storm_clients`` clients at once for role ``storm``
(limit 20, policy queue, trusted, PostgreSQL's own CONNECTION LIMIT 20 as a tripwire), the
same load generator, sampler and wait (StartupMessage to the first server byte) as the
``storm`` scenario. Target: p99 <= 1 s, peak <= 20, every client served. The details also
hold ``served_done`` (StartupMessage to ``select 1`` answered), which the ``storm`` rows'
details hold too: PgBouncer's first byte is an AuthenticationOk sent before it has a server
session, so its "wait" stops early; this one compares the two proxies end to end.

The load average is recorded beside every figure: the machine is shared.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Final

from pgguard import scram

from .scenarios import (
    LoadGen,
    Row,
    Settings,
    _cpu_during,
    _sample_peak,
    _spec,
    order,
    pgbench,
    run_loadgen,
    wait_role_sessions,
)
from .stack import BENCH_ROLE, STORM_LIMIT, STORM_ROLE, Stack, Target, load_average

__all__ = ["reuse", "scram_role"]

SCRAM_ROLE: Final = "benchs"
SCRAM_PASSWORD: Final = "bench-pass"
SCRAM_ITERATIONS: Final = 16
CLIENTS: Final = 8
REUSE_GOAL: Final = 5.0  # issue 15: reuse >= 5x PostgreSQL direct
STORM_P99_S: Final = 1.0

def scram_role(stack: Stack, role: str, password: str, *, bench_tables: bool = False) -> str:
    """A role whose SCRAM verifier has ``SCRAM_ITERATIONS`` iterations (so the client's own
    PBKDF2 does not cap every target alike), allowed into database bench, and the lookup
    function pgguard reads verifiers with; returns the verifier."""
    pg = stack.pg
    pg.create_role(role, password=password)  # scram-sha-256 over TCP in pg_hba.conf
    verifier = str(scram.make_verifier(password, iterations=SCRAM_ITERATIONS))
    pg.execute(f"ALTER ROLE {role} PASSWORD '{verifier}'")
    pg.execute(f"GRANT CONNECT ON DATABASE bench TO {role}")
    if bench_tables:
        pg.psql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}", database="bench")
    pg.create_auth_lookup()
    return verifier


def _reuse_config() -> str:
    return f"""
[pool]
reuse = true
trusted_roles = ["{BENCH_ROLE}", "{STORM_ROLE}"]
max_idle = {STORM_LIMIT}
"""


async def reuse(stack: Stack, s: Settings) -> list[Row]:
    verifier = await asyncio.to_thread(scram_role, stack, SCRAM_ROLE, SCRAM_PASSWORD, bench_tables=True)
    started = []
    try:
        guard = stack.start_pgguard(
            "pgguard-reuse", extra=_reuse_config(), backend_extra=f'monitor_dsn = "{stack.pg.dsn()}"'
        )
        started.append(guard)
        port = await asyncio.to_thread(stack.guard_port, guard)
        reuse_target = Target("pgguard-reuse", "127.0.0.1", port, guard.pid)
        # case -> (target, user, password)
        cases: dict[str, tuple[Target, str, str | None]] = {
            "direct": (stack.targets["direct"], BENCH_ROLE, None),
            "pgguard-off": (stack.targets["pgguard"], BENCH_ROLE, None),
            "pgguard-reuse": (reuse_target, BENCH_ROLE, None),
            "direct-scram": (stack.targets["direct"], SCRAM_ROLE, SCRAM_PASSWORD),
            "pgguard-reuse-scram": (reuse_target, SCRAM_ROLE, SCRAM_PASSWORD),
        }
        if "pgbouncer" in stack.targets:
            cases["pgbouncer"] = (stack.targets["pgbouncer"], BENCH_ROLE, None)
            bouncer, bport = await asyncio.to_thread(
                stack.start_pgbouncer, "pgbouncer-scram", scram_users={SCRAM_ROLE: verifier}
            )
            started.append(bouncer)
            cases["pgbouncer-scram"] = (Target("pgbouncer-scram", "127.0.0.1", bport, bouncer.pid),
                                        SCRAM_ROLE, SCRAM_PASSWORD)
        rows = await _connect_rows(s, cases)
        rows.extend(await _storm(stack, s, reuse_target))
    finally:
        for proc in started:
            proc.stop()
    return rows


async def _connect_rows(s: Settings, cases: dict[str, tuple[Target, str, str | None]]) -> list[Row]:
    names = list(cases)
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    loads: list[float] = []
    for rep in range(s.reps):
        loads.append(load_average())
        for name in order(names, rep):
            target, user, password = cases[name]
            result, share = await _cpu_during(
                target.pid,
                pgbench(target, ["-S", "-C"], s.pgbench_s, clients=CLIENTS, jobs=2, user=user, password=password),
            )
            samples[name].append(result["tps"])
            if share is not None:
                cpu[name].append(share)
        print(f"  reuse rep {rep + 1}/{s.reps} (load {loads[-1]}): "
              + ", ".join(f"{n}={samples[n][-1]:.0f}" for n in names), flush=True)
    shares = {n: statistics.median(v) for n, v in cpu.items() if v}

    def row(label: str, columns: dict[str, str], target: str) -> Row:
        r = Row(f"pgbench -S -C -c {CLIENTS}, {label}", "connections/s", "conn/s", "higher", target=target)
        r.set_values({col: samples[case] for col, case in columns.items() if case in samples})
        r.details = {
            "cases": columns,
            "proxy_cpu_share": {col: shares[case] for col, case in columns.items() if case in shares},
            "loadavg": loads,
            "note": "direct and pgbouncer columns of the two trust rows are the same samples",
        }
        return r

    off = row("reuse off", {"direct": "direct", "pgbouncer": "pgbouncer", "pgguard": "pgguard-off"},
              "pgguard >= 0.95x direct")
    ratio = off.ratio_to("direct")
    off.passed = ratio is not None and ratio >= 0.95
    off.score, off.goal = ratio, 0.95
    rows = [off]
    for label, cols in (
        ("reuse on, trusted role", {"direct": "direct", "pgbouncer": "pgbouncer", "pgguard": "pgguard-reuse"}),
        (f"reuse on, SCRAM {SCRAM_ITERATIONS} iterations",
         {"direct": "direct-scram", "pgbouncer": "pgbouncer-scram", "pgguard": "pgguard-reuse-scram"}),
    ):
        r = row(label, cols, f"pgguard >= {REUSE_GOAL:g}x direct (stretch: >= pgbouncer)")
        mine, bouncer = r.values.get("pgguard"), r.values.get("pgbouncer")
        if mine is not None and bouncer:
            r.details["vs_pgbouncer"] = mine / bouncer
        ratio = r.ratio_to("direct")
        r.passed = ratio is not None and ratio >= REUSE_GOAL
        r.score, r.goal = ratio, REUSE_GOAL
        rows.append(r)
    return rows


async def _storm(stack: Stack, s: Settings, target: Target) -> list[Row]:
    pg = stack.pg
    n = min(s.storm_clients, stack.fd_budget)
    if n < s.storm_clients:
        stack.notes.append(f"reuse storm shrank from {s.storm_clients} to {n} clients to fit RLIMIT_NOFILE")
    pg.execute(f"ALTER ROLE {STORM_ROLE} CONNECTION LIMIT {STORM_LIMIT}")
    try:
        load_before = load_average()
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_peak(stack, STORM_ROLE, stop))
        spec = _spec(target, STORM_ROLE, clients=n, connect_inflight=512, deadline=240)
        try:
            result, share = await _cpu_during(target.pid, run_loadgen("storm", spec, timeout=300))
        finally:
            stop.set()
            peak, nsamples = await sampler
        result.update(peak_sessions=peak, peak_samples=nsamples, proxy_cpu_share=share,
                      loadavg=[load_before, load_average()])
        # Warm sessions stay (max_idle): the role's whole limit at once must still get in.
        result["warm_after"] = await wait_role_sessions(stack, STORM_ROLE, STORM_LIMIT, timeout=5)
        gen = await LoadGen.start("hold", _spec(target, STORM_ROLE, clients=STORM_LIMIT, until="ready", deadline=15))
        held = await gen.line(60)
        await gen.release()
        result["fresh_limit_admitted"] = held["outcomes"].get("ready", 0)
        w, d = result["served_wait"], result["served_done"]
        print(f"  reuse storm: {result['outcomes']} in {result['elapsed']:.1f} s, peak {peak} sessions, "
              f"wait p50/p99 {w['p50'] * 1000:.0f}/{w['p99'] * 1000:.0f} ms, to select 1 answered "
              f"{d['p50'] * 1000:.0f}/{d['p99'] * 1000:.0f} ms (load {load_before})", flush=True)
    finally:
        pg.execute(f"ALTER ROLE {STORM_ROLE} CONNECTION LIMIT -1")
    served = result["outcomes"].get("served", 0)
    p99 = result["served_wait"]["p99"]
    rows = []
    row = Row(f"storm {n} clients, limit {STORM_LIMIT}, reuse on", "served", "clients", "higher",
              target=f"peak <= {STORM_LIMIT}, all {n} served, p99 wait <= {STORM_P99_S:g} s")
    row.set_values({"pgguard": [float(served)]})
    row.passed = (
        peak <= STORM_LIMIT
        and served == n
        and p99 <= STORM_P99_S
        and result["fresh_limit_admitted"] == STORM_LIMIT
    )
    row.details = {"pgguard": result}
    rows.append(row)
    wait = Row("storm admission wait, reuse on", "p50/p99/max", "ms", "lower", target=f"p99 <= {STORM_P99_S * 1000:.0f} ms")
    wait.set_values({"pgguard": [p99 * 1000]})
    wait.details = {"pgguard": {p: result["served_wait"][p] * 1000 for p in ("p50", "p99", "max")}}
    wait.passed = p99 <= STORM_P99_S
    wait.score, wait.goal = STORM_P99_S / max(p99, 1e-6), 1.0
    rows.append(wait)
    peak_row = Row("storm peak backend sessions, reuse on", "peak", "sessions", "lower", target=f"<= {STORM_LIMIT}")
    peak_row.set_values({"pgguard": [float(peak)]})
    peak_row.passed = peak <= STORM_LIMIT
    rows.append(peak_row)
    return rows
