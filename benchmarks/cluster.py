"""The cluster rows of issue 12: three pgguards sharing their limits through one Redis
(``[cluster]``), against the run's single pgguard, in the same run.

The harness starts a loopback redis-server (``pgguard.testing.redis``, the Debian package's
binary) and three more pgguard processes with the run's configuration plus ``[cluster]``
(defaults: ``lease_ttl`` 10 s, ``timeout`` 1 s). Rows (``python -m benchmarks run --only
cluster``):

- admission latency: connections one after the other (connect, StartupMessage,
  ReadyForQuery, Terminate; ``loadgen serial``), alternately through the single pgguard and
  through one cluster pgguard (so both meet the same moments of the machine's load); p50 and
  p99 per repetition, medians reported, with each process's CPU time per connection (the
  steadiest signal on a shared machine). Target: the shared admission adds at most 1 ms at p99.
- rejections per second: role ``rej`` full (2 sessions held), policy reject, the ``hammer``
  load generator. Single: held on the pgguard hammered. Cluster: held on *another* pgguard,
  so the one hammered admits locally and learns from Redis that the shared limit is full
  (then refuses from its memo of full limits until a release is heard). Target: at least
  half the single-process rate.
- a storm across the three: ``cluster_storm`` clients split evenly, role ``storm`` (limit 20,
  queue policy; PostgreSQL's own CONNECTION LIMIT 20 as a tripwire), ``pg_stat_activity``
  sampled for the peak, and each instance's waits (StartupMessage to first byte) p50/p99/max;
  the same storm through the single pgguard first, for scale (served per second).

The load average is recorded beside every figure: the machine is shared.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from typing import Any

from .scenarios import (
    LoadGen,
    Row,
    Settings,
    _cpu_during,
    _sample_peak,
    _spec,
    order,
    run_loadgen,
    wait_role_sessions,
)
from .stack import (
    BENCH_ROLE,
    REJECT_LIMIT,
    REJECT_ROLE,
    STORM_LIMIT,
    STORM_ROLE,
    Stack,
    Target,
    cpu_seconds,
)

__all__ = ["cluster"]

INSTANCES = 3
NAMES = ("single", "pgguard")  # pgguard: the [cluster] one, in the table's pgguard column


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _cluster_toml(redis_url: str, name: str) -> str:
    return f"""
[cluster]
redis = "{redis_url}"
instance = "{name}"
prefix = "bench"
"""


async def cluster(stack: Stack, s: Settings) -> list[Row]:
    from pgguard.testing.redis import RedisServer, find_redis_server

    if find_redis_server() is None:
        stack.notes.append("cluster: redis-server is not installed (apt-get install redis-server): no cluster rows")
        return []
    with RedisServer() as redis:
        procs = [
            stack.start_pgguard(f"pgguard-cluster-{i}", extra=_cluster_toml(redis.url, f"c{i}"))
            for i in range(INSTANCES)
        ]
        try:
            targets = []
            for proc in procs:
                port = await asyncio.to_thread(stack.guard_port, proc)
                await asyncio.to_thread(proc.wait_for_log, r"event=cluster_join")
                targets.append(Target(proc.name, "127.0.0.1", port, proc.pid))
            rows = await _latency(stack, s, targets[0], targets[1], redis.pid)
            rows += await _rejections(stack, s, targets)
            rows += await _storm(stack, s, targets)
        finally:
            for proc in procs:
                proc.stop()
    return rows


async def _latency(
    stack: Stack, s: Settings, clustered: Target, bystander: Target, redis_pid: int | None
) -> list[Row]:
    targets = {"single": stack.targets["pgguard"], "pgguard": clustered}
    n = s.cluster_connects
    p50: dict[str, list[float]] = {k: [] for k in NAMES}
    p99: dict[str, list[float]] = {k: [] for k in NAMES}
    cpu_us: dict[str, list[float]] = {k: [] for k in NAMES}  # the pgguard's CPU per connection
    redis_us: list[float] = []
    bystander_us: list[float] = []  # another cluster pgguard's CPU meanwhile (events it hears)
    loads = []
    for target in targets.values():  # warm up: connections, Redis's script cache
        await run_loadgen("serial", _spec(target, BENCH_ROLE, clients=50, deadline=30), timeout=120)
    assert targets["single"].pid is not None and clustered.pid is not None
    for rep in range(s.reps):
        # One connection to each in turn, so both see the same moments of the machine's load;
        # the CPU of each process over the run is its own (one connection each per turn).
        names = order(NAMES, rep)
        ports = [targets[k].port for k in names]
        before = {k: cpu_seconds(targets[k].pid or 0) for k in NAMES}
        r0 = cpu_seconds(redis_pid) if redis_pid else 0.0
        b0 = cpu_seconds(bystander.pid) if bystander.pid else 0.0
        spec = _spec(targets[names[0]], BENCH_ROLE, clients=n, deadline=30, extra={"ports": ports})
        result = await run_loadgen("serial", spec, timeout=600)
        for name in NAMES:
            cpu_us[name].append((cpu_seconds(targets[name].pid or 0) - before[name]) / n * 1e6)
            mine = result["ports"][str(targets[name].port)]
            if mine["outcomes"] != {"admitted": n}:
                raise RuntimeError(f"cluster latency through {name}: {mine['outcomes']}")
            p50[name].append(mine["ready"]["p50"] * 1000)
            p99[name].append(mine["ready"]["p99"] * 1000)
        if redis_pid:
            redis_us.append((cpu_seconds(redis_pid) - r0) / n * 1e6)
        if bystander.pid:
            bystander_us.append((cpu_seconds(bystander.pid) - b0) / n * 1e6)
        loads.append(_load())
        print(f"  cluster latency rep {rep + 1}/{s.reps}: p50/p99 ms "
              + ", ".join(f"{k}={p50[k][-1]:.3f}/{p99[k][-1]:.3f}" for k in NAMES)
              + "; pgguard CPU us/conn " + ", ".join(f"{k}={cpu_us[k][-1]:.0f}" for k in NAMES)
              + (f", redis {redis_us[-1]:.0f}" if redis_us else "")
              + (f", another cluster pgguard {bystander_us[-1]:.0f}" if bystander_us else "")
              + f" (load {loads[-1]})", flush=True)
    rows = []
    for label, samples, target in (("p50", p50, "reported"), ("p99", p99, "[cluster] <= single + 1 ms")):
        row = Row(f"cluster: connect to ReadyForQuery {label}", label, "ms", "lower", target=target)
        row.set_values(samples)
        row.ratio_to("single")
        mine, single = row.values["pgguard"], row.values["single"]
        assert mine is not None and single is not None
        row.details = {
            "added_ms": mine - single, "connections_per_rep": n, "loadavg": loads,
            "pgguard_cpu_us_per_connection": {k: statistics.median(v) for k, v in cpu_us.items()},
            "redis_cpu_us_per_connection": statistics.median(redis_us) if redis_us else None,
            "other_cluster_pgguard_cpu_us_per_connection": statistics.median(bystander_us) if bystander_us else None,
        }
        if label == "p99":
            row.passed = mine - single <= 1.0
            row.score, row.goal = single / mine, single / (single + 1.0)
        rows.append(row)
    return rows


async def _rejections(stack: Stack, s: Settings, targets: list[Target]) -> list[Row]:
    single = stack.targets["pgguard"]
    hammered = {"single": single, "pgguard": targets[0]}
    # The role's slots: on the pgguard hammered (single), on another one (cluster).
    holders = [
        await LoadGen.start("hold", _spec(t, REJECT_ROLE, clients=REJECT_LIMIT, until="ready", deadline=30))
        for t in (single, targets[1])
    ]
    samples: dict[str, list[float]] = {k: [] for k in NAMES}
    cpu: dict[str, list[float]] = {k: [] for k in NAMES}
    others: dict[str, dict[str, int]] = {}
    loads = []
    try:
        for gen in holders:
            held = await gen.line(60)
            if held["outcomes"] != {"ready": REJECT_LIMIT}:
                raise RuntimeError(f"could not bring role {REJECT_ROLE} to its limit: {held}")
        for rep in range(s.reps):
            for name in order(NAMES, rep):
                target = hammered[name]
                spec = _spec(target, REJECT_ROLE, workers=s.reject_workers, duration=s.reject_s,
                             max_count=200_000, deadline=30)
                result, share = await _cpu_during(target.pid, run_loadgen("hammer", spec, timeout=s.reject_s + 90))
                samples[name].append(result["rejected_per_s"])
                if share is not None:
                    cpu[name].append(share)
                bad = {k: v for k, v in result["outcomes"].items() if k != "rejected"}
                if bad:
                    others[name] = bad
            loads.append(_load())
            print(f"  cluster rejection rep {rep + 1}/{s.reps}: "
                  + ", ".join(f"{k}={samples[k][-1]:.0f}/s" for k in NAMES) + f" (load {loads[-1]})", flush=True)
    finally:
        for gen in holders:
            await gen.release()
    row = Row("cluster: reject at role limit", "53300/s", "1/s", "higher", target="[cluster] >= 0.5x single")
    row.set_values(samples)
    ratio = row.ratio_to("single")
    row.passed = ratio is not None and ratio >= 0.5 and not others
    row.score, row.goal = ratio, 0.5
    row.details = {
        "proxy_cpu_share": {k: statistics.median(v) for k, v in cpu.items() if v},
        "workers": s.reject_workers,
        "loadavg": loads,
        "note": "cluster: the role's 2 sessions are held on another pgguard; the one hammered "
        "admits locally, then the shared store (or its memo of full limits) refuses",
    }
    if others:
        row.details["unexpected_outcomes"] = others
    return [row]


async def _storm(stack: Stack, s: Settings, targets: list[Target]) -> list[Row]:
    """The same storm through the single pgguard first (for scale), then over the three."""
    n = min(s.cluster_storm, stack.fd_budget)
    shares = [n // INSTANCES + (1 if i < n % INSTANCES else 0) for i in range(INSTANCES)]
    runs: dict[str, dict[str, Any]] = {}
    stack.pg.execute(f"ALTER ROLE {STORM_ROLE} CONNECTION LIMIT {STORM_LIMIT}")
    try:
        for name, spread in (("single", [(stack.targets["pgguard"], n)]), ("pgguard", list(zip(targets, shares, strict=True)))):
            load_before = _load()
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_peak(stack, STORM_ROLE, stop))
            try:
                results: list[dict[str, Any]] = await asyncio.gather(*(
                    run_loadgen("storm", _spec(t, STORM_ROLE, clients=k, connect_inflight=512, deadline=240),
                                timeout=300)
                    for t, k in spread
                ))
            finally:
                stop.set()
                peak, nsamples = await sampler
            after = await wait_role_sessions(stack, STORM_ROLE, 0)
            outcomes: dict[str, int] = {}
            for r in results:
                for k, v in r["outcomes"].items():
                    outcomes[k] = outcomes.get(k, 0) + v
            elapsed = max(r["elapsed"] for r in results)
            waits = {
                (f"c{i}" if name == "pgguard" else "single"): {
                    p: r["served_wait"][p] * 1000 for p in ("p50", "p99", "max")
                }
                for i, r in enumerate(results)
            }
            runs[name] = {"peak": peak, "samples": nsamples, "after": after, "outcomes": outcomes,
                          "elapsed_s": elapsed, "served_per_s": outcomes.get("served", 0) / elapsed,
                          "waits_ms": waits, "loadavg": [load_before, _load()]}
            print(f"  storm {name}: {n} clients in {elapsed:.1f} s, {outcomes}, peak {peak}; waits ms "
                  + ", ".join(f"{k} {v['p50']:.0f}/{v['p99']:.0f}/{v['max']:.0f}" for k, v in waits.items())
                  + f" (load {load_before} -> {_load()})", flush=True)
    finally:
        stack.pg.execute(f"ALTER ROLE {STORM_ROLE} CONNECTION LIMIT -1")
    c = runs["pgguard"]
    row = Row(f"cluster: storm {n} clients over {INSTANCES}, limit {STORM_LIMIT}", "peak", "sessions", "lower",
              target=f"peak <= {STORM_LIMIT}, all served or 53300, 0 held after")
    row.set_values({k: [float(v["peak"])] for k, v in runs.items()})
    row.baseline = "single"
    row.passed = c["peak"] <= STORM_LIMIT and set(c["outcomes"]) <= {"served", "rejected"} and c["after"] == 0
    row.details = runs
    rate = Row(f"cluster: storm {n} clients, served per second", "served/s", "1/s", "higher", target="reported")
    rate.set_values({k: [v["served_per_s"]] for k, v in runs.items()})
    rate.ratio_to("single")
    wait = Row("cluster: storm wait per instance", "p99 (worst)", "ms", "lower", target="reported")
    wait.set_values({k: [max(w["p99"] for w in v["waits_ms"].values())] for k, v in runs.items()})
    wait.ratio_to("single")
    wait.details = {k: v["waits_ms"] for k, v in runs.items()}
    return [row, rate, wait]
