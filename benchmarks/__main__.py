"""``python -m benchmarks run [--quick] [--only NAMES]``: run the harness, print and save the results.

``python -m benchmarks chaos [--quick] [--only NAME]``: the chaos/fuzz harness (``benchmarks/chaos.py``).

``python -m benchmarks regress [--modes ...]``: PostgreSQL's own regression suite, direct and
through pgguard (``benchmarks/regress.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections.abc import Sequence

from . import report
from .scenarios import SCENARIOS, Row, Settings
from .stack import Stack, machine_info


async def _run(stack: Stack, settings: Settings, names: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        rows.extend(await SCENARIOS[name](stack, settings))
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


def cmd_run(args: argparse.Namespace) -> int:
    names = list(SCENARIOS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    settings = Settings.for_mode(args.quick)
    if args.reps:
        settings = dataclasses.replace(settings, reps=args.reps)
    if args.seconds:
        settings = dataclasses.replace(settings, pgbench_s=args.seconds, reject_s=float(args.seconds))
    started = time.perf_counter()
    machine = machine_info()
    print(f"pgguard benchmark, {'quick' if args.quick else 'full'} run, {machine['date']}, "
          f"proxies reach PostgreSQL by {args.backend}")
    print(f"machine: {machine['nproc']} cores ({machine['cpu_model']}), Python {machine['python']}, "
          f"uvloop {machine['uvloop']}, {machine['postgresql']}, {machine['pgbouncer'] or 'no pgbouncer'}")
    with Stack(
        with_pgbouncer=not args.no_pgbouncer,
        log_level=args.log_level,
        backend=args.backend,
        pgguard_tree=args.pgguard_tree,
    ) as stack:
        soft, hard = stack.nofile
        print(f"RLIMIT_NOFILE raised to {soft} (hard {hard}); targets: "
              + ", ".join(f"{t.name}=127.0.0.1:{t.port}" for t in stack.targets.values()), flush=True)
        for note in stack.notes:
            print(f"note: {note}")
        rows = asyncio.run(_run(stack, settings, names))
        notes = list(stack.notes)
    elapsed = time.perf_counter() - started
    machine["elapsed_s"] = round(elapsed, 1)
    machine["proxies_reach_server_by"] = args.backend
    if args.pgguard_tree:
        machine["pgguard_tree"] = str(args.pgguard_tree)
    machine["nofile"] = [soft, hard]
    print()
    print(report.table(rows))
    for note in notes:
        print(f"note: {note}")
    stem = f"bench-{machine['date'].replace(':', '')}-{'quick' if args.quick else 'full'}"  # type: ignore[union-attr]
    out = args.out or report.RESULTS
    report.write_json(out / f"{stem}.json", machine, dataclasses.asdict(settings), rows, notes)
    png_problem = report.write_png(out / f"{stem}.png", machine, rows, notes)
    print(f"\nwrote {out / stem}.json" + ("" if png_problem else f" and {stem}.png"))
    if png_problem:
        print(png_problem)
    if args.markdown:
        print()
        print(report.markdown_table(rows))
    print(f"total {elapsed:.0f} s")
    missed = [r for r in rows if r.passed is False]
    return 1 if args.strict and missed else 0


def cmd_stack(args: argparse.Namespace) -> int:
    """Start the three targets and wait (for profiling by hand: py-spy, perf, pgbench)."""
    import signal

    with Stack(
        with_pgbouncer=not args.no_pgbouncer, log_level=args.log_level, backend=args.backend
    ) as stack:
        for t in stack.targets.values():
            print(f"{t.name}: host=127.0.0.1 port={t.port} pid={t.pid or '-'} "
                  f"(pgbench -h 127.0.0.1 -p {t.port} -U bench bench)", flush=True)
        print("Ctrl-C or SIGTERM stops everything.", flush=True)

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from .chaos import main_chaos

    return main_chaos(args)


def main(argv: Sequence[str] | None = None) -> int:
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the scenarios against direct, pgbouncer and pgguard")
    run.add_argument("--quick", action="store_true", help="short durations, 2,000-client storm (< 2 min)")
    run.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS)}")
    run.add_argument("--reps", type=int, help="repetitions per target (default 3, quick 2)")
    run.add_argument("--seconds", type=int, help="pgbench / hammer duration per repetition")
    run.add_argument("--no-pgbouncer", action="store_true", help="skip the PgBouncer column")
    run.add_argument("--backend", choices=["unix", "tcp"], default="unix",
                     help="how both proxies reach PostgreSQL (default unix: the socket directory, "
                          "as a proxy on the database host is deployed)")
    run.add_argument("--log-level", default="info", help="pgguard's --log-level (default info)")
    run.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    run.add_argument("--pgguard-tree", type=Path,
                     help="run pgguard from this source tree (holding pgguard/), e.g. an older commit")
    run.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    run.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    run.set_defaults(func=cmd_run)
    stack = sub.add_parser("stack", help="start PostgreSQL, PgBouncer and pgguard and wait (profiling)")
    stack.add_argument("--no-pgbouncer", action="store_true")
    stack.add_argument("--log-level", default="info")
    stack.add_argument("--backend", choices=["unix", "tcp"], default="unix")
    stack.set_defaults(func=cmd_stack)
    chaos = sub.add_parser("chaos", help="hostile clients and server faults against a pgguard process, then checks")
    chaos.add_argument("--quick", action="store_true", help="smaller counts (about a minute)")
    chaos.add_argument("--smoke", action="store_true", help="tiny counts, for the test suite (< 30 s)")
    chaos.add_argument("--only", help="comma-separated runs: fuzz,disconnects,slowloris,faults,fdlimit,memory,reuse")
    chaos.add_argument("--pgguard-tree", type=Path,
                       help="run pgguard from this source tree (holding pgguard/), e.g. /work/main")
    chaos.add_argument("--log-level", default="info", help="pgguard's --log-level (default info)")
    chaos.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    chaos.set_defaults(func=cmd_chaos)
    from .regress import add_parser as add_regress

    add_regress(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
