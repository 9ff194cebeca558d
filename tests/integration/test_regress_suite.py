"""PostgreSQL's own regression suite through pgguard (benchmarks/regress.py), a few of its tests.

The whole ``parallel_schedule`` in every mode is .ci/run's job (three minutes); this runs
``test_setup``, ``boolean`` and ``temp`` one after another, direct, plain and with reuse, as
``python -m benchmarks regress`` does, so a change that breaks the harness or the modes shows
here. It needs the suite prepared (``python -m benchmarks regress --prepare-only``, as root:
apt-get source and postgresql-server-dev) and the system PostgreSQL; it skips otherwise (the
embedded PostgreSQL 18 has no matching suite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.regress import SetupError, prepare_suite
from pgguard.testing.cluster import ClusterError, PostgresCluster

REPO = Path(__file__).resolve().parents[2]


def _suite_ready() -> str | None:
    try:
        cluster = PostgresCluster()
    except ClusterError as exc:
        return str(exc)
    if cluster.source == "embedded":
        return "the embedded PostgreSQL has no matching regression suite"
    try:
        prepare_suite(cluster.bindir, fetch=False)
    except SetupError as exc:
        return str(exc)
    return None


def test_regress_tests_pass_direct_plain_and_reuse_but_temp_through_reuse(tmp_path: Path) -> None:
    why = _suite_ready()
    if why is not None:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k.startswith("PGGUARD_")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "regress", "--modes", "direct,plain,reuse",
         "--tests", "test_setup,boolean,temp", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "direct 3/3" in out
    assert "plain 3/3" in out and "same set as direct" in out
    # temp's reconnect is to get a session without a temporary schema: inherent to reuse,
    # listed with its cause; the run also proves sessions were reused.
    assert "reuse 2/3" in out and "+1 failing, listed differences of reuse:" in out
    assert "    temp: inherent: " in out
    assert " reused" in out and "cannot PREPARE a transaction" in out
    assert (tmp_path / "reuse" / "regression.diffs").exists()
