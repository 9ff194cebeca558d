"""The regression-suite harness's judgement (benchmarks/regress.py), on pg_regress's own report
formats: which tests passed, what a mode lost against direct, and when the verdict fails. The
runs themselves are in tests/integration/test_regress_suite.py and .ci/run."""

from __future__ import annotations

from benchmarks.regress import (
    QUEUE_LIMIT,
    REUSE_DIFFERENCES,
    SUPERUSER,
    Outcome,
    compare,
    deb_src_entries,
    diff_excerpt,
    metric_sum,
    package_uris,
    parse_results,
    pgguard_config,
    verdict,
)
from pgguard import config

PG15_REPORT = """\
============== running regression test queries        ==============
test test_setup                   ... ok          192 ms
test tablespace                   ... failed (ignored)      270 ms
parallel group (3 tests):  boolean char temp
     boolean                      ... ok          399 ms
     char                         ... ok          121 ms
     temp                         ... FAILED      165 ms
test event_trigger                ... ok          301 ms

======================
 1 of 6 tests failed, 1 of these failures ignored.
======================
"""

PG16_REPORT = """\
# using postmaster on 127.0.0.1, port 5432
ok 1         - test_setup                                313 ms
# parallel group (2 tests):  boolean temp
ok 2         + boolean                                   40 ms
not ok 3     + temp                                      55 ms
1..3
"""


def _outcome(mode: str, passing: str, failing: str = "") -> Outcome:
    results = {t: True for t in passing.split()} | {t: False for t in failing.split()}
    return Outcome(mode, results, 1.0)


def test_parse_results_reads_pg15_report_with_parallel_groups_and_ignored_failures() -> None:
    assert parse_results(PG15_REPORT) == {
        "test_setup": True, "tablespace": False, "boolean": True, "char": True,
        "temp": False, "event_trigger": True,
    }  # fmt: skip


def test_parse_results_reads_the_tap_report_of_pg16_on() -> None:
    assert parse_results(PG16_REPORT) == {"test_setup": True, "boolean": True, "temp": False}


def test_parse_results_ignores_everything_else() -> None:
    assert parse_results("CREATE DATABASE\nparallel group (2 tests):  a b\n 1 of 2 tests failed.\n") == {}


def test_compare_counts_a_missing_test_as_failing_and_reports_gains() -> None:
    direct = {"a": True, "b": True, "c": False}
    assert compare(direct, {"a": True, "c": True}) == (["b"], ["c"])


def test_plain_or_queue_losing_a_test_fails_the_verdict() -> None:
    direct = _outcome("direct", "a b c")
    ok, lines = verdict([direct, _outcome("plain", "a b c"), _outcome("queue", "a b", "c")])
    assert not ok
    assert "plain 3/3 (1 s): same set as direct" in lines
    assert any(line.startswith("queue 2/3") and "+1 failing that pass direct: c" in line for line in lines)


def test_a_test_that_fails_direct_too_is_no_loss() -> None:
    ok, _ = verdict([_outcome("direct", "a", "b"), _outcome("queue", "a", "b")])
    assert ok


def test_reuse_may_lose_only_the_listed_differences() -> None:
    listed = next(iter(REUSE_DIFFERENCES))
    direct = _outcome("direct", f"a {listed}")
    ok, lines = verdict([direct, _outcome("reuse", "a", listed)])
    assert ok
    assert f"    {listed}: {REUSE_DIFFERENCES[listed]}" in lines
    ok, lines = verdict([direct, _outcome("reuse", listed, "a")])
    assert not ok
    assert any("+1 failing that pass direct: a" in line for line in lines)
    # plain and queue get no such allowance
    assert not verdict([direct, _outcome("plain", "a", listed)])[0]


def test_a_listed_difference_that_passes_is_reported_for_deletion() -> None:
    listed = next(iter(REUSE_DIFFERENCES))
    ok, lines = verdict([_outcome("direct", f"a {listed}"), _outcome("reuse", f"a {listed}")])
    assert ok
    assert lines[-1] == f"now passes through reuse (delete from REUSE_DIFFERENCES): {listed}"


def test_every_listed_difference_names_its_cause() -> None:
    for test, cause in REUSE_DIFFERENCES.items():
        assert cause.startswith(("inherent: ", "issue 22 point 2: ")), test


def test_diff_excerpt_takes_the_changed_lines_of_one_test() -> None:
    diffs = """\
diff -U3 /x/expected/date.out /x/results/date.out
--- /x/expected/date.out
+++ /x/results/date.out
@@ -1,3 +1,3 @@
 SHOW DateStyle;
- Postgres, MDY
+ ISO, MDY
diff -U3 /x/expected/temp.out /x/results/temp.out
--- /x/expected/temp.out
+++ /x/results/temp.out
@@ -409,4 +409,3 @@
-ERROR:  cannot PREPARE a transaction that has operated on temporary objects
"""
    assert diff_excerpt(diffs, "date") == ["- Postgres, MDY", "+ ISO, MDY"]
    assert diff_excerpt(diffs, "temp") == [
        "-ERROR:  cannot PREPARE a transaction that has operated on temporary objects"
    ]
    assert diff_excerpt(diffs, "stats") == []


def test_deb_src_entries_twin_each_deb_stanza_and_line() -> None:
    deb822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
"""
    assert deb_src_entries(deb822) == (
        "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    one_line = "deb http://deb.debian.org/debian bookworm main\n# deb http://x y z\n"
    assert deb_src_entries(one_line) == "deb-src http://deb.debian.org/debian bookworm main\n"


def test_deb_src_entries_keep_only_the_archives_serving_the_package() -> None:
    text = (
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian/\nSuites: bookworm\nComponents: main\n"
    )
    policy = """postgresql-15:
  Installed: 15.18-0+deb12u1
  Version table:
     15.20-0+deb12u1 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
 *** 15.18-0+deb12u1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
"""
    uris = package_uris(policy)
    assert uris == {"http://deb.debian.org/debian", "http://deb.debian.org/debian-security"}
    assert deb_src_entries(text, uris) == (
        "Types: deb-src\nURIs: http://deb.debian.org/debian/\nSuites: bookworm\nComponents: main\n"
    )
    one_line = "deb [signed-by=/k.gpg] https://deb.nodesource.com/node_20.x nodistro main\n" \
        "deb [arch=amd64] http://deb.debian.org/debian bookworm main\n"
    assert deb_src_entries(one_line, uris) == "deb-src [arch=amd64] http://deb.debian.org/debian bookworm main\n"


def test_a_mode_with_a_problem_fails_the_verdict_whatever_its_counts() -> None:
    plain = Outcome("plain", {"a": True}, 1.0, problems=("pgguard exited during the run (killed by SIGSEGV)",))
    ok, lines = verdict([_outcome("direct", "a"), plain])
    assert not ok
    assert lines[1] == "plain: PROBLEM: pgguard exited during the run (killed by SIGSEGV)"


def test_the_modes_configurations_limit_the_superuser_and_reuse_its_sessions() -> None:
    plain = config.loads(pgguard_config("plain", 5433, "postgresql://postgres@127.0.0.1:5433/postgres"))
    assert plain.limits.max_connections == -1 and not plain.pool.reuse
    assert plain.backend.port == 5433 and plain.metrics.listen == "127.0.0.1:0"
    queue = config.loads(pgguard_config("queue", 5433, "postgresql://postgres@127.0.0.1:5433/postgres"))
    assert queue.limits.max_connections == QUEUE_LIMIT < 20 and queue.limits.policy == "queue"
    assert SUPERUSER not in queue.limits.exempt_roles  # pg_regress's role counts against the limit
    reuse = config.loads(pgguard_config("reuse", 5433, "postgresql://postgres@127.0.0.1:5433/postgres"))
    assert reuse.pool.reuse and reuse.pool.trusted_roles == (SUPERUSER,)
    assert reuse.backend.monitor_dsn == "postgresql://postgres@127.0.0.1:5433/postgres"


def test_metric_sum_adds_every_labelled_sample_of_one_name() -> None:
    text = """\
# TYPE pgguard_queued_total counter
pgguard_queued_total{role="postgres"} 89
pgguard_queued_total{role="other"} 2
pgguard_queued_total_extra 100
pgguard_pool_sessions_reused_total 5
"""
    assert metric_sum(text, "pgguard_queued_total") == 91
    assert metric_sum(text, "pgguard_pool_sessions_reused_total") == 5
    assert metric_sum(text, "pgguard_absent") == 0
