"""A/B: two pgguard source trees side by side against one PostgreSQL, interleaved, CPU per operation.

``python -m benchmarks.ab DIR_A DIR_B [--rounds N] [--only tps,connect,reject]``: each DIR
holds a ``pgguard/`` package (e.g. ``git worktree`` or a copy with one change). Both run
as separate processes at the same time; every round measures A then B (then B then A), so
machine noise hits both alike. Besides throughput it reports the proxy's own CPU time per
operation (user and system, from /proc), which is far steadier than throughput on a
shared machine. This is how each optimisation in docs/benchmarks.md's notes was judged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from .scenarios import LoadGen, pgbench, run_loadgen
from .stack import _CLK_TCK, REJECT_LIMIT, REJECT_ROLE, Stack, Target, _Process, clean_env


def _cpu_split(pid: int) -> tuple[float, float]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


async def _measure(kind: str, target: Target, seconds: int) -> tuple[float, float, float]:
    """Return (operations per second, user us per op, system us per op)."""
    assert target.pid is not None
    u0, s0 = _cpu_split(target.pid)
    if kind == "tps":
        ops = (await pgbench(target, ["-S"], seconds, clients=8, jobs=2))["tps"]
    elif kind == "latency":
        ops = (await pgbench(target, ["-S", "-M", "prepared"], seconds, clients=1, jobs=1))["tps"]
    elif kind == "connect":
        ops = (await pgbench(target, ["-S", "-C"], seconds, clients=8, jobs=2))["tps"]
    elif kind == "reject":
        spec = {"host": target.host, "port": target.port, "user": REJECT_ROLE, "database": "bench",
                "workers": 32, "duration": seconds, "deadline": 30}
        ops = (await run_loadgen("hammer", spec, timeout=seconds + 60))["rejected_per_s"]
    elif kind == "copy":
        ops = await _copy_mb_per_s(target, 200)
    else:
        raise ValueError(kind)
    u1, s1 = _cpu_split(target.pid)
    n = ops * (1 if kind == "copy" else seconds)  # copy: per MB
    return ops, (u1 - u0) / n * 1e6, (s1 - s0) / n * 1e6


async def _copy_mb_per_s(target: Target, mb: int) -> float:
    sql = f"COPY (SELECT repeat('x', 999) FROM generate_series(1, {mb * 1000})) TO STDOUT"
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-q", "-h", target.host, "-p", str(target.port), "-U", "bench", "-d", "bench",
        "-c", sql, env=clean_env(), stdout=asyncio.subprocess.DEVNULL,
    )
    await proc.wait()
    return mb / (time.perf_counter() - t0)


def _start(stack: Stack, name: str, tree: Path, unix: bool = False) -> tuple[_Process, Target]:
    conf = stack.workdir / f"{name}.toml"
    text = stack.pgguard_config(tree=tree)
    if unix:  # the server's Unix-domain socket directory instead of its TCP address
        text = text.replace(f'host = "{stack.backend_host}"', f'host = "{stack.pg.socket_dir}"')
    conf.write_text(text)
    env = clean_env()
    env["PYTHONPATH"] = str(tree)
    proc = _Process(name, [sys.executable, "-m", "pgguard", "run", "-c", str(conf)],
                    stack.workdir / f"{name}.log", cwd=str(tree), env=env)
    stack._extra_guards.append(proc)
    return proc, Target(name, "127.0.0.1", stack.guard_port(proc), proc.pid)


async def _main(
    stack: Stack, trees: dict[str, Path], kinds: list[str], rounds: int, seconds: int, b_unix: bool
) -> None:
    targets = {name: _start(stack, name, tree, b_unix and name == "B")[1] for name, tree in trees.items()}
    for name, t in targets.items():
        exe = os.readlink(f"/proc/{t.pid}/cwd")
        print(f"{name}: pid {t.pid} port {t.port} cwd {exe}")
    holders = []
    if "reject" in kinds:
        for t in targets.values():
            gen = await LoadGen.start("hold", {"host": t.host, "port": t.port, "user": REJECT_ROLE,
                                               "database": "bench", "clients": REJECT_LIMIT,
                                               "until": "ready", "deadline": 30})
            await gen.line(60)
            holders.append(gen)
    try:
        for kind in kinds:
            res: dict[str, list[tuple[float, float, float]]] = {n: [] for n in targets}
            for r in range(rounds):
                names = list(targets) if r % 2 == 0 else list(reversed(targets))
                for name in names:
                    res[name].append(await _measure(kind, targets[name], seconds))
            med = {n: tuple(statistics.median(x[i] for x in v) for i in range(3)) for n, v in res.items()}
            a, b = med["A"], med["B"]
            print(f"{kind:8s} A: {a[0]:9.1f}/s user {a[1]:6.2f}us sys {a[2]:6.2f}us | "
                  f"B: {b[0]:9.1f}/s user {b[1]:6.2f}us sys {b[2]:6.2f}us | "
                  f"B/A rate {b[0] / a[0]:.3f}, cpu/op {(b[1] + b[2]) / (a[1] + a[2]):.3f}", flush=True)
            ratios = [y[0] / x[0] for x, y in zip(res["A"], res["B"], strict=True)]
            print(f"          per-round B/A rate: {' '.join(f'{x:.3f}' for x in ratios)}", flush=True)
    finally:
        for gen in holders:
            await gen.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--only", default="tps,latency,connect,reject")
    parser.add_argument("--b-unix", action="store_true",
                        help="B reaches the server by Unix socket (both use loopback TCP otherwise)")
    args = parser.parse_args(argv)
    with Stack(with_pgbouncer=False, backend="tcp") as stack:
        stack.pg.execute(f"ALTER ROLE {REJECT_ROLE} CONNECTION LIMIT -1")
        asyncio.run(_main(stack, {"A": args.a.resolve(), "B": args.b.resolve()},
                          args.only.split(","), args.rounds, args.seconds, args.b_unix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
