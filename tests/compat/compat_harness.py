"""Drives a compatibility program (node-postgres, pgjdbc) against a pgguard and checks what it saw.

Every program runs the same scenario (compat.js, Compat.java) and prints one JSON line per
step: ``basic`` (role ``other``: a query, a named prepared statement run twice, a transaction rolled back),
``reject`` (the second session of role ``app``, limit 1, policy reject: the client's own
error fields), ``holding`` (role ``app2``, limit 1, policy queue: one session held, a second
connecting), then, after the test has seen that second client queue at pgguard and said so
on stdin, ``queued`` (the second session ran a query once the first closed).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from pgguard.testing.wait import await_until

GUARD_TOML = """
[roles.app]
max_connections = 1
policy = "reject"
[roles.app2]
max_connections = 1
policy = "queue"
queue_timeout = 60.0
"""
# A JVM or node start plus a few round trips; generous for a loaded 2-core machine.
STEP_TIMEOUT = 120.0


async def run_scenario(g: Any, argv: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``argv`` against pgguard ``g``; return its steps by name. Fails on a nonzero exit."""
    full_env = {**os.environ, "PGHOST": g.host, "PGPORT": str(g.port), **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=full_env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    steps: dict[str, dict[str, Any]] = {}
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), STEP_TIMEOUT)
            if not line:
                break
            step = json.loads(line)
            steps[step["step"]] = step
            if step["step"] == "holding":
                await await_until(
                    lambda: g.role_waiting("app2") == 1,
                    timeout=STEP_TIMEOUT,
                    what="the second app2 client to queue at pgguard",
                )
                proc.stdin.write(b"release\n")
                await proc.stdin.drain()
        err = await asyncio.wait_for(proc.stderr.read(), STEP_TIMEOUT)
        code = await asyncio.wait_for(proc.wait(), STEP_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0:
        pytest.fail(f"{argv[0]} exited {code}: {steps.get('error')}\n{err.decode(errors='replace')[-3000:]}")
    return steps


def check_scenario(steps: Mapping[str, Mapping[str, Any]]) -> None:
    """The same expectations for every client library."""
    assert steps["basic"] == {"step": "basic", "query": 2, "prepared": [42, 2], "inside": 2, "after": 0}
    assert steps["reject"]["error"] == {
        "code": "53300",
        "severity": "FATAL",
        "message": 'too many connections for role "app"',
    }
    assert steps["queued"] == {"step": "queued", "n": 42}
