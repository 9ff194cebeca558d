"""``[log] format = "json"`` on a real ``python -m pgguard run``: every line of its log is one JSON
object with ts, level and event, and a hostile user name sent by a real client comes back exactly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import asyncpg
import pytest
from console_client import write_config

from pgguard.testing.cluster import free_port
from pgguard.testing.wait import await_until

HOSTILE = 'evil"user\nevent=forged level=ERROR\x01\\'


async def test_every_log_line_is_json_with_ts_level_event(tmp_path, pg) -> None:
    port = free_port()
    path = write_config(tmp_path / "pgguard.toml", pg, '[limits]\nrole_max_connections = 0\npolicy = "reject"\n')
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgguard", "run", "-c", str(path), "--log-level", "debug",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PGGUARD_LOG__FORMAT": "json"},
    )  # fmt: skip
    lines: list[bytes] = []

    async def read_log() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            lines.append(line)

    def events() -> list[dict[str, object]]:
        return [json.loads(line) for line in lines]

    reader = asyncio.create_task(read_log())
    try:
        await await_until(lambda: any(e["event"] == "start" for e in events()), timeout=30, what="event start")
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await asyncpg.connect(host="127.0.0.1", port=port, user=HOSTILE, database="postgres", ssl=False)
        await await_until(
            lambda: any(e["event"] == "reject" for e in events()), timeout=20, what="the rejection to be logged"
        )
        proc.send_signal(signal.SIGHUP)
        await await_until(lambda: any(e["event"] == "reload" for e in events()), timeout=20, what="event reload")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.wait_for(reader, 10)
    assert lines
    for line in lines:
        record = json.loads(line)  # every line, not only pgguard's events
        assert isinstance(record, dict) and {"ts", "level", "event"} <= set(record), line
        assert "traceback" not in record, line
    (reject,) = [e for e in events() if e["event"] == "reject"]
    assert reject["role"] == HOSTILE and reject["level"] == "INFO"
    start = next(e for e in events() if e["event"] == "start")
    assert start["listen"] == f"127.0.0.1:{port}"
    assert [e["clean"] for e in events() if e["event"] == "stop"] == [True]
