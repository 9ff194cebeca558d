"""`pgguard demo` end to end, as a user runs it: a subprocess, no terminal, a small storm."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgguard", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_queues_a_storm_under_the_limit_and_exits_0() -> None:
    done = _demo("--clients", "40", "--limit", "4", "--query-time", "0.1", "--ramp", "0.2")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "served         40" in out
    assert "rejected       0" in out
    peak = int(re.search(r"backend peak   (\d+) \(limit 4", out).group(1))
    assert 1 <= peak <= 4
    assert re.search(r"admission wait p50 [\d.]+s  p99 [\d.]+s  max [\d.]+s  \(40 admitted\)", out)
    assert "OK: the server never saw more than 4 sessions" in out
    # No terminal: plain progress lines, none wrapped.
    assert re.search(
        r"active +\d+/4 +queued +\d+ +served +\d+ +rejected +\d+ .* done \d+/40\n", out
    )


def test_demo_reject_policy_shows_53300() -> None:
    done = _demo(
        "--clients",
        "30",
        "--limit",
        "2",
        "--policy",
        "reject",
        "--query-time",
        "0.5",
        "--ramp",
        "0",
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    rejected = int(re.search(r"rejected       (\d+)", out).group(1))
    served = int(re.search(r"served         (\d+)", out).group(1))
    assert rejected >= 1 and served >= 2 and served + rejected == 30
    assert '53300 too many connections for role "app"' in out
