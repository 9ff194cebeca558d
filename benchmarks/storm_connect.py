"""The "storm from connect" rows of issue 18: a reused login end to end, against PgBouncer.

``python -m benchmarks run --only stormconnect``. ``storm_clients`` clients (10,000 in a full
run) connect at once to a role limited to 20, each ``select 1`` and leave, from
``LOAD_PROCESSES`` load processes (``loadgen burst``: armed first, then released together, so
the load generator's own start-up is not timed and one process's loop is not the bottleneck).
Each client is timed from its connect call to the answer of ``select 1``; the makespan runs
from the first client's connect to the last answer, over every process (``time.monotonic`` is
one clock for the host).

Targets, each round interleaved with the order rotating:

- ``pgbouncer``: the stack's PgBouncer in session mode, ``max_user_connections = 20`` for the
  role, trust; its pooled server connections are closed after each round (``KILL``).
- ``pgguard``: a pgguard with ``[pool] reuse = true``, the role in ``trusted_roles``, limit 20,
  policy queue; started for the round and stopped after it, so every round starts cold, as
  PgBouncer's does.
- ``pgbouncer-scram`` / ``pgguard-scram``: the same for a role with a password (a SCRAM
  verifier of ``SCRAM_ITERATIONS`` iterations, as in the reuse rows): PgBouncer with
  ``auth_type = scram-sha-256`` and the verifier in its user file, pgguard reading it through
  ``[backend] monitor_dsn`` and checking the proof itself.

PostgreSQL's own CONNECTION LIMIT 20 on both roles is a tripwire (a 21st session would be
refused by the server: ``rejected_after_auth``), and ``pg_stat_activity`` is sampled for the
peak. After each pgguard round the role's whole limit must get in at once (``hold``).
Targets: pgguard's makespan and p99 at most PgBouncer's, in the same run, for both roles.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any, Final

from .loadgen import _percentiles
from .reuse import SCRAM_ITERATIONS, scram_role
from .scenarios import (
    LoadGen,
    Row,
    Settings,
    _cpu_during,
    _sample_peak,
    _spec,
    order,
    wait_role_sessions,
)
from .stack import STORM_LIMIT, STORM_ROLE, Stack, Target, _Process, load_average

__all__ = ["storm_connect"]

SCRAM_STORM_ROLE: Final = "storms"
SCRAM_PASSWORD: Final = "storm-pass"
LOAD_PROCESSES: Final = 2
# Every client's TCP handshake may be in flight at once: the storm is the point.
CONNECT_INFLIGHT: Final = 100_000
DEADLINE_S: Final = 240.0


def _pgguard_config() -> str:
    return f"""
[pool]
reuse = true
trusted_roles = ["{STORM_ROLE}"]
max_idle = {STORM_LIMIT}

[roles.{SCRAM_STORM_ROLE}]
max_connections = {STORM_LIMIT}
"""


async def _burst(stack: Stack, target: Target, user: str, password: str | None, clients: int) -> dict[str, Any]:
    """One storm from ``LOAD_PROCESSES`` armed load processes; the merged result."""
    per = [clients // LOAD_PROCESSES + (1 if i < clients % LOAD_PROCESSES else 0) for i in range(LOAD_PROCESSES)]
    extra = {"password": password} if password is not None else {}
    gens = [
        await LoadGen.start("burst", _spec(target, user, clients=n, connect_inflight=CONNECT_INFLIGHT,
                                           deadline=DEADLINE_S, extra=extra))
        for n in per
    ]
    for gen in gens:
        armed = await gen.line(60)
        assert armed.get("event") == "armed", armed
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_peak(stack, user, stop))

    async def fire() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(gen.release(timeout=DEADLINE_S + 60) for gen in gens)))

    try:
        parts, share = await _cpu_during(target.pid, fire())
    finally:
        stop.set()
        peak, nsamples = await sampler
    outcomes: dict[str, int] = {}
    times: list[float] = []
    for part in parts:
        for k, v in part["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
        times.extend(part["served_times"])
    ends = [p["last_end"] for p in parts if p["last_end"]]
    makespan = (max(ends) - min(p["first_start"] for p in parts)) if ends else 0.0
    return {
        "clients": clients,
        "outcomes": outcomes,
        "makespan": makespan,
        "connect_to_answer": _percentiles(times),
        "peak_sessions": peak,
        "peak_samples": nsamples,
        "proxy_cpu_share": share,
    }


async def storm_connect(stack: Stack, s: Settings) -> list[Row]:
    pg = stack.pg
    n = min(s.storm_clients, stack.fd_budget)
    if n < s.storm_clients:
        stack.notes.append(f"storm from connect shrank from {s.storm_clients} to {n} clients to fit RLIMIT_NOFILE")
    verifier = await asyncio.to_thread(scram_role, stack, SCRAM_STORM_ROLE, SCRAM_PASSWORD)
    roles = {"trusted": (STORM_ROLE, None), "scram": (SCRAM_STORM_ROLE, SCRAM_PASSWORD)}
    cases = ["pgguard", "pgguard-scram"]
    if "pgbouncer" in stack.targets:
        cases = ["pgbouncer", "pgguard", "pgbouncer-scram", "pgguard-scram"]
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for role in (STORM_ROLE, SCRAM_STORM_ROLE):
        pg.execute(f"ALTER ROLE {role} CONNECTION LIMIT {STORM_LIMIT}")
    try:
        for rep in range(s.reps):
            for case in order(cases, rep):
                user, password = roles["scram" if case.endswith("-scram") else "trusted"]
                result = await _round(stack, case, user, password, n, verifier)
                results[case].append(result)
                d = result["connect_to_answer"]
                print(f"  storm from connect rep {rep + 1}/{s.reps} {case}: {result['outcomes']}, makespan "
                      f"{result['makespan']:.2f} s, p50/p99 {d['p50'] * 1000:.0f}/{d['p99'] * 1000:.0f} ms, "
                      f"peak {result['peak_sessions']} (load {result['loadavg']})", flush=True)
    finally:
        for role in (STORM_ROLE, SCRAM_STORM_ROLE):
            pg.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
    return [_row(results, n, "trusted role", "pgbouncer", "pgguard"),
            _row(results, n, f"SCRAM {SCRAM_ITERATIONS} iterations", "pgbouncer-scram", "pgguard-scram")]


async def _round(stack: Stack, case: str, user: str, password: str | None, n: int, verifier: str) -> dict[str, Any]:
    """Start the case's proxy if it is per round, storm it, check what it left, stop it."""
    proc: _Process | None = None
    load = load_average()
    if case == "pgbouncer":
        target = stack.targets["pgbouncer"]
    elif case == "pgbouncer-scram":
        proc, port = await asyncio.to_thread(
            stack.start_pgbouncer, "pgbouncer-storm-scram", scram_users={SCRAM_STORM_ROLE: verifier},
            user_limits={SCRAM_STORM_ROLE: STORM_LIMIT},
        )
        target = Target(case, "127.0.0.1", port, proc.pid)
    else:
        proc = stack.start_pgguard("pgguard-storm", extra=_pgguard_config(),
                                   backend_extra=f'monitor_dsn = "{stack.pg.dsn()}"')
        port = await asyncio.to_thread(stack.guard_port, proc)
        target = Target(case, "127.0.0.1", port, proc.pid)
    try:
        result = await _burst(stack, target, user, password, n)
        result["loadavg"] = [load, load_average()]
        if case.startswith("pgguard"):
            # Warm sessions stay: the role's whole limit at once must still get in.
            extra = {"password": password} if password is not None else {}
            gen = await LoadGen.start("hold", _spec(target, user, clients=STORM_LIMIT, until="ready",
                                                     deadline=15, extra=extra))
            held = await gen.line(60)
            await gen.release()
            result["limit_admitted_after"] = held["outcomes"].get("ready", 0)
    finally:
        if proc is not None:
            await asyncio.to_thread(proc.stop)
        elif case == "pgbouncer":
            await asyncio.to_thread(stack.reset_pgbouncer)
    result["sessions_after"] = await wait_role_sessions(stack, user, 0)
    return result


def _row(results: dict[str, list[dict[str, Any]]], n: int, label: str, bouncer: str, guard: str) -> Row:
    row = Row(f"storm from connect, {n} clients, limit {STORM_LIMIT}, reuse on, {label}", "makespan", "s",
              "lower", target="pgguard makespan and p99 (connect to answer) <= PgBouncer's, peak <= limit, all served")
    present = {name: key for name, key in (("pgbouncer", bouncer), ("pgguard", guard)) if results.get(key)}
    row.set_values({name: [r["makespan"] for r in results[key]] for name, key in present.items()})
    p99 = {name: statistics.median(r["connect_to_answer"]["p99"] for r in results[key]) for name, key in present.items()}
    row.details = {"p99_connect_to_answer_s": p99, **{name: results[key] for name, key in present.items()}}
    mine = results.get(guard, [])
    clean = bool(mine) and all(
        r["outcomes"] == {"served": n} and r["peak_sessions"] <= STORM_LIMIT
        and r.get("limit_admitted_after") == STORM_LIMIT
        for r in mine
    )
    if "pgbouncer" in present and "pgguard" in present:
        ratio = row.ratio_to("pgbouncer")  # makespan pgguard / pgbouncer: lower is better
        row.passed = clean and ratio is not None and ratio <= 1.0 and p99["pgguard"] <= p99["pgbouncer"]
        row.score, row.goal = (1.0 / ratio if ratio else None), 1.0
    else:
        row.passed = None
        row.target += " (pgbouncer absent: not judged)"
    return row
