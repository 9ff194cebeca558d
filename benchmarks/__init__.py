"""The benchmark harness: pgguard against PostgreSQL direct and PgBouncer, same run, ratios printed.

``python -m benchmarks run [--quick]`` starts a throwaway PostgreSQL, PgBouncer in session
mode and pgguard (each its own process, on free loopback ports), runs every scenario of
issue 4 and the TLS row of issue 7 against all of them interleaved, prints a table of absolute figures and ratios with
PASS/MISS per target, and writes JSON and PNG under ``benchmarks/results/``.

Modules: ``stack`` (the processes under test), ``loadgen`` (a raw-protocol client run as
its own process), ``scenarios`` (what is measured), ``report`` (table, JSON, PNG),
``__main__`` (the command).
"""
