"""The benchmark harness runs end to end: its cheapest scenario, for a second, as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_harness_runs_latency_scenario(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--only", "latency", "--reps", "1",
         "--seconds", "1", "--no-pgbouncer", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "pgbench -S -M prepared -c 1" in done.stdout
    (result,) = tmp_path.glob("bench-*.json")
    doc = json.loads(result.read_text())
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["python"]
    (row,) = doc["rows"]
    assert row["values"]["direct"] > 0 and row["values"]["pgguard"] > 0
    assert row["passed"] in (True, False)
    if importlib.util.find_spec("matplotlib") is not None:
        assert list(tmp_path.glob("bench-*.png"))


def test_bench_harness_runs_reuse_scenario(tmp_path: Path) -> None:
    """The reuse rows (issue 15) run end to end: a reuse pgguard, a 16-iteration SCRAM role read
    through monitor_dsn, and a quick-mode storm (2,000 clients) that never exceeds the limit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "reuse", "--reps", "1",
         "--seconds", "1", "--no-pgbouncer", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (result,) = tmp_path.glob("bench-*.json")
    rows = {r["scenario"]: r for r in json.loads(result.read_text())["rows"]}
    for label in ("reuse off", "reuse on, trusted role", "reuse on, SCRAM 16 iterations"):
        row = rows[f"pgbench -S -C -c 8, {label}"]
        assert row["values"]["direct"] > 0 and row["values"]["pgguard"] > 0
        assert row["passed"] in (True, False)
    storm = rows["storm 2000 clients, limit 20, reuse on"]["details"]["pgguard"]
    assert storm["outcomes"] == {"served": 2000}
    assert storm["peak_sessions"] <= 20
    assert storm["fresh_limit_admitted"] == 20
    assert "storm admission wait, reuse on" in done.stdout
