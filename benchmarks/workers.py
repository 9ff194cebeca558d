"""CPU per login with ``[server] workers`` = 1 and 2 (no ``[cluster]``: the supervisor's Gate).

``python -m benchmarks.workers [--seconds 8] [--storm 2000] [--reps 1]``. For each pgguard
(started cold, backend on the server's Unix socket), in turn:

- ``-C``: ``pgbench -S -C -c 8`` for ``--seconds``: connections per second;
- ``storm``: ``--storm`` clients at once (``loadgen storm``) for the role limited to 20,
  policy queue: makespan, all served, peak server sessions (never above 20);
- ``reject``: the reject role at its limit of 2, ``loadgen hammer``: 53300 answers per second.

For each, the CPU seconds of the whole pgguard (the supervisor and its workers, read from
/proc) divided by the logins or rejections served: the cost of one login, summed over every
process. On a 2-core machine shared with the server and the load generator, absolute rates
say little; CPU per login, and how it moves from 1 worker to 2, is the figure to carry to a
many-core host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from .scenarios import LoadGen, _sample_peak, _spec, pgbench, run_loadgen, wait_role_sessions
from .stack import REJECT_LIMIT, REJECT_ROLE, STORM_LIMIT, STORM_ROLE, Stack, Target, cpu_seconds


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the workers), so far."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += cpu_seconds(int(child))
            except (OSError, ValueError):
                pass
    return total


async def _measure(stack: Stack, target: Target, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    c0, s0 = _tree_cpu(pid), cpu_seconds(pid)
    res = await pgbench(target, ["-S", "-C"], args.seconds, clients=8, jobs=2)
    cpu, own = _tree_cpu(pid) - c0, cpu_seconds(pid) - s0
    logins = res["tps"] * args.seconds
    out["C"] = {
        "conn_per_s": round(res["tps"], 1), "cpu_ms_per_login": round(1000 * cpu / logins, 3),
        "of_which_supervisor_ms": round(1000 * own / logins, 3),  # the process itself with workers = 1
    }  # fmt: skip

    stack.pg.execute(f"ALTER ROLE {STORM_ROLE} CONNECTION LIMIT {STORM_LIMIT}")
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_peak(stack, STORM_ROLE, stop))
    c0, t0 = _tree_cpu(pid), time.monotonic()
    spec = _spec(target, STORM_ROLE, clients=args.storm, connect_inflight=512, deadline=240)
    try:
        res = await run_loadgen("storm", spec, timeout=300)
    finally:
        stop.set()
        peak, _ = await sampler
        stack.pg.execute(f"ALTER ROLE {STORM_ROLE} CONNECTION LIMIT -1")
    cpu, wall = _tree_cpu(pid) - c0, time.monotonic() - t0
    served = res["outcomes"].get("served", 0)
    out["storm"] = {
        "served": served, "outcomes": res["outcomes"], "elapsed_s": round(res["elapsed"], 2),
        "peak_sessions": peak, "cpu_ms_per_login": round(1000 * cpu / max(served, 1), 3),
        "wall_s": round(wall, 2),
    }  # fmt: skip
    await wait_role_sessions(stack, STORM_ROLE, 0)

    holders = await LoadGen.start("hold", _spec(target, REJECT_ROLE, clients=REJECT_LIMIT, until="ready", deadline=30))
    try:
        await holders.line(60)
        c0 = _tree_cpu(pid)
        spec = _spec(target, REJECT_ROLE, workers=32, duration=args.seconds, max_count=200_000, deadline=30)
        res = await run_loadgen("hammer", spec, timeout=args.seconds + 90)
        cpu = _tree_cpu(pid) - c0
    finally:
        await holders.release()
    rejected = sum(v for k, v in res["outcomes"].items() if k.startswith("rejected"))
    out["reject"] = {
        "per_s": round(res["rejected_per_s"], 1), "cpu_ms_per_reject": round(1000 * cpu / max(rejected, 1), 3)
    }
    return out


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"load_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    with Stack(with_pgbouncer=False) as stack:
        for rep in range(args.reps):
            for workers in (1, 2) if rep % 2 == 0 else (2, 1):
                name = f"pgguard-w{workers}-r{rep}"
                proc = stack.start_pgguard(name, server_extra=f"workers = {workers}")
                try:
                    target = Target(name, "127.0.0.1", stack.guard_port(proc), proc.pid)
                    if workers > 1:
                        proc.wait_for_log(r"event=workers_started")
                    got = await _measure(stack, target, proc.pid, args)
                finally:
                    proc.stop()
                results.setdefault(f"workers={workers}", []).append(got)
                print(name, json.dumps(got), flush=True)
    results["load_after"] = os.getloadavg()[0]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--storm", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_main(args)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
